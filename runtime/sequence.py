"""A request's state: prompt, generated tokens and text, stop conditions, cache blocks, sampler slot, timings."""

from __future__ import annotations

import io
import itertools
import time

from .sampling import SamplingParams, row_values
from .tokenizer import IncrementalDetokenizer, Tokenizer

_ids = itertools.count()


class Sequence:
    """One request: its tokens, text, stop conditions, cache blocks, sampler slot and timings."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_seq_len: int,
                 tokenizer: Tokenizer | None, eos_token_ids: frozenset[int], prompt: str | None = None,
                 priority: int = 0):
        self.id = next(_ids)
        self.priority = priority  # with scheduling_policy "priority": a lower value is scheduled first
        self.arrival_order = -1  # its place in the order requests were added to the engine (Scheduler.add)
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        # with params.logprobs: per output token, (its log-probability, [(token id, log-probability)] of the
        # params.logprobs most likely tokens at that step)
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] | None = [] if params.logprobs is not None else None
        # with params.prompt_logprobs: per prompt token, the same for the token at that position given the ones
        # before (None for the first), filled as its prefill chunks run
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the engine ended it alone (finish_reason "abort"): see Engine._guide
        self.max_len = min(len(prompt_ids) + params.max_tokens, max_seq_len)
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        # with params.structured_outputs: its place in the structure (the tokens it may sample next), which the
        # engine moves with each token it receives (LLM sets it up: it needs the tokenizer's vocabulary)
        self.matcher = None
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        # the generated text in a StringIO (appends, the stop-string scan of the newest characters and the stream's
        # slices cost what they touch, not the text's length: a long generation stays O(1) per token on the host)
        self._text = io.StringIO()
        self._text_len = 0
        self.emitted = 0  # characters of self.text handed to a stream
        # a stop string may still be forming in the last characters (none held when the stop string is kept)
        self.hold = 0 if params.include_stop_str_in_output else max((len(s) for s in params.stop), default=1) - 1
        self.submitted = False  # queued once (Scheduler.add): a sequence runs once
        self.blocks: list[int] = []
        self.slot: int | None = None  # row in the sampler state while running
        self.seed: int | None = params.seed  # the engine draws one at admission when the request has none
        # the tokens a prefill computes: the prompt, and after a preemption the prompt and the tokens generated before
        # it (recomputed: their k/v were freed with the blocks)
        self.prefill_ids = self.prompt_ids
        self.num_prefilled = 0  # tokens of prefill_ids whose k/v are in the cache
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache (not prefilled by this request)
        # prefix-cache entry ids of its leading full blocks, matched at admission, registered once their prefill was
        # launched, or (generated tokens') when it lets go of them (see kv_cache.py); a block's key chains from the
        # entry before it
        self.cache_entries: list[int] = []
        self._block_tokens: list[tuple[int, ...]] | None = None
        # prompt tokens plus every output token launched on the device, read back or not: the engine launches a
        # step before it reads back the one before, so this runs one (inside a step, two) ahead of num_tokens
        self.num_launched = len(self.prompt_ids)
        self.num_preemptions = 0  # times its blocks were taken back for older requests (see Scheduler.preempt)
        self.stale = 0  # tokens launched before the last preemption, not read back yet: dropped when they arrive
        self.block_due: int | None = None  # while decoding: the decode plan that gives it its next block (Scheduler)
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def text(self) -> str:
        """The generated text so far (without a matched stop string)."""
        return self._text.getvalue()

    def _read_text(self, start: int, stop: int | None = None) -> str:
        self._text.seek(start)
        return self._text.read(-1 if stop is None else stop - start)

    def _add_text(self, piece: str) -> None:
        """Append a decoded piece, then cut the text at a stop string that ends inside it."""
        if not piece:
            return
        before = self._text_len
        self._write(piece)
        self._check_stop_strings(before)

    def _write(self, piece: str) -> None:
        self._text.seek(self._text_len)
        self._text.write(piece)
        self._text_len += len(piece)

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
        return self.num_prefilled == len(self.prefill_ids)

    def preempted(self) -> None:
        """Its blocks and slot were taken back (Scheduler.preempt): it waits to be admitted again and then prefills
        its prompt and the tokens generated so far; a token still in flight is dropped when read back and computed
        again (the same token when sampled from the same logits: a seeded draw depends on the seed and the step)."""
        self.stale += self.in_flight
        self.num_launched = self.num_tokens
        self.num_preemptions += 1
        self.block_due = None
        self.num_prefilled = 0
        self.cache_entries = []
        self.prefill_ids = self.prompt_ids + self.output_ids
        self._block_tokens = None

    def block_token_ids(self, i: int, block_size: int) -> tuple[int, ...]:
        """The token ids (prompt, then output) at the positions of its block i."""
        a, b, p = i * block_size, (i + 1) * block_size, len(self.prompt_ids)
        if b <= p:
            return tuple(self.prompt_ids[a:b])
        return tuple(self.prompt_ids[a:]) + tuple(self.output_ids[max(0, a - p):b - p])

    def prompt_block_tokens(self, block_size: int) -> list[tuple[int, ...]]:
        """The token ids of each full block of prefill_ids, the prefix cache's keys (computed once per
        admission)."""
        if self._block_tokens is None:
            ids = self.prefill_ids
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
        if token in self.stop_ids:  # (never before min_tokens: the sampler gives them no probability until then)
            self.finish_reason = "stop"
            if self.params.include_stop_str_in_output and self.detok is not None:
                self._write(self.detok.add(token))  # its text (none for a special token that is skipped)
        else:
            if self.detok is not None:
                self._add_text(self.detok.add(token))
                if self.finish_reason is not None:  # a stop string
                    return
            if len(self.prompt_ids) + len(self.output_ids) >= self.max_len:
                self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None:
            self._add_text(self.detok.flush())

    def _check_stop_strings(self, before: int) -> None:
        """A stop string that ends after character `before` (earlier ones were found earlier) cuts the text where it
        starts and finishes the request; the stop strings are tried in their order. Only past min_tokens tokens, as
        vLLM V1 checks them: the text of token min_tokens + 1 may complete one begun before; one that ended within
        the first min_tokens tokens' text is passed over."""
        if len(self.output_ids) <= self.params.min_tokens:
            return
        for s in self.params.stop:
            start = max(0, before - len(s) + 1)
            i = self._read_text(start).find(s)
            if i >= 0:
                self._text_len = start + i + (len(s) if self.params.include_stop_str_in_output else 0)
                self._text.truncate(self._text_len)
                self.finish_reason = "stop"
                return

    def take_new_text(self) -> str:
        """Text not yet streamed, holding back a possible partial stop string until it is decided."""
        end = self._text_len if self.finished else max(self.emitted, self._text_len - self.hold)
        piece = self._read_text(self.emitted, end) if end > self.emitted else ""
        self.emitted = end
        return piece

    def sampling_row(self) -> tuple:
        return row_values(self.params, self.seed, len(self.output_ids), self.slot)


def check_min_tokens(seq: Sequence, vocab_size: int) -> None:
    """min_tokens within the tokens the sequence may generate (max_tokens, capped by the context), as vLLM checks
    it against max_tokens, and with some token it may generate before then: a ValueError naming it, not a request
    that ends early anyway."""
    room = seq.max_len - len(seq.prompt_ids)
    if seq.params.min_tokens > room:
        raise ValueError(f"SamplingParams.min_tokens = {seq.params.min_tokens}: more than the {room} tokens this "
                         f"request may generate (max_tokens, or what the context leaves after its "
                         f"{len(seq.prompt_ids)}-token prompt)")
    if seq.params.min_tokens and sum(t < vocab_size for t in seq.stop_ids) >= vocab_size:
        raise ValueError(f"SamplingParams.min_tokens = {seq.params.min_tokens}: every token of the vocabulary is a "
                         "stop token (stop_token_ids and eos), so none may come before min_tokens")
    allowed = seq.params.allowed_token_ids
    if seq.params.min_tokens and allowed and set(allowed) <= seq.stop_ids:
        raise ValueError(f"SamplingParams.min_tokens = {seq.params.min_tokens}: every token of allowed_token_ids is "
                         "a stop token (stop_token_ids and eos), so none may come before min_tokens")
