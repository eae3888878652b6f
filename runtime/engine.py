"""The engine: requests (`Sequence`), a first-come-first-served scheduler over the paged KV cache, and the model
runner (eager varlen prefill, batched decode) with sampling.

Each step either prefills newly admitted sequences or decodes one token for every running sequence; finished
sequences leave and free their blocks between steps, waiting ones join when blocks and batch slots allow. A
sequence reserves blocks for its prompt plus its whole token budget when it is admitted, so a running sequence
never runs out of cache.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from qwen2rt.models.backend import AttentionMetadata
from qwen2rt.models.qwen2 import Qwen2Model

from .kv_cache import KVCache
from .sampling import SamplingParams, sample
from .tokenizer import IncrementalDetokenizer, Tokenizer

_ids = itertools.count()


class Sequence:
    """One request: its tokens, text, stop conditions, cache blocks and timings."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_seq_len: int,
                 tokenizer: Tokenizer | None, eos_token_ids: frozenset[int], device, prompt: str | None = None):
        self.id = next(_ids)
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.max_len = min(len(prompt_ids) + params.max_tokens, max_seq_len)
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.text = ""
        self.emitted = 0  # characters of self.text handed to a stream
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
        self.blocks: list[int] = []
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token: int) -> None:
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
            if self.num_tokens >= self.max_len:
                self.finish_reason = "length"
        if self.finished and self.detok is not None:
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


class Engine:
    def __init__(self, model: Qwen2Model, kv_cache: KVCache, max_batch_size: int, max_seq_len: int,
                 generator: torch.Generator, max_prefill_tokens: int = 8192):
        self.model = model
        self.cache = kv_cache
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.generator = generator
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.device = model.device

    # ---- scheduling -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        need = self.cache.blocks_for(seq.max_len)
        if need > self.cache.num_blocks:
            raise ValueError(f"request needs {need} KV cache blocks ({seq.max_len} tokens) but the cache holds "
                             f"{self.cache.num_blocks}; lower max_tokens or give the cache more blocks")
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.cache.free(seq.blocks)
            seq.blocks = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> list[Sequence]:
        admitted, tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            need = self.cache.blocks_for(seq.max_len)
            if need > self.cache.num_free_blocks:
                break  # first come, first served: later requests wait behind it
            if admitted and tokens + len(seq.prompt_ids) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            seq.blocks = self.cache.allocate(need)
            admitted.append(seq)
            tokens += len(seq.prompt_ids)
        return admitted

    def step(self) -> list[Sequence]:
        """Run one prefill or decode step; -> the sequences that received a token."""
        prefill = self._admit()
        seqs = prefill if prefill else list(self.running)
        if not seqs:
            return []
        try:
            tokens = self._run(seqs, is_prefill=bool(prefill))
        except BaseException:
            for seq in prefill:  # not yet running: give their blocks back, then fail them
                self._release(seq)
                seq.finish_reason = "abort"
            raise
        self.running.extend(prefill)
        for seq, token in zip(seqs, tokens):
            seq.append(token)
            if seq.finished:
                self.running.remove(seq)
                self._release(seq)
        return seqs

    # ---- model runner -----------------------------------------------------------------------------------------
    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.cache.block_size
        return seq.blocks[pos // bs] * bs + pos % bs

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.blocks) for s in seqs)
        rows = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def prefill_metadata(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """All prompt tokens of `seqs` -> (token ids [T], metadata, index of each sequence's last row [B])."""
        ids, positions, slots, starts = [], [], [], [0]
        for s in seqs:
            n = len(s.prompt_ids)
            ids.extend(s.prompt_ids)
            positions.extend(range(n))
            slots.extend(self._slot(s, p) for p in range(n))
            starts.append(starts[-1] + n)
        dev = self.device
        lens = [len(s.prompt_ids) for s in seqs]
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=self._block_tables(seqs),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            is_prefill=True,
            query_start=torch.tensor(starts, dtype=torch.int32, device=dev),
            query_lens_host=lens,
        )
        last = torch.tensor(starts[1:], device=dev) - 1
        return torch.tensor(ids, dtype=torch.long, device=dev), meta, last

    def decode_metadata(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata]:
        dev = self.device
        positions = [s.num_tokens - 1 for s in seqs]  # the newest token is not in the cache yet
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor([self._slot(s, p) for s, p in zip(seqs, positions)], dtype=torch.long,
                                      device=dev),
            block_tables=self._block_tables(seqs),
            seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev),
            is_prefill=False,
        )
        ids = torch.tensor([s.output_ids[-1] for s in seqs], dtype=torch.long, device=dev)
        return ids, meta

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        if is_prefill:
            ids, meta, last = self.prefill_metadata(seqs)
            hidden = self.model.forward(ids, meta, self.cache.layers)[last]
        else:
            ids, meta = self.decode_metadata(seqs)
            hidden = self.model.forward(ids, meta, self.cache.layers)
        logits = self.model.compute_logits(hidden)
        histories = [(s.prompt_ids, s.output_ids) for s in seqs]
        generators = [s.generator or self.generator for s in seqs]
        return sample(logits, [s.params for s in seqs], histories, generators).tolist()

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence logits of one prompt, float32 [T, V], through the same paged prefill path."""
        blocks = self.cache.blocks_for(len(token_ids))
        if blocks > self.cache.num_free_blocks:
            raise RuntimeError(f"KV cache has {self.cache.num_free_blocks} free blocks, {blocks} needed")
        seq = Sequence(token_ids, SamplingParams(max_tokens=1).resolved(), self.max_seq_len, None, frozenset(),
                       self.device)
        seq.blocks = self.cache.allocate(blocks)
        try:
            ids, meta, _ = self.prefill_metadata([seq])
            return self.model.compute_logits(self.model.forward(ids, meta, self.cache.layers))
        finally:
            self._release(seq)
