"""A request's state: prompt, generated tokens and text, stop conditions, cache blocks, sampler slot, timings."""

from __future__ import annotations

import itertools
import time

from .sampling import SamplingParams, row_values
from .tokenizer import IncrementalDetokenizer, Tokenizer

_ids = itertools.count()


class Sequence:
    """One request: its tokens, text, stop conditions, cache blocks, sampler slot and timings."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_seq_len: int,
                 tokenizer: Tokenizer | None, eos_token_ids: frozenset[int], prompt: str | None = None):
        self.id = next(_ids)
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        # with params.logprobs: per output token, (its log-probability, [(token id, log-probability)] of the
        # params.logprobs most likely tokens at that step)
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.max_len = min(len(prompt_ids) + params.max_tokens, max_seq_len)
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.text = ""
        self.emitted = 0  # characters of self.text handed to a stream
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
        self.blocks: list[int] = []
        self.slot: int | None = None  # row in the sampler state while running
        self.seed: int | None = params.seed  # the engine draws one at admission when the request has none
        self.num_prefilled = 0  # prompt tokens whose k/v are in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission (not prefilled)
        # prefix-cache entry ids of its leading full prompt blocks, matched at admission or registered once their
        # prefill was launched (see kv_cache.py); a block's key chains from the entry before it
        self.cache_entries: list[int] = []
        self._block_tokens: list[tuple[int, ...]] | None = None
        # prompt tokens plus every output token launched on the device, read back or not: the engine launches a
        # step before it reads back the one before, so this runs one (inside a step, two) ahead of num_tokens
        self.num_launched = len(self.prompt_ids)
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_flight(self) -> int:
        """Output tokens launched but not read back (after the sequence finished: one computed past its end and
        dropped, or none)."""
        return self.num_launched - len(self.prompt_ids) - len(self.output_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled == len(self.prompt_ids)

    def prompt_block_tokens(self, block_size: int) -> list[tuple[int, ...]]:
        """The token ids of each full block of the prompt, the prefix cache's keys (computed once)."""
        if self._block_tokens is None:
            ids = self.prompt_ids
            self._block_tokens = [tuple(ids[i:i + block_size])
                                  for i in range(0, len(ids) - block_size + 1, block_size)]
        return self._block_tokens

    def append(self, token: int, now: float | None = None) -> None:
        """A new token (`now`: its arrival time, perf_counter, one reading for a whole step)."""
        if now is None:
            now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            if self.detok is not None:
                self.text += self.detok.add(token)
                if self._check_stop_strings():
                    return
            if len(self.prompt_ids) + len(self.output_ids) >= self.max_len:
                self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None:
            self.text += self.detok.flush()
            self._check_stop_strings()

    def _check_stop_strings(self) -> bool:
        for s in self.params.stop:
            i = self.text.find(s)
            if i >= 0:
                self.text = self.text[:i]
                self.finish_reason = "stop"
                return True
        return False

    def take_new_text(self) -> str:
        """Text not yet streamed, holding back a possible partial stop string until it is decided."""
        end = len(self.text) if self.finished else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece

    def sampling_row(self) -> tuple:
        return row_values(self.params, self.seed, len(self.output_ids), self.slot)
