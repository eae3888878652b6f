"""The model on the engine's steps: prefill chunks, and the decode step on static buffers with CUDA graphs.

Decode rows are padded up to a batch bucket with rows that write nothing (slot -1, length 0). With graphs, each
bucket's forward (model and logits) is captured once, and each sampler form (`sampling.VARIANTS`) once per bucket
as a small graph that reads the forward's logits; a step replays the two back to back (a batch holding a structured
request, split: the forward, then the sampler once the host has written the masks; see engine.py).

Prefill runs eagerly, except with graphs a step of at most PREFILL_GRAPH_SEQS chunks and max(prefill_buckets) tokens
(short prompts, a burst of them, the uncached tail of a prefix-cache hit, the last chunk of a long prompt): its
tokens are padded up to a token bucket with rows that write nothing (slot -1, position 0; attention returns 0 there),
its sequences up to PREFILL_GRAPH_SEQS with empty ones (length 0), and the bucket's captured forward is replayed.
Eagerly, a short prompt's time to first token is the host's launch time (about a dozen launches and their Python per
layer), several times the GPU's. All graphs share one memory pool; each graph's output is consumed (sampled) before
another graph is replayed, which is what sharing the pool needs.

What crosses between host and device per decode step:
- host -> device: one copy of the per-row values (positions, cache slots, lengths, sampler parameters), staged in
  a pinned buffer (two, used in turn, so the host fills one while the other's copy may still be pending: `Staged`);
- nothing else: the input ids are gathered on the device from `last_token`, the newest sampled token of each
  sampler slot (written by the step that sampled it, prefill or decode); block tables live on the device, a row
  per slot written at admission, gathered into the batch's rows only when the batch's sequences change; when
  sequences take new blocks (each once per block_size tokens), one more copy and one scatter write them into both
  (`add_blocks`);
- device -> host: the sampled ids, into a pinned buffer with an event, read back by `Launched.token_ids` after
  the engine has launched the next step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from qwen2rt.models.backend import AttentionMetadata
from qwen2rt.models.qwen2 import Qwen2Model

from .kv_cache import KVCache
from .sampling import (MAX_LOGPROBS, VARIANTS, SamplerState, SamplingParams, SamplingRows, row_values, sample_tokens,
                       sampler_variant, to_device, token_logprobs)
from .sequence import Sequence

log = logging.getLogger("qwen2rt")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
# Prompt tokens a prefill graph is captured for. Up to 32 the projections are the decode GEMVs (kernels.gemv.MAX_ROWS);
# past 512, Qwen2-7B's prefill takes longer on an H100 than its eager launches take on the host (~10 ms of GEMMs),
# so a graph saves little and its padding would cost more.
DEFAULT_PREFILL_BUCKETS = (16, 32, 64, 128, 256, 384, 512)
# Sequences a prefill graph takes. Each is a slice of the attention grid (empty ones exit at once) and a row of the
# logits (the lm_head GEMV reads its weight once for all rows): cheap, and one graph per token bucket serves them all.
PREFILL_GRAPH_SEQS = 8
# Prompt positions whose logits one lm_head call computes for prompt log-probabilities: float32 [rows, V], 311 MB
# for Qwen2's vocabulary of 152064
PROMPT_LOGPROBS_ROWS = 512


TokenLogprobs = tuple[float, list[tuple[int, float]]]  # (the chosen token's log-probability, [(id, logprob)] top-N)


@dataclass
class Launched:
    """A step whose sampled ids are on their way to the host: one id per sequence of `seqs` (none for a prefill
    step that completed no prompt), and when some of them asked for log-probabilities, those too."""

    seqs: list[Sequence]
    host_ids: np.ndarray | None  # int64 [>= len(seqs)], pinned memory on CUDA; valid once `event` completed
    event: torch.cuda.Event | None  # None on CPU, where every copy is done when it returns
    # (chosen [>= B] float32, top [>= B, MAX_LOGPROBS] float32, top ids [>= B, MAX_LOGPROBS] int64), host copies
    host_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def token_ids(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host_ids[:len(self.seqs)].tolist() if self.seqs else []

    def logprobs(self) -> list[TokenLogprobs | None]:
        """Per sequence (after token_ids()): its token's log-probability and its top-N, None where it asked for
        none."""
        if self.host_logprobs is None:
            return [None] * len(self.seqs)
        chosen, top, ids = self.host_logprobs
        out: list[TokenLogprobs | None] = []
        for i, s in enumerate(self.seqs):
            n = s.params.logprobs
            out.append(None if n is None else (float(chosen[i]), list(zip(ids[i, :n].tolist(), top[i, :n].tolist()))))
        return out


@dataclass
class DecodeForward:
    """A decode step whose forward is enqueued and whose sampling is not yet (ModelRunner.launch_decode with split):
    the step's graphs (with CUDA graphs) or its logits (eagerly)."""

    seqs: list[Sequence]
    bucket: int
    variant: str
    want_logprobs: bool
    graph: StepGraphs | None = None
    logprob_graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class Staged:
    """Named arrays laid out in one device byte buffer, filled through host views and sent in one copy. The host
    fills a plain staging buffer; `send` copies it into one of two pinned buffers used in turn (waiting, on CUDA,
    for that buffer's copy two sends ago) and from there to the device, asynchronously: the host may fill the next
    values while a copy is pending."""

    def __init__(self, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: torch.device):
        self.cuda = device.type == "cuda"
        offsets, nbytes = {}, 0
        for name, (dtype, shape) in layout.items():
            # every array 16-byte aligned: Triton specialises a pointer argument on it (an unaligned one would be a
            # kernel variant of its own, compiled apart and with narrower loads)
            nbytes = -(-nbytes // 16) * 16
            size = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
            offsets[name] = (nbytes, size, dtype, shape)
            nbytes += size

        def views(raw: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: raw[o:o + size].view(dtype).view(shape) for name, (o, size, dtype, shape) in offsets.items()}

        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.device = views(self.buffer)
        self._staged = torch.zeros(nbytes, dtype=torch.uint8)
        self.host = {name: t.numpy() for name, t in views(self._staged).items()}
        self._pinned = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self._staged_np, self._pinned_np = self._staged.numpy(), [p.numpy() for p in self._pinned]
        self._copied = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self._next = 0

    def send(self) -> None:
        i = self._next
        self._next ^= 1
        if self.cuda:
            self._copied[i].synchronize()  # its last copy (two sends ago) is done: the buffer may be rewritten
        self._pinned_np[i][:] = self._staged_np
        self.buffer.copy_(self._pinned[i], non_blocking=self.cuda)
        if self.cuda:
            self._copied[i].record()


def _capturing(graph: torch.cuda.CUDAGraph, pool):
    """torch.cuda.graph in "thread_local" capture mode: only this thread's unsafe CUDA calls break the capture. In
    the default "global" mode any thread's (a cudaMalloc or a synchronisation by the application's other threads,
    on streams of their own) invalidates it, and graphs captured on first use (capture_graphs="lazy", a prefill
    bucket's first prompt) are captured while the application runs; vLLM captures in this mode too."""
    return torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")


class PrefillGraphError(RuntimeError):
    """Capturing a prefill CUDA graph failed (LLM(..., cuda_graph_prefill_tokens=()) keeps every prefill eager)."""


class StepGraphs:
    """One decode step as two CUDA graphs replayed back to back: the bucket's forward, then a sampler form."""

    def __init__(self, forward: torch.cuda.CUDAGraph, sample: torch.cuda.CUDAGraph):
        self.forward, self.sample = forward, sample


class ModelRunner:
    """Runs the model for the engine: `launch_prefill` (eager) and `launch_decode` (static buffers, graphs with
    `use_graphs`, else the same code eagerly). Both return a `Launched` without waiting for the device."""

    # the first three advance by one each step (positions, lengths and sampler steps are the context plus a per-row
    # offset), the slot mapping follows the positions, the rest stay while a sequence is in the batch
    INT_ROWS = ("positions", "seq_lens", "step", "slot_mapping", "top_k", "seed", "slot", "min_tokens", "bias")
    FLOAT_ROWS = ("temperature", "top_p", "min_p", "repetition", "presence", "frequency")

    def __init__(self, model: Qwen2Model, cache: KVCache, sampler: SamplerState, max_batch_size: int,
                 max_seq_len: int, use_graphs: bool, buckets=DEFAULT_BUCKETS, prefill_buckets=DEFAULT_PREFILL_BUCKETS,
                 max_prefill_tokens: int | None = None):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.use_graphs = use_graphs
        self.buckets = sorted({b for b in buckets if b < max_batch_size} | {max_batch_size})
        self.device = dev = model.device
        self.cuda = dev.type == "cuda"
        n = max_batch_size
        slots = sampler.padding_slot + 1  # one row per sampler slot and the padding row
        self.max_blocks = -(-max_seq_len // cache.block_size)

        # per-row values: int64 rows then float32 rows in one byte buffer, so that they cross in one copy; each row
        # starts 16-byte aligned (rows of a multiple of 4 elements), as the kernels reading them were compiled for
        # (see Staged)
        width = -(-n // 4) * 4
        self.values = Staged({"ints": (torch.int64, (len(self.INT_ROWS), width)),
                              "floats": (torch.float32, (len(self.FLOAT_ROWS), width))}, dev)
        self.ints, self.floats = self.values.device["ints"][:, :n], self.values.device["floats"][:, :n]
        # host side: the values of the current batch
        self._host_ints, self._host_floats = self.values.host["ints"][:, :n], self.values.host["floats"][:, :n]
        view = dict(zip(self.INT_ROWS, self.ints))
        view.update(zip(self.FLOAT_ROWS, self.floats))
        self.positions, self.slot_mapping, self.seq_lens = view["positions"], view["slot_mapping"], view["seq_lens"]
        self.rows = SamplingRows(*(view[f] for f in SamplingRows.FIELDS))
        self._bucket_rows = {b: SamplingRows(*(view[f][:b] for f in SamplingRows.FIELDS)) for b in self.buckets}

        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.last_token = torch.zeros(slots, dtype=torch.long, device=dev)  # each slot's newest sampled token
        # block tables: a row per slot, then the batch's rows and a last row that no step reads (add_blocks writes
        # there what is not in the batch), in one tensor so that add_blocks writes both in one scatter
        self._tables = torch.zeros(slots + n + 1, self.max_blocks, dtype=torch.int32, device=dev)
        self.slot_tables, self.block_tables = self._tables[:slots], self._tables[slots:]
        self.new_blocks = Staged({"index": (torch.int64, (2 * width,)), "blocks": (torch.int32, (2 * width,))}, dev)
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._host_tokens = [torch.zeros(n, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self._host_tokens_np = [t.numpy() for t in self._host_tokens]
        self._events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self._turn = 0  # which of the two read-back buffers the next decode step uses
        # log-probabilities (requests with SamplingParams.logprobs): the chosen token's and the top MAX_LOGPROBS,
        # computed after the sampler from the same logits, read back beside the ids
        self.logprob_bufs = (torch.zeros(n, device=dev), torch.zeros(n, MAX_LOGPROBS, device=dev),
                             torch.zeros(n, MAX_LOGPROBS, dtype=torch.long, device=dev))
        self._host_logprobs = [tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=self.cuda)
                                     for t in self.logprob_bufs) for _ in range(2)]
        self._logprob_graphs: dict[int, torch.cuda.CUDAGraph] = {}

        # The batch the staged values describe. Its first four int rows (positions, lengths, sampler steps, cache
        # slots) are _base + _launches: each launch advances every row by one token, and a row's cache slot too
        # until its newest token is the first of a block; then that row's slot is looked up in its blocks.
        self._batch: list[Sequence] | None = None
        self._bucket, self._variant = 0, VARIANTS[0]
        self._want_logprobs = False  # some sequence of the batch asked for log-probabilities
        self._guided = False  # some sequence of the batch has structured outputs (a mask per token)
        self._base = np.zeros((4, n), dtype=np.int64)
        self._launches = 0
        self._new_block: dict[int, list[int]] = {}  # launch count -> rows whose newest token then starts a block
        self._rows: dict[int, int] = {}  # sequence id -> its row in the staged batch
        padding = dict(zip(SamplingRows.FIELDS, row_values(SamplingParams(temperature=0).resolved(), 0, 0,
                                                          sampler.padding_slot)))
        # padding rows: position 0, slot -1 and length 0 (write and read nothing), the padding sampler row
        padding.update(positions=0, slot_mapping=-1, seq_lens=0)
        self._padding_ints = np.array([padding[f] for f in self.INT_ROWS], dtype=np.int64)
        self._padding_floats = np.array([padding[f] for f in self.FLOAT_ROWS], dtype=np.float32)

        self.graphs: dict[tuple[int, str], StepGraphs] = {}
        self._forward_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}  # each forward graph's output: the sampler graphs read it
        self._pool = None
        self._side_stream = None  # warm-up runs before each capture
        self.capture_s: float | None = None  # set by capture_all: every graph
        self.prefill_capture_s: float | None = None  # of which the prefill graphs
        self.capture_mib: float | None = None

        # Prefill graphs: the buckets a step can use (at most max_prefill_tokens tokens from prefill_seqs sequences
        # of at most max_seq_len - 1: the first bucket that holds that many, and those below it), static inputs for
        # the largest, one copy per step.
        self.prefill_seqs = p = min(PREFILL_GRAPH_SEQS, max_batch_size)
        cap = min(p * (max_seq_len - 1), max_prefill_tokens or p * max_seq_len)
        wanted = sorted({b for b in prefill_buckets if b >= 1})
        self.prefill_buckets = [b for i, b in enumerate(wanted) if i == 0 or wanted[i - 1] < cap]
        t = -(-max(self.prefill_buckets, default=0) // 2) * 2  # rows of 16-byte multiples (see Staged)
        self.prefill_values = Staged({"tokens": (torch.int64, (3, t)),  # input ids, positions, cache slots
                                      "last": (torch.int64, (p,)),  # the last rows of the prompts completed
                                      "slots": (torch.int64, (p,)),  # each chunk's sequence slot (block-table row)
                                      "seq_lens": (torch.int32, (p,)),  # each one's context after its chunk
                                      "query_start": (torch.int32, (p + 1,))}, dev)  # the chunks' rows
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # the sampling rows of a prefill step's completed prompts (rows_to_device), 16-byte aligned like the decode's
        self.first_rows = Staged({"ints": (torch.int64, (len(SamplingRows.INT_FIELDS), width)),
                                  "floats": (torch.float32, (len(self.FLOAT_ROWS), width))}, dev)
        self.prefill_logits: dict[int, torch.Tensor] = {}  # each prefill graph's output [seqs, V] float32
        self.prefill_replays = 0  # prefill steps that replayed a graph (the rest ran eagerly)
        self.prefill_capture_errors: dict[int, str] = {}  # buckets dropped when their capture on first use failed

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    # ---- sequences joining -----------------------------------------------------------------------------------
    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """A sequence took `slot` with these cache blocks (its prompt's): its block-table row on the device.
        Enqueued after every step launched before, which may still read the slot's old row."""
        self.slot_tables[slot, :len(blocks)].copy_(self.to_device(blocks, torch.int32))

    def add_blocks(self, grown: list[tuple[Sequence, int]]) -> None:
        """(sequence, index of its first new block): the new blocks join their slots' block-table rows on the device
        and, for sequences of the staged batch, its rows too (one copy and one scatter for both). A batch staged anew
        gathers its rows from the slots' rows."""
        rows = self._rows if self._batch is not None else {}
        first_row, w = self.slot_tables.shape  # the batch's rows follow the slots' in one tensor
        spare = self.block_tables.shape[0] - 1
        index, blocks = [], []
        for s, first in grown:
            row = first_row + rows.get(s.id, spare)
            for i, b in enumerate(s.blocks[first:], first):
                index += (s.slot * w + i, row * w + i)
                blocks += (b, b)
        host, dev = self.new_blocks.host, self.new_blocks.device
        width = len(host["index"])
        for start in range(0, len(index), width):  # one round: a sequence takes at most one block a step
            k = min(width, len(index) - start)
            host["index"][:k], host["blocks"][:k] = index[start:start + k], blocks[start:start + k]
            self.new_blocks.send()
            self._tables.view(-1).scatter_(0, dev["index"][:k], dev["blocks"][:k])

    def forget_batch(self) -> None:
        """A sequence was preempted: its slot, blocks and positions change, so the next decode step stages its batch
        anew even if it is made of the same sequences as the last one (which the runner otherwise only advances)."""
        self._batch = None

    # ---- prefill ---------------------------------------------------------------------------------------------
    def prefill_metadata(self, chunks: list[tuple[Sequence, int, int]]):
        """(sequence, first prompt position, token count) chunks -> (token ids [T], metadata, last row of each
        chunk [B])."""
        bs = self.cache.block_size
        ids, positions, slots, starts = [], [], [], [0]
        for s, start, n in chunks:
            ids.extend(s.prefill_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(s.blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            starts.append(starts[-1] + n)
        width = max(len(s.blocks) for s, _, _ in chunks)
        tables = [s.blocks + [0] * (width - len(s.blocks)) for s, _, _ in chunks]
        put = self.to_device
        meta = AttentionMetadata(
            positions=put(positions, torch.long),
            slot_mapping=put(slots, torch.long),
            block_tables=put(tables, torch.int32),
            seq_lens=put([start + n for _, start, n in chunks], torch.int32),
            is_prefill=True,
            query_start=put(starts, torch.int32),
            query_lens_host=[n for _, _, n in chunks],
        )
        last = put([i - 1 for i in starts[1:]], torch.long)
        return put(ids, torch.long), meta, last

    def rows_to_device(self, values: list[tuple]) -> SamplingRows:
        """A prefill step's sampling rows (sampling.row_values tuples, at most max_batch_size) as device tensors, in
        one copy through `first_rows`. The next step rewrites them only after this one's sampler (stream order)."""
        b, host = len(values), self.first_rows.host
        columns = dict(zip(SamplingRows.FIELDS, zip(*values)))
        host["ints"][:, :b] = [columns[f] for f in SamplingRows.INT_FIELDS]
        host["floats"][:, :b] = [columns[f] for f in self.FLOAT_ROWS]
        self.first_rows.send()
        fields = dict(zip(SamplingRows.INT_FIELDS, self.first_rows.device["ints"][:, :b]))
        fields.update(zip(self.FLOAT_ROWS, self.first_rows.device["floats"][:, :b]))
        return SamplingRows(*(fields[f] for f in SamplingRows.FIELDS))

    def _stage_prefill(self, chunks: list[tuple[Sequence, int, int]], bucket: int) -> None:
        """A prefill step's inputs, padded to `bucket` rows and PREFILL_GRAPH_SEQS sequences, into the prefill
        graphs' static buffers (one copy); no chunks stages padding only (capture). The completed prompts' last rows
        come first in `last`, in chunk order: their logits are the first rows of the graph's."""
        host = self.prefill_values.host
        tokens, query_start = host["tokens"], host["query_start"]
        tokens[:, :bucket] = np.array([0, 0, -1])[:, None]  # padding rows: token 0 at position 0, writing nothing
        host["slots"][:] = self.sampler.padding_slot  # empty sequences: the padding slot's block-table row (zeros),
        host["seq_lens"][:] = 0  # no context and no rows
        host["last"][:] = 0
        bs, row, done = self.cache.block_size, 0, []
        for i, (s, start, n) in enumerate(chunks):
            pos = np.arange(start, start + n)
            tokens[0, row:row + n] = s.prefill_ids[start:start + n]
            tokens[1, row:row + n] = pos
            tokens[2, row:row + n] = np.asarray(s.blocks)[pos // bs] * bs + pos % bs
            query_start[i] = row
            host["slots"][i] = s.slot
            host["seq_lens"][i] = start + n
            row += n
            if start + n == len(s.prefill_ids):
                done.append(row - 1)
        query_start[len(chunks):] = row
        host["last"][:len(done)] = done
        self.prefill_values.send()

    def _prefill_forward(self, bucket: int) -> torch.Tensor:
        """The padded prefill on the static buffers -> float32 logits [PREFILL_GRAPH_SEQS, V] of the `last` rows."""
        values = self.prefill_values.device
        ids, positions, slots = values["tokens"][:, :bucket]
        block_tables = self.slot_tables.index_select(0, values["slots"])  # the rows written at admission
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                                 seq_lens=values["seq_lens"], is_prefill=True, query_start=values["query_start"],
                                 query_lens_host=[bucket], padded=True)
        hidden = self.model.forward(ids, meta, self.cache.layers)
        return self.model.compute_logits(hidden.index_select(0, values["last"]))

    def to_device(self, values, dtype: torch.dtype | None) -> torch.Tensor:
        """A host list as a device tensor (sampling.to_device)."""
        return to_device(values, dtype, self.device)

    def graph_prefill_bucket(self, chunks: list[tuple[Sequence, int, int]]) -> int | None:
        """The token bucket whose graph runs this prefill step, or None (eager): with graphs, up to
        PREFILL_GRAPH_SEQS chunks within the largest bucket. (A step that completes no prompt, only with
        max_prefill_tokens <= 512, still computes the graph's logits rows: one lm_head read the eager path skips.)"""
        if not (self.use_graphs and len(chunks) <= self.prefill_seqs):
            return None
        tokens = sum(n for _, _, n in chunks)
        return next((b for b in self.prefill_buckets if b >= tokens), None)

    @torch.inference_mode()
    def launch_prefill(self, chunks: list[tuple[Sequence, int, int]]) -> Launched:
        """Run a prefill step of (sequence, first prompt position, token count) chunks; each sequence whose prompt
        it completes samples its first token from the hidden row of its last prompt token, which also becomes its
        first decode step's input."""
        with self.model.named_range("qwen2rt.prefill"):  # the profiler's range (profiling.prefill_kernel_ms)
            return self._launch_prefill(chunks)

    def _launch_prefill(self, chunks: list[tuple[Sequence, int, int]]) -> Launched:
        done = [i for i, (s, start, n) in enumerate(chunks) if start + n == len(s.prefill_ids)]
        seqs = [chunks[i][0] for i in done]
        with_prompt_logprobs = any(s.params.prompt_logprobs is not None for s, _, _ in chunks)
        bucket = None if with_prompt_logprobs else self.graph_prefill_bucket(chunks)  # graphs keep last rows only
        graph = None
        if bucket is not None:
            graph = self.prefill_graphs.get(bucket) or self._capture_prefill_on_first_use(bucket)
        if graph is not None:
            self._stage_prefill(chunks, bucket)  # after a capture, which stages padding
            graph.replay()
            self.prefill_replays += 1
            if not seqs:
                return Launched([], None, None)
            return self._sample_first(self.prefill_logits[bucket][:len(seqs)], seqs)
        ids, meta, last = self.prefill_metadata(chunks)
        hidden = self.model.forward(ids, meta, self.cache.layers)
        if with_prompt_logprobs:
            self._prompt_logprobs(chunks, hidden)
        if not seqs:
            return Launched([], None, None)
        if len(seqs) < len(chunks):  # the rows of the completed prompts (an index built on the device: a host
            last = last.index_select(0, self.to_device(done, torch.long))  # list would wait for it)
        return self._sample_first(self.model.compute_logits(hidden[last]), seqs)

    def _prompt_logprobs(self, chunks: list[tuple[Sequence, int, int]], hidden: torch.Tensor) -> None:
        """Append to each chunk's Sequence.prompt_logprobs (those that ask) the log-probabilities of the prompt
        tokens after its positions, from the chunk's hidden rows: lm_head over PROMPT_LOGPROBS_ROWS rows at a time
        (float32 [rows, V]), read back at once (this prefill step waits for the device). Positions already done (a
        preempted request's recompute) are skipped."""
        row = 0
        for s, start, n in chunks:
            k = s.params.prompt_logprobs
            m = min(n, len(s.prompt_ids) - 1 - start)  # positions followed by a prompt token (not the first output)
            first = max(0, len(s.prompt_logprobs) - 1 - start) if k is not None else m  # entry p + 1 is position p's
            for a in range(first, m, PROMPT_LOGPROBS_ROWS):
                b = min(m, a + PROMPT_LOGPROBS_ROWS)
                logits = self.model.compute_logits(hidden[row + a:row + b])
                targets = self.to_device(s.prompt_ids[start + 1 + a:start + 1 + b], torch.long)
                chosen, top, top_ids = (t.cpu() for t in token_logprobs(logits, targets, max(k, 1)))
                s.prompt_logprobs.extend((lp, list(zip(i[:k], v[:k]))) for lp, v, i in
                                         zip(chosen.tolist(), top.tolist(), top_ids.tolist()))
            row += n

    def _sample_first(self, logits: torch.Tensor, seqs: list[Sequence]) -> Launched:
        """Sample the first token of each of `seqs` from its float32 logits row [len(seqs), V]."""
        rows = self.rows_to_device([s.sampling_row() for s in seqs])
        tokens = sample_tokens(logits, rows, self.sampler, sampler_variant([s.params for s in seqs]))
        self.last_token.scatter_(0, rows.slot, tokens)
        host = torch.empty(tokens.shape, dtype=torch.long, pin_memory=self.cuda)
        host.copy_(tokens, non_blocking=self.cuda)
        host_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            host_logprobs = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda).copy_(
                t, non_blocking=self.cuda).numpy() for t in token_logprobs(logits, tokens))
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return Launched(seqs, host.numpy(), event, host_logprobs)

    # ---- decode ----------------------------------------------------------------------------------------------
    def launch_decode(self, seqs: list[Sequence], split: bool = False) -> Launched | DecodeForward:
        """One token for each sequence (each holds `num_launched` tokens, the newest not in the cache yet and
        possibly still on the device). Returns once the step is enqueued. The graph path runs outside inference
        mode (entering it costs the host more than the rest of a step's Python): nothing in it records autograd
        history, and graphs captured at start-up run outside it too.

        With `split`, a batch that holds a structured request is launched up to its sampling: its forward (model and
        logits) is enqueued, and the DecodeForward returned is for `sample_decode`, once the host has written the
        masks of the tokens in flight into the sampler's rows (the engine reads the step before back meanwhile,
        while the device runs this forward)."""
        if seqs != self._batch:
            bucket, variant = self.bucket(len(seqs)), sampler_variant([s.params for s in seqs])
            want_logprobs = any(s.params.logprobs is not None for s in seqs)
            guided = any(s.matcher is not None for s in seqs)
        else:
            bucket, variant, want_logprobs, guided = self._bucket, self._variant, self._want_logprobs, self._guided
        try:
            if self.use_graphs:
                # capture fills padding rows, so the real batch is filled after it
                graph = self.graphs.get((bucket, variant)) or self.capture(bucket, variant)
                logprob_graph = None
                if want_logprobs:
                    logprob_graph = self._logprob_graphs.get(bucket) or self.capture_logprobs(bucket)
                self._fill(seqs, bucket)
                graph.forward.replay()
                if split and guided:
                    self._launches += 1
                    return DecodeForward(self._batch, bucket, variant, want_logprobs, graph, logprob_graph)
                graph.sample.replay()
                if logprob_graph is not None:
                    logprob_graph.replay()
            else:
                self._fill(seqs, bucket)
                with torch.inference_mode(), self.model.named_range("qwen2rt.decode_step"):  # the profiler's range
                    logits = self._forward(bucket)
                    if split and guided:
                        self._launches += 1
                        return DecodeForward(self._batch, bucket, variant, want_logprobs, logits=logits)
                    self._sample(logits, bucket, variant)
                    if want_logprobs:
                        self._logprobs(logits, bucket)
        except BaseException:
            self._batch = None  # the staged values may be half-advanced: stage them again on the next step
            raise
        self._launches += 1
        return self._read_back(self._batch, want_logprobs)

    def sample_decode(self, forward: DecodeForward) -> Launched:
        """Sample the step whose forward `launch_decode(..., split=True)` enqueued (before any other step is
        launched), then enqueue the read-back of its ids."""
        try:
            if forward.graph is not None:
                forward.graph.sample.replay()
                if forward.logprob_graph is not None:
                    forward.logprob_graph.replay()
            else:
                with torch.inference_mode(), self.model.named_range("qwen2rt.decode_sample"):
                    self._sample(forward.logits, forward.bucket, forward.variant)
                    if forward.want_logprobs:
                        self._logprobs(forward.logits, forward.bucket)
        except BaseException:
            self._batch = None
            raise
        return self._read_back(forward.seqs, forward.want_logprobs)

    def _read_back(self, seqs: list[Sequence], want_logprobs: bool) -> Launched:
        """Enqueue the copies of a sampled decode step's ids (and log-probabilities) to the host, and its event."""
        turn = self._turn
        self._host_tokens[turn].copy_(self.tokens, non_blocking=self.cuda)  # all rows: slicing costs more
        host_logprobs = None
        if want_logprobs:
            for host, buf in zip(self._host_logprobs[turn], self.logprob_bufs):
                host.copy_(buf, non_blocking=self.cuda)
            host_logprobs = tuple(t.numpy() for t in self._host_logprobs[turn])
        event = None
        if self.cuda:
            event = self._events[turn]
            event.record()
        self._turn ^= 1  # once this turn's read-back is enqueued: a failure before leaves the turn to this step
        return Launched(seqs, self._host_tokens_np[turn], event, host_logprobs)

    def _fill(self, seqs: list[Sequence], bucket: int) -> None:
        """Host -> the static buffers, in one copy. A batch of other sequences than the last step's (or another
        bucket) is staged row by row and gathers its block tables on the device; the same batch only advances its
        positions, cache slots, lengths and sampler steps, computed on all rows at once."""
        b = len(seqs)
        rebuilt = seqs != self._batch or bucket != self._bucket
        if rebuilt:
            self._stage(seqs, bucket)
        for row in self._new_block.pop(self._launches, ()):
            self._look_up_slot(row)
        np.add(self._base[:, :b], self._launches, out=self._host_ints[:4, :b])
        self.values.send()
        if rebuilt:  # the batch's block-table rows, from the slots' rows (padding rows get the zero padding row)
            torch.index_select(self.slot_tables, 0, self.rows.slot[:bucket], out=self.block_tables[:bucket])

    def _stage(self, seqs: list[Sequence], bucket: int) -> None:
        """A new batch: every value of every row, from the sequences."""
        b = len(seqs)
        ints, floats = self._host_ints, self._host_floats
        ints[:, b:] = self._padding_ints[:, None]
        floats[:, b:] = self._padding_floats[:, None]
        if seqs:
            rows = [dict(zip(SamplingRows.FIELDS, s.sampling_row())) for s in seqs]
            ints[4:, :b] = [[r[f] for r in rows] for f in self.INT_ROWS[4:]]
            floats[:, :b] = [[r[f] for r in rows] for f in self.FLOAT_ROWS]
            context = [s.num_launched for s in seqs]  # = this step's seq_lens
            self._base[:3, :b] = [[c - 1 for c in context], context,
                                  [c - len(s.prompt_ids) for c, s in zip(context, seqs)]]
        self._launches = 0
        self._batch = list(seqs)
        self._rows = {s.id: row for row, s in enumerate(seqs)}
        self._bucket, self._variant = bucket, sampler_variant([s.params for s in seqs])
        self._want_logprobs = any(s.params.logprobs is not None for s in seqs)
        self._guided = any(s.matcher is not None for s in seqs)  # some sequence has structured outputs
        self._new_block = {}
        for row in range(b):
            self._look_up_slot(row)

    def _look_up_slot(self, row: int) -> None:
        """The row's cache slot for its newest token (this step writes its k/v), and the launch at which the
        slot stops advancing by one (the token after the block's last)."""
        bs = self.cache.block_size
        pos = int(self._base[0, row]) + self._launches
        self._base[3, row] = self._batch[row].blocks[pos // bs] * bs + pos % bs - self._launches
        self._new_block.setdefault(self._launches + bs - pos % bs, []).append(row)

    def _forward(self, bucket: int) -> torch.Tensor:
        b = bucket
        torch.index_select(self.last_token, 0, self.rows.slot[:b], out=self.input_ids[:b])
        meta = AttentionMetadata(positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
                                 block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b], is_prefill=False)
        hidden = self.model.forward(self.input_ids[:b], meta, self.cache.layers)
        return self.model.compute_logits(hidden)

    def _sample(self, logits: torch.Tensor, bucket: int, variant: str) -> None:
        rows = self._bucket_rows[bucket]
        tokens = sample_tokens(logits, rows, self.sampler, variant)
        self.tokens[:bucket].copy_(tokens)
        self.last_token.scatter_(0, rows.slot, tokens)  # the next step's inputs (padding rows: the padding slot)

    def _logprobs(self, logits: torch.Tensor, bucket: int) -> None:
        """The sampled tokens' log-probabilities and the top MAX_LOGPROBS, from the logits before any sampling
        transform (the sampler does not modify them), into the static buffers."""
        for buf, value in zip(self.logprob_bufs, token_logprobs(logits, self.tokens[:bucket])):
            buf[:bucket].copy_(value)

    # ---- CUDA graphs -----------------------------------------------------------------------------------------
    def capture(self, bucket: int, variant: str) -> StepGraphs:
        """Warm up (compiles kernels) and capture the bucket's forward (once per bucket) and the sampler form, with
        padding-only inputs, which write nothing."""
        logits = self._padded_logits(bucket)
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._sample(self._forward(bucket) if logits is None else logits, bucket, variant)
        torch.cuda.current_stream().wait_stream(stream)
        if bucket not in self._forward_graphs:
            graph = torch.cuda.CUDAGraph()
            with _capturing(graph, self._pool):
                self._logits[bucket] = self._forward(bucket)
            if self._pool is None:
                self._pool = graph.pool()
            self._forward_graphs[bucket] = graph
        sample = torch.cuda.CUDAGraph()
        with _capturing(sample, self._pool):
            self._sample(self._logits[bucket], bucket, variant)
        self.graphs[(bucket, variant)] = StepGraphs(self._forward_graphs[bucket], sample)
        return self.graphs[(bucket, variant)]

    def _padded_logits(self, bucket: int) -> torch.Tensor | None:
        """Stage padding-only inputs and return the bucket's forward-graph logits after a replay on them, for a
        warm-up that reads them (no kernel writes them but the graph's replays: unreplayed, they are unwritten pool
        memory, and a garbage token would index the sampler's state); None while the forward is not captured (its
        logits are set inside the capture, so one that failed leaves them without a graph)."""
        self._fill([], bucket)
        if bucket not in self._forward_graphs:
            return None
        self._forward_graphs[bucket].replay()
        return self._logits[bucket]

    def _capture_stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:  # one for every capture: each new stream would get its own cuBLAS workspace
            self._side_stream = torch.cuda.Stream()
        return self._side_stream

    def capture_prefill(self, bucket: int) -> torch.cuda.CUDAGraph:
        """Warm up (compiles kernels) and capture the padded prefill of `bucket` tokens, with padding-only inputs,
        which write nothing."""
        self._stage_prefill([], bucket)
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            self._prefill_forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _capturing(graph, self._pool), torch.inference_mode():
            self.prefill_logits[bucket] = self._prefill_forward(bucket)
        if self._pool is None:
            self._pool = graph.pool()
        self.prefill_graphs[bucket] = graph
        return graph

    def _capture_prefill_on_first_use(self, bucket: int) -> torch.cuda.CUDAGraph | None:
        """capture_prefill at a bucket's first prefill (capture_graphs="lazy"). A prefill graph only saves launch
        time, so when its capture fails the request goes on: the bucket is dropped (this step runs eagerly, later ones
        take the next larger bucket or run eagerly, none tries this capture again), and the error is logged and kept
        in prefill_capture_errors. At start-up capture_all raises instead (PrefillGraphError)."""
        try:
            return self.capture_prefill(bucket)
        except Exception as e:
            self.prefill_buckets = [b for b in self.prefill_buckets if b != bucket]
            self.prefill_logits.pop(bucket, None)  # set inside the capture (the graph is stored only on success)
            self.prefill_capture_errors[bucket] = repr(e)
            log.warning("capturing the prefill graph of %d tokens failed (%r): its prefills run eagerly", bucket, e)
            return None

    def capture_logprobs(self, bucket: int) -> torch.cuda.CUDAGraph:
        """Capture the log-probabilities of a bucket (read the forward graph's logits and the sampled tokens), replayed
        after the step's graphs when the batch asks for them."""
        if bucket not in self._forward_graphs:
            self.capture(bucket, VARIANTS[0])
        logits = self._padded_logits(bucket)
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._logprobs(logits, bucket)  # warm-up
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _capturing(graph, self._pool):
            self._logprobs(self._logits[bucket], bucket)
        self._logprob_graphs[bucket] = graph
        return graph

    def capture_all(self) -> None:
        """Capture every prefill bucket, and every decode bucket with every sampler form; log time and memory in one
        line."""
        torch.cuda.synchronize()
        reserved_before = torch.cuda.memory_reserved()  # the graphs' pool comes from torch's caching allocator
        start = time.perf_counter()
        for bucket in reversed(self.prefill_buckets):  # largest first: the smaller ones reuse its pool
            if bucket not in self.prefill_graphs:
                try:
                    self.capture_prefill(bucket)
                except Exception as e:
                    raise PrefillGraphError(f"capturing the prefill graph of {bucket} tokens failed: {e!r}") from e
        torch.cuda.synchronize()
        self.prefill_capture_s = time.perf_counter() - start
        for bucket in reversed(self.buckets):
            for variant in VARIANTS:
                if (bucket, variant) not in self.graphs:
                    self.capture(bucket, variant)
            if bucket not in self._logprob_graphs:
                self.capture_logprobs(bucket)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        self.capture_mib = (torch.cuda.memory_reserved() - reserved_before) / 2 ** 20
        log.warning("captured %d prefill CUDA graphs (tokens %s) in %.2f s, %d decode forward graphs (buckets %s) and "
                    "%d sampler graphs (%s): %.2f s, %.0f MiB in all", len(self.prefill_graphs),
                    self.prefill_buckets, self.prefill_capture_s, len(self._forward_graphs), self.buckets,
                    len(self.graphs), "/".join(VARIANTS), self.capture_s, self.capture_mib)
