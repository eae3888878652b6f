"""The engine: requests (`Sequence`), a first-come-first-served scheduler over the paged KV cache, eager chunked
prefill, and decode through `DecodeRunner` (static buffers, one CUDA graph per batch bucket, sampling inside).

A step either prefills the next chunk of admitted prompts (at most `max_prefill_tokens` tokens) or decodes one
token for every sequence whose prompt is done; while both kinds of work wait, steps alternate, so a long prompt
never starves running decodes. Finished sequences leave and free their blocks between steps; waiting ones join
when a slot and enough blocks are free. A sequence reserves blocks for its prompt plus its whole token budget
when admitted, so a running sequence never runs out of cache.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque

import torch

from qwen2rt.models.backend import AttentionMetadata
from qwen2rt.models.qwen2 import Qwen2Model

from .kv_cache import KVCache
from .sampling import (VARIANTS, SamplerState, SamplingParams, SamplingRows, row_values, rows_tensor, sample_tokens,
                       sampler_variant)
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("qwen2rt")
_ids = itertools.count()
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


class Sequence:
    """One request: its tokens, text, stop conditions, cache blocks, sampler slot and timings."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_seq_len: int,
                 tokenizer: Tokenizer | None, eos_token_ids: frozenset[int], prompt: str | None = None):
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
        self.slot: int | None = None  # row in the sampler state while running
        self.seed: int | None = params.seed  # the engine draws one at admission when the request has none
        self.num_prefilled = 0  # prompt tokens whose k/v are in the cache
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
    def prefill_done(self) -> bool:
        return self.num_prefilled == len(self.prompt_ids)

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

    def sampling_row(self) -> tuple:
        return row_values(self.params, self.seed, len(self.output_ids), self.slot)


class DecodeRunner:
    """The decode step on static buffers: one token for each of up to max_batch_size sequences, batch padded up to a
    bucket with rows that write nothing (slot -1, length 0). With `use_graphs`, each (bucket, sampler variant) is
    captured once as a CUDA graph (all graphs share one memory pool) and replayed; otherwise the same code runs
    eagerly. The host fills the buffers, replays, and reads back the sampled ids: the only synchronisation."""

    def __init__(self, model: Qwen2Model, cache: KVCache, sampler: SamplerState, max_batch_size: int,
                 max_seq_len: int, use_graphs: bool, buckets=DEFAULT_BUCKETS):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.use_graphs = use_graphs
        self.buckets = sorted({b for b in buckets if b < max_batch_size} | {max_batch_size})
        dev, n = model.device, max_batch_size
        self.max_blocks = -(-max_seq_len // cache.block_size)
        # Two packed buffers, so one step's inputs cross to the device in three copies (ints, floats, tables).
        self.ints = torch.zeros(len(self.INT_ROWS), n, dtype=torch.long, device=dev)
        self.floats = torch.zeros(len(self.FLOAT_ROWS), n, dtype=torch.float32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        view = dict(zip(self.INT_ROWS, self.ints))
        view.update(zip(self.FLOAT_ROWS, self.floats))
        self.input_ids, self.positions = view["input_ids"], view["positions"]
        self.slot_mapping, self.seq_lens = view["slot_mapping"], view["seq_lens"]
        self.rows = SamplingRows(*(view[f] for f in SamplingRows.FIELDS))
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._side_stream = None  # warm-up runs before each capture
        self.capture_s: float | None = None  # set by capture_all
        self.capture_mib: float | None = None
        padding = dict(zip(SamplingRows.FIELDS, row_values(SamplingParams(temperature=0).resolved(), 0, 0,
                                                          sampler.padding_slot)))
        # padding rows: token 0 at position 0, slot -1 and length 0 (write and read nothing), the padding sampler row
        padding.update(input_ids=0, positions=0, slot_mapping=-1, seq_lens=0)
        self._padding_ints = [padding[f] for f in self.INT_ROWS]
        self._padding_floats = [padding[f] for f in self.FLOAT_ROWS]

    INT_ROWS = ("input_ids", "positions", "slot_mapping", "seq_lens", "top_k", "seed", "step", "slot")
    FLOAT_ROWS = ("temperature", "top_p", "min_p", "repetition", "presence", "frequency")

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _fill(self, seqs: list[Sequence], bucket: int) -> None:
        """Host -> static buffers. Only the block-table columns in use are copied: kernels never read a column
        past a sequence's length, so stale entries there are harmless."""
        bs = self.cache.block_size
        ints, floats, tables = [], [], []
        width = max((len(s.blocks) for s in seqs), default=0)
        for s in seqs:
            p = s.num_tokens - 1  # the newest token is not in the cache yet
            row = dict(zip(SamplingRows.FIELDS, s.sampling_row()))
            row.update(input_ids=s.output_ids[-1], positions=p, slot_mapping=s.blocks[p // bs] * bs + p % bs,
                       seq_lens=p + 1)
            ints.append([row[f] for f in self.INT_ROWS])
            floats.append([row[f] for f in self.FLOAT_ROWS])
            tables.append(s.blocks + [0] * (width - len(s.blocks)))
        for _ in range(bucket - len(seqs)):
            ints.append(self._padding_ints)
            floats.append(self._padding_floats)
        self.ints[:, :bucket].copy_(torch.tensor(ints, dtype=torch.long).T, non_blocking=True)
        self.floats[:, :bucket].copy_(torch.tensor(floats, dtype=torch.float32).T, non_blocking=True)
        if width:
            self.block_tables[:len(seqs), :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    def _step(self, bucket: int, variant: str) -> None:
        b = bucket
        meta = AttentionMetadata(positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
                                 block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b], is_prefill=False)
        hidden = self.model.forward(self.input_ids[:b], meta, self.cache.layers)
        logits = self.model.compute_logits(hidden)
        rows = SamplingRows(*(getattr(self.rows, f)[:b] for f in SamplingRows.FIELDS))
        self.tokens[:b].copy_(sample_tokens(logits, rows, self.sampler, variant))

    def run(self, seqs: list[Sequence]) -> list[int]:
        bucket = self.bucket(len(seqs))
        variant = sampler_variant([s.params for s in seqs])
        if self.use_graphs:
            graph = self.graphs.get((bucket, variant)) or self.capture(bucket, variant)  # capture fills padding rows
            self._fill(seqs, bucket)
            graph.replay()
        else:
            self._fill(seqs, bucket)
            with self.model.named_range("qwen2rt.decode_step"):  # its kernels' device time, for the profiler
                self._step(bucket, variant)
        return self.tokens[:len(seqs)].tolist()

    def capture(self, bucket: int, variant: str) -> torch.cuda.CUDAGraph:
        """Warm up (compiles kernels) and capture one bucket with padding-only inputs, which write nothing."""
        self._fill([], bucket)
        if self._side_stream is None:  # one for every capture: each new stream would get its own cuBLAS workspace
            self._side_stream = torch.cuda.Stream()
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(bucket, variant)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(bucket, variant)
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[(bucket, variant)] = graph
        return graph

    def capture_all(self) -> None:
        """Capture every bucket with every sampler variant, and log time and memory in one line."""
        torch.cuda.synchronize()
        reserved_before = torch.cuda.memory_reserved()  # the graphs' pool comes from torch's caching allocator
        start = time.perf_counter()
        for bucket in reversed(self.buckets):  # largest first: the smaller ones reuse its pool
            for variant in VARIANTS:
                if (bucket, variant) not in self.graphs:
                    self.capture(bucket, variant)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        self.capture_mib = (torch.cuda.memory_reserved() - reserved_before) / 2 ** 20
        log.warning("captured %d decode CUDA graphs (buckets %s, sampler variants %s) in %.2f s, %.0f MiB",
                    len(self.graphs), self.buckets, "/".join(VARIANTS), self.capture_s, self.capture_mib)


class Engine:
    def __init__(self, model: Qwen2Model, kv_cache: KVCache, max_batch_size: int, max_seq_len: int, seed: int,
                 max_prefill_tokens: int = 2048, use_graphs: bool = False, graph_buckets=DEFAULT_BUCKETS):
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.model = model
        self.cache = kv_cache
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.rng = random.Random(seed)  # seeds of requests that bring none
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.device = model.device
        self.sampler = SamplerState(max_batch_size, model.config.vocab_size, self.device)
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.decoder = DecodeRunner(model, kv_cache, self.sampler, max_batch_size, max_seq_len, use_graphs,
                                    graph_buckets)
        self._decode_turn = False

    # ---- scheduling -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        need = self.cache.blocks_for(seq.max_len)
        if need > self.cache.num_blocks:
            raise ValueError(f"request needs {need} KV cache blocks ({seq.max_len} tokens) but the cache holds "
                             f"{self.cache.num_blocks}; lower max_tokens or give the cache more blocks")
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks and slot."""
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
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            need = self.cache.blocks_for(seq.max_len)
            if need > self.cache.num_free_blocks:
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            seq.blocks = self.cache.allocate(need)
            seq.slot = self.free_slots.pop()
            if seq.seed is None:
                seq.seed = self.rng.getrandbits(63)
            self.sampler.reset(seq.slot, seq.prompt_ids)
            self.running.append(seq)

    def step(self) -> list[Sequence]:
        """Run one prefill chunk or one decode step; -> the sequences that received a token."""
        self._admit()
        pending = [s for s in self.running if not s.prefill_done]
        ready = [s for s in self.running if s.prefill_done]
        if pending and (not ready or not self._decode_turn):
            seqs, tokens = self._prefill(pending)
            self._decode_turn = True
        elif ready:
            seqs, tokens = ready, self._decode(ready)
            self._decode_turn = False
        else:
            return []
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

    @torch.inference_mode()
    def _prefill(self, pending: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """The next chunk of each pending prompt, up to max_prefill_tokens in all (first come first). Sequences
        whose prompt completes sample their first token."""
        chunks, budget = [], self.max_prefill_tokens
        for s in pending:
            n = min(len(s.prompt_ids) - s.num_prefilled, budget)
            if n <= 0:
                break
            chunks.append((s, s.num_prefilled, n))
            budget -= n
        ids, meta, last = self.prefill_metadata(chunks)
        hidden = self.model.forward(ids, meta, self.cache.layers)
        for s, start, n in chunks:
            s.num_prefilled = start + n
        done = [i for i, (s, _, _) in enumerate(chunks) if s.prefill_done]
        if not done:
            return [], []
        seqs = [chunks[i][0] for i in done]
        logits = self.model.compute_logits(hidden[last[done]])
        rows = rows_tensor([s.sampling_row() for s in seqs], self.device)
        tokens = sample_tokens(logits, rows, self.sampler, sampler_variant([s.params for s in seqs]))
        return seqs, tokens.tolist()

    def prefill_metadata(self, chunks: list[tuple[Sequence, int, int]]):
        """(sequence, first prompt position, token count) chunks -> (token ids [T], metadata, last row of each
        chunk [B])."""
        ids, positions, slots, starts = [], [], [], [0]
        for s, start, n in chunks:
            ids.extend(s.prompt_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slot(s, p) for p in range(start, start + n))
            starts.append(starts[-1] + n)
        dev = self.device
        width = max(len(s.blocks) for s, _, _ in chunks)
        tables = [s.blocks + [0] * (width - len(s.blocks)) for s, _, _ in chunks]
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([start + n for _, start, n in chunks], dtype=torch.int32, device=dev),
            is_prefill=True,
            query_start=torch.tensor(starts, dtype=torch.int32, device=dev),
            query_lens_host=[n for _, _, n in chunks],
        )
        last = torch.tensor(starts[1:], device=dev) - 1
        return torch.tensor(ids, dtype=torch.long, device=dev), meta, last

    @torch.inference_mode()
    def _decode(self, seqs: list[Sequence]) -> list[int]:
        return self.decoder.run(seqs)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence logits of one prompt, float32 [T, V], through the same paged prefill path."""
        blocks = self.cache.blocks_for(len(token_ids))
        if blocks > self.cache.num_free_blocks:
            raise RuntimeError(f"KV cache has {self.cache.num_free_blocks} free blocks, {blocks} needed")
        seq = Sequence(token_ids, SamplingParams(max_tokens=1).resolved(), self.max_seq_len, None, frozenset())
        seq.blocks = self.cache.allocate(blocks)
        try:
            ids, meta, _ = self.prefill_metadata([(seq, 0, len(token_ids))])
            return self.model.compute_logits(self.model.forward(ids, meta, self.cache.layers))
        finally:
            self._release(seq)
