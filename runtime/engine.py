"""The engine: ties the scheduler (scheduler.py), the model runner (model_runner.py) and the requests
(sequence.py), and keeps the device one step ahead of the host.

`step()` launches the next step before it reads back the one in flight, so the host's work on step N's tokens
(detokenizing, stop strings, streams, freeing finished sequences) overlaps the device's work on step N+1:

    call k:   admit waiting requests | launch step N+1 | read back step N's ids, append them to their sequences
    call k+1: admit                  | launch step N+2 | read back step N+1's ...

Step N+1 is planned without step N's tokens: its inputs come from the device (each slot's newest sampled token),
and a sequence that turns out to have stopped at step N (a stop token or string; a length limit is known in
advance) still computes one token in step N+1, which is dropped when read back. Whatever such a row writes (a
cache slot past its end, its sampler slot's counts, its newest-token entry) belongs to a sequence that is being
released, and the next owner of those blocks and that slot is admitted in a later call: its sampler row is reset,
its block-table row and newest token written, and each of its cache slots written before it is read, all in work
enqueued after step N+1, so stream order keeps every other request's state intact. Blocks shared through the
prefix cache are full blocks whose writes were launched before any reader's step or earlier in the same one, and
are never written again (scheduler.py). On CPU every launch runs to completion before it returns; the code path is
the same.

A structured request (SamplingParams.structured_outputs) may sample only the tokens its next mask allows, and that
mask depends on its token in flight. So a decode step that holds one is launched in two halves: its forward before
the step in flight is read back, its sampling after, once the masks of the tokens read back are written:

    call k:   admit | launch step N+1's forward | read back step N, masks into the sampler | N+1's sampling

The device runs the forward (nearly all of a step's time) while the host reads back, advances the grammars and
computes the masks; it waits for the host only if that takes longer. The rest of the batch goes on as before. A
prefill step is launched whole: the requests it samples have their masks written at admission (one preempted with a
token in flight and admitted again has that token dropped as stale, and its mask from the tokens read back).
`Engine.split_structured_steps = False` reads a step that holds a structured request's token back before the next
launch instead (the device idles meanwhile; for benchmarks).
"""

from __future__ import annotations

import time

import torch

from qwen2rt.models.qwen2 import Qwen2Model

from .kv_cache import KVCache
from .model_runner import DEFAULT_BUCKETS, DEFAULT_PREFILL_BUCKETS, DecodeForward, Launched, ModelRunner
from .sampling import SamplerState, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

__all__ = ["DEFAULT_BUCKETS", "DEFAULT_PREFILL_BUCKETS", "Engine", "Sequence"]


class Engine:
    def __init__(self, model: Qwen2Model, kv_cache: KVCache, max_batch_size: int, max_seq_len: int, seed: int,
                 max_prefill_tokens: int = 2048, use_graphs: bool = False, graph_buckets=DEFAULT_BUCKETS,
                 enable_prefix_caching: bool = True, prefill_graph_buckets=DEFAULT_PREFILL_BUCKETS,
                 scheduling_policy: str = "fcfs"):
        self.model = model
        self.cache = kv_cache
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = model.device
        self.scheduler = Scheduler(kv_cache, max_batch_size, max_prefill_tokens, seed, enable_prefix_caching,
                                   scheduling_policy)
        self.sampler = SamplerState(max_batch_size, model.config.vocab_size, self.device)
        self.runner = ModelRunner(model, kv_cache, self.sampler, max_batch_size, max_seq_len, use_graphs,
                                  graph_buckets, prefill_graph_buckets, max_prefill_tokens)
        self._in_flight: Launched | None = None  # launched, its ids not read back yet
        self.split_structured_steps = True  # see the module's docstring

    @property
    def decoder(self) -> ModelRunner:
        """The model runner (its graphs, buckets and capture times), under the name benchmarks and tests use."""
        return self.runner

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def free_slots(self) -> list[int]:
        return self.scheduler.free_slots

    @property
    def enable_prefix_caching(self) -> bool:
        return self.scheduler.enable_prefix_caching

    @property
    def num_preemptions(self) -> int:
        """Sequences preempted so far (their blocks taken back when the cache ran out; see scheduler.py)."""
        return self.scheduler.num_preemptions

    def prefix_cache_stats(self) -> dict[str, int]:
        """Counters for metrics: queried_tokens (prompt tokens of admitted requests, looked up in the prefix cache),
        hit_tokens (of those, found there: not prefilled), cached_blocks (blocks holding a cache entry, in use or
        not), evictable_blocks (cached blocks no request holds), free_blocks (blocks a request may take: never
        cached or evictable), evictions (cache entries dropped to make room), block_size."""
        cache = self.cache
        return dict(queried_tokens=self.scheduler.queried_tokens, hit_tokens=self.scheduler.hit_tokens,
                    cached_blocks=cache.num_cached_blocks, evictable_blocks=cache.num_evictable_blocks,
                    free_blocks=cache.num_free_blocks, evictions=cache.evictions, block_size=cache.block_size)

    # ---- requests ---------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks and slot; a token of it still in flight is dropped."""
        self.scheduler.finish(seq)
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- steps ------------------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Launch the next step, then read back the one launched before (on the first call, launch two) and hand
        its tokens to their sequences. -> the sequences that received a token."""
        self._admit()
        if self._in_flight is None:
            self._in_flight = self._launch(split=False)  # no token in flight: every mask is known
            if self._in_flight is None:
                return []
        if self.split_structured_steps:
            ahead = self._launch(split=True)
        else:  # the step in flight is read back first if it holds a structured request's token
            ahead = None if any(s.matcher is not None for s in self._in_flight.seqs) else self._launch(split=False)
        done, self._in_flight = self._in_flight, None
        try:
            received = self._receive(done)
        except BaseException:
            # the step's tokens are lost (an interrupt, or a device error surfacing at the read-back): its sequences
            # were planned as if they had them, so they could never finish; they end here instead
            for seq in done.seqs:
                if seq.finish_reason is None:
                    self.abort(seq)
            try:  # the step launched ahead still gets its sampling (or its sequences end): the first error is raised
                self._in_flight = self._sample(ahead) if isinstance(ahead, DecodeForward) else ahead
            except BaseException:
                pass
            raise
        self._in_flight = self._sample(ahead) if isinstance(ahead, DecodeForward) else ahead
        return received

    def _admit(self) -> None:
        preemptions = self.scheduler.num_preemptions
        admitted = self.scheduler.admit()
        if self.scheduler.num_preemptions != preemptions:  # to make room for a more urgent request (priority)
            self.runner.forget_batch()
        for seq in admitted:
            # enqueued after every step already launched, which may still use the slot's or the blocks' old owner
            self.sampler.reset(seq.slot, seq.prompt_ids, seq.params.logit_bias,
                               seq.stop_ids if seq.params.min_tokens else None, seq.output_ids,
                               seq.params.allowed_token_ids)
            if seq.matcher is not None and not self._guide(seq):
                continue
            self.runner.set_blocks(seq.slot, seq.blocks)

    def _launch(self, split: bool) -> Launched | DecodeForward | None:
        """Plan and launch the next step (None: there is none). With `split`, a decode step that holds a structured
        request is launched up to its sampling (-> its DecodeForward, for `_sample` once the masks are written)."""
        preemptions = self.scheduler.num_preemptions
        plan = self.scheduler.next_step()
        if self.scheduler.num_preemptions != preemptions:
            self.runner.forget_batch()
        if plan is None:
            return None
        kind, work = plan
        try:
            grown = [(s, i) for s, i in self.scheduler.grown if s.slot is not None]  # (not preempted after)
            if grown:
                self.runner.add_blocks(grown)
            for seq in self.scheduler.retabled:  # cached blocks in place of some of its own (Scheduler._take_cached)
                self.runner.set_blocks(seq.slot, seq.blocks)
            launched = self.runner.launch_prefill(work) if kind == "prefill" else self.runner.launch_decode(work, split)
        except BaseException:
            # a launch that fails part-way may already have sampled (the slots' penalty counts and next input ids
            # written) with the host none the wiser: its sequences cannot go on consistently, so they end here
            # (a copy of the list first: decode's is the scheduler's own, which aborting edits)
            for seq in [s for s, _, _ in work] if kind == "prefill" else list(work):
                self.abort(seq)
            if kind == "prefill":
                self.scheduler.not_launched()
            raise
        if kind == "prefill":
            self.scheduler.prefilled(work)
        self.scheduler.launched(launched.seqs)
        return launched

    def _sample(self, forward: DecodeForward) -> Launched:
        """Launch the sampling of a decode step whose forward was launched (Engine._launch with split); if that
        fails, its sequences end, as for a failed launch."""
        try:
            return self.runner.sample_decode(forward)
        except BaseException:
            for seq in list(forward.seqs):
                if seq.finish_reason is None:
                    self.abort(seq)
            raise

    def _receive(self, launched: Launched) -> list[Sequence]:
        """Wait for a launched step's ids and append them; a sequence that finished (or was aborted or preempted)
        since the launch drops its token."""
        token_ids = launched.token_ids()  # waits for the step (its event, on CUDA)
        received, now = [], time.perf_counter()  # so a token's time is its arrival, not the start of the wait
        for seq, token, logprobs in zip(launched.seqs, token_ids, launched.logprobs()):
            if seq.finish_reason is not None:
                continue
            if seq.stale:  # launched before the sequence was preempted: it computes this token again
                seq.stale -= 1
                continue
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            seq.append(token, now)
            received.append(seq)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            elif seq.matcher is not None:  # its next token's mask (no step holding it was launched since)
                self._guide(seq, token)
        return received

    def _guide(self, seq: Sequence, token: int | None = None) -> bool:
        """A structured request's mask for its next token (after `token`, its newest) into its sampler row. A
        grammar that cannot go on (no token of the vocabulary continues it) ends this request alone, aborted with
        the reason in `seq.error`, and the others go on. -> whether it goes on."""
        try:
            if token is not None:
                seq.matcher.advance(token)
            allowed = seq.matcher.mask()
        except RuntimeError as e:
            seq.error = str(e)
            self.abort(seq)
            return False
        self.sampler.set_allowed(seq.slot, allowed, seq.params.logit_bias)
        return True

    def prefill_metadata(self, chunks: list[tuple[Sequence, int, int]]):
        """(sequence, first prompt position, token count) chunks -> (token ids [T], metadata, last row of each
        chunk [B]); see ModelRunner.prefill_metadata."""
        return self.runner.prefill_metadata(chunks)

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
            self.scheduler.release(seq)
