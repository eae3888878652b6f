"""First-come-first-served admission over the paged KV cache and the sampler's slots, and the choice of the next
step: the next chunk of admitted prompts (at most `max_prefill_tokens` tokens) or one decode token for every
sequence whose prompt is done. While both kinds of work wait, steps alternate, so a long prompt never starves
running decodes.

KV cache blocks are taken as they are needed, as vLLM does: a sequence is admitted with the blocks of its prompt,
and a decode step gives each of its sequences the block its newest token needs. When the cache is out of blocks,
the most recently admitted running sequence is preempted: its blocks and sampler slot are freed and it goes back to
the front of the queue; when admitted again it prefills its prompt and the tokens it had generated (recompute, as
vLLM V1), and goes on where it stopped. Admission leaves a watermark of free blocks (1% of the cache, vLLM's
default) while other sequences run, so that a new request does not push a running one out at once. One sequence
alone always fits (Scheduler.add checks its whole length against the cache).

Priority scheduling (scheduling_policy "priority", vLLM's): the queue is ordered by (priority, arrival), a lower
value first; the sequence preempted when blocks run out is the running one of the largest (priority, arrival); and a
waiting sequence that finds no free slot or too few blocks preempts running sequences of a larger priority value,
the largest first, until it fits (the forced preemption of vLLM's priority scheduling), so an urgent request never
waits for a less urgent one to finish; not when those hold fewer blocks than it lacks (it would not fit anyway).
Under "fcfs" every request has priority 0.

The engine launches a step before it reads back the one before (see engine.py), so the scheduler plans with
`Sequence.num_launched`: a sequence joins a decode step while its last token is still on the device, and leaves
the decode list once its budget's last token is launched; a sequence that stopped early (a stop token or string) is
only known to have finished one step later, and the engine drops that step's token.

Prefix caching (kv_cache.py): at admission a sequence takes the longest cached run of its prompt's full blocks
(shared, referenced once more) and prefills from the end of it, like a chunked prefill resumed there. At most
prompt length - 1 tokens come from the cache, so that the prompt's last token is computed and samples the first
output token. A prefill plan registers the full blocks each of its chunks writes, and before each chunk a sequence
whose computed tokens end where its cached blocks end takes the next cached blocks of its prompt in place of its
own unwritten ones (`_take_cached`). So requests that share a prefix and are admitted together (a burst with one
system prompt, the n choices of a prompt) compute it once, in one step, as vLLM V1 shares blocks computed in the
same step: the launch writes every chunk's k/v of a layer before any chunk attends (Backend.attention), and a
sequence gets a chunk only after every one ahead of it has got the rest of its prompt, so each block it takes is
written by an earlier launch or earlier in the same one. Later requests read the blocks after the writes (stream
order). A sequence's full blocks of generated tokens are registered when it lets go of them (finished, aborted or
preempted), those whose tokens were read back and whose writes were launched. A registered block is never written
again: decode writes past it (an extra token of a stopped sequence too).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import deque

from .kv_cache import KVCache
from .sequence import Sequence


class Scheduler:
    POLICIES = ("fcfs", "priority")

    def __init__(self, cache: KVCache, max_batch_size: int, max_prefill_tokens: int, seed: int,
                 enable_prefix_caching: bool = True, policy: str = "fcfs"):
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if policy not in self.POLICIES:
            raise ValueError(f"scheduling_policy = {policy!r}: must be one of {', '.join(self.POLICIES)}")
        self.policy = policy
        self._arrivals = itertools.count()  # the order in which sequences were added (priority ties)
        self.cache = cache
        self.enable_prefix_caching = enable_prefix_caching
        self.queried_tokens = 0  # prompt tokens of admitted sequences, looked up in the prefix cache
        self.hit_tokens = 0  # of those, the ones found there (not prefilled)
        self.max_prefill_tokens = max_prefill_tokens
        self.rng = random.Random(seed)  # seeds of requests that bring none
        self.num_preemptions = 0
        self.watermark = -(-cache.num_blocks // 100)  # blocks kept free at admission while others run
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted and not finished, in order of admission
        self.prefilling: list[Sequence] = []  # running, prompt not all in the cache yet
        self.decoding: list[Sequence] = []  # running, prompt done, tokens of its budget still to launch
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self._decode_turn = False
        self.grown: list[tuple[Sequence, int]] = []  # the last decode plan's (sequence, index of its first new block)
        self._decode_plans = 0  # decode plans made so far
        self._due: dict[int, list[Sequence]] = {}  # decode plan -> decoding sequences that take a block in it
        self.retabled: list[Sequence] = []  # the last prefill plan's sequences that took cached blocks for their own
        self.registered: list[int] = []  # blocks the last prefill plan registered (forgotten if it is not launched)

    def add(self, seq: Sequence) -> None:
        if seq.submitted or seq.finished:  # finished unsubmitted: aborted before it was queued
            state = f"finished ({seq.finish_reason})" if seq.finished else "queued or running"
            raise ValueError(f"sequence {seq.id} was already {'submitted and is ' if seq.submitted else ''}{state}: "
                             "a sequence runs once; make a new request for another run")
        # the k/v of every token but the last is written (the last one generated is sampled, never fed back)
        need = self.cache.blocks_for(seq.max_len - 1)
        if need > self.cache.num_blocks:
            raise ValueError(f"request needs {need} KV cache blocks ({seq.max_len} tokens, the k/v of all but the "
                             f"last one) but the cache holds {self.cache.num_blocks}; lower max_tokens or give the "
                             "cache more blocks")
        self.check_priority(seq.priority)
        seq.submitted = True
        seq.arrival_order = next(self._arrivals)
        self._queue(seq)

    def check_priority(self, priority) -> None:
        """A ValueError unless `priority` is an integer this policy takes (any under "priority", 0 under "fcfs")."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority = {priority!r}: must be an integer (a lower value is scheduled first)")
        if priority and self.policy != "priority":
            raise ValueError(f"priority = {priority}: requests have priorities only with "
                             "scheduling_policy='priority' (this engine schedules first come, first served)")

    @staticmethod
    def _rank(seq: Sequence) -> tuple[int, int]:
        return seq.priority, seq.arrival_order

    def _queue(self, seq: Sequence) -> None:
        """Into the waiting queue: at its end (fcfs), or after every sequence of a smaller (priority, arrival)."""
        if self.policy == "priority":
            self.waiting.insert(bisect.bisect(self.waiting, self._rank(seq), key=self._rank), seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Sequence]:
        """Waiting sequences that get a slot and their prompt's blocks now, first come first served. -> the admitted
        ones (their sampler rows and block tables are the caller's to set up)."""
        admitted = []
        while self.waiting and (self.free_slots or self._make_room(self.waiting[0])):
            seq = self.waiting[0]
            need = self.cache.blocks_for(len(seq.prefill_ids))
            hits, entries = [], []
            # the prompt's last token is always computed: it samples the first token; a request with prompt
            # log-probabilities computes every position (vLLM's rule)
            cached = self.enable_prefix_caching and seq.params.prompt_logprobs is None
            if cached:
                usable = (len(seq.prefill_ids) - 1) // self.cache.block_size
                hits, entries = self.cache.match(seq.prompt_block_tokens(self.cache.block_size)[:usable])
            # cached blocks nobody holds count as free; taking them as hits makes them unavailable to allocate
            free = self.cache.num_free_blocks - self.cache.num_unreferenced(hits)
            lacking = need - len(hits) - (free - (self.watermark if self.running else 0))
            if lacking > 0:
                if self._make_room(seq, lacking):
                    continue  # a less urgent sequence was preempted: try again
                break  # in order (first come, or most urgent, first served): later requests wait behind it
            self.waiting.popleft()
            self.cache.acquire(hits)  # before allocating, which could otherwise evict them
            seq.blocks = hits + self.cache.allocate(need - len(hits))
            seq.cache_entries = entries
            seq.num_prefilled = len(hits) * self.cache.block_size
            if not seq.num_preemptions:  # the request's prompt (a recompute is not counted again)
                seq.num_cached_tokens = seq.num_prefilled
                if cached:
                    self.queried_tokens += len(seq.prompt_ids)
                    self.hit_tokens += seq.num_cached_tokens
            seq.slot = self.free_slots.pop()
            if seq.seed is None:
                seq.seed = self.rng.getrandbits(63)
            self.running.append(seq)
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def _make_room(self, seq: Sequence, lacking: int = 0) -> bool:
        """Priority policy, `seq` waiting for a slot (lacking 0) or for `lacking` more free blocks: preempt the
        running sequence with work to launch of the largest (priority, arrival) if its priority value is larger than
        `seq`'s, and, for blocks, only if such sequences hold at least `lacking` blocks between them (an upper bound
        on what preempting them frees: shared blocks count too), so that running requests are not preempted for a
        request that would not fit anyway. -> whether one was preempted."""
        victim = self._victim() if self.policy == "priority" else None
        if victim is None or victim.priority <= seq.priority:
            return False
        if lacking and sum(len(v.blocks) for v in self.running if v.priority > seq.priority) < lacking:
            return False
        self.preempt(victim)
        return True

    def next_step(self) -> tuple[str, list] | None:
        """-> ("prefill", [(sequence, first prompt position, token count)]) or ("decode", sequences) or None. A
        decode plan first gives its sequences the blocks their newest tokens need (`grown` lists them), preempting
        the most recently admitted ones when the cache is out of blocks."""
        self.grown, self.retabled, self.registered = [], [], []
        if self.decoding and (self._decode_turn or not self.prefilling):
            self._grow()
        if self.prefilling and (not self.decoding or not self._decode_turn):
            self._decode_turn = True
            chunks, budget = [], self.max_prefill_tokens
            for s in self.prefilling:  # a sequence gets a chunk only once those before it have all they need
                if budget <= 0:
                    break
                if self.enable_prefix_caching:
                    self._take_cached(s)
                n = min(len(s.prefill_ids) - s.num_prefilled, budget)
                chunks.append((s, s.num_prefilled, n))
                budget -= n
                if self.enable_prefix_caching:  # its full blocks this chunk writes (launched next)
                    self.registered += self._register(s, s.num_prefilled + n)
            return "prefill", chunks
        if self.decoding:
            self._decode_turn = False
            return "decode", self.decoding
        return None

    def _grow(self) -> None:
        """The decoding sequences whose newest token (position num_launched - 1) starts a block get one; when none is
        free, the most recently admitted sequence that still has work to launch is preempted (possibly the one that
        needs the block). Every decode plan launches every decoding sequence, so the plan in which a sequence
        needs its next block is known when it gets one (or joins the decode list): it waits in `_due` under that
        plan, and a plan looks at those sequences only."""
        plan = self._decode_plans
        self._decode_plans += 1
        bs = self.cache.block_size
        for s in self._due.pop(plan, ()):
            if s.block_due != plan or s.slot is None or s.num_launched >= s.max_len:
                continue  # preempted, finished or at its last token since
            if s.num_launched > len(s.blocks) * bs:
                while not self.cache.num_free_blocks:  # (s itself has work: there is a victim)
                    self.preempt(self._victim())
                    if s.slot is None:
                        break
                else:
                    self.grown.append((s, len(s.blocks)))
                    s.blocks += self.cache.allocate(1)
            if s.slot is not None:
                self._due_at(s, plan + len(s.blocks) * bs + 1 - s.num_launched)

    def _take_cached(self, seq: Sequence) -> None:
        """Before a chunk: the full blocks of the sequence's prompt after its cached ones that are cached by now
        (typically registered earlier in this plan by a request with the same prefix) replace its own blocks there,
        which nothing else reads (one it has partly written is dropped), and its prefill resumes after them.
        `retabled` lists it: its block-table row changes. At most prompt length - 1 tokens, as at admission. (Its
        computed full blocks are all registered, so its cached blocks end at or just before num_prefilled.)"""
        bs, have = self.cache.block_size, len(seq.cache_entries)
        usable = (len(seq.prefill_ids) - 1) // bs
        if seq.params.prompt_logprobs is not None or have >= usable:
            return
        hits, entries = self.cache.match(seq.prompt_block_tokens(bs)[have:usable],
                                         seq.cache_entries[-1] if have else -1)
        if not hits:
            return
        self.cache.acquire(hits)
        self.cache.free(seq.blocks[have:have + len(hits)])
        seq.blocks[have:have + len(hits)] = hits
        seq.cache_entries += entries
        taken = (have + len(hits)) * bs - seq.num_prefilled
        seq.num_prefilled += taken
        if not seq.num_preemptions:
            seq.num_cached_tokens += taken
            self.hit_tokens += taken
        self.retabled.append(seq)

    def _register(self, seq: Sequence, end: int) -> list[int]:
        """Its full blocks before position `end` not registered yet join the prefix cache (their k/v writes are
        launched, or about to be). -> those blocks."""
        bs = self.cache.block_size
        blocks = seq.blocks[len(seq.cache_entries):end // bs]
        for i in range(len(seq.cache_entries), end // bs):
            parent = seq.cache_entries[-1] if seq.cache_entries else -1
            seq.cache_entries.append(self.cache.register(seq.blocks[i], parent, seq.block_token_ids(i, bs)))
        return blocks

    def not_launched(self) -> None:
        """The prefill just planned failed to launch (its sequences are aborted): the blocks it registered were
        perhaps never written, so their cache entries go."""
        self.cache.forget(self.registered)
        self.registered = []

    def _victim(self) -> Sequence | None:
        """The sequence to preempt: of the running ones with work to launch, the most recently admitted (fcfs, as
        vLLM V1) or the one of the largest (priority, arrival) (priority); None if there is none. (A running
        sequence has work while it prefills, or until the last token of its budget is launched: exactly the
        sequences of the prefilling and decoding lists.)"""
        busy = [v for v in self.running if not v.prefill_done or v.num_launched < v.max_len]
        if not busy:
            return None
        return max(busy, key=self._rank) if self.policy == "priority" else busy[-1]

    def _due_at(self, seq: Sequence, plan: int) -> None:
        seq.block_due = plan
        self._due.setdefault(plan, []).append(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and slot and put it back in the queue, at its front (fcfs: admitted again
        before any request that came after it) or in the place of its (priority, arrival); it recomputes its tokens
        (Sequence.preempted), from its blocks that are still cached where it can."""
        for group in (self.running, self.prefilling, self.decoding):
            if seq in group:
                group.remove(seq)
        self._cache_written(seq)
        self.release(seq)
        seq.preempted()
        if self.policy == "priority":
            self._queue(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def prefilled(self, chunks: list[tuple[Sequence, int, int]]) -> None:
        """The chunks were launched (their full blocks were registered when planned): a sequence whose prefill is
        complete (it samples its next token) moves to the decode list."""
        for s, start, n in chunks:
            s.num_prefilled = start + n
            if s.prefill_done:
                self.prefilling.remove(s)
                self.decoding.append(s)
                self._due_at(s, self._decode_plans)  # its first decode step may need a block

    def launched(self, seqs: list[Sequence]) -> None:
        """A token is now being sampled on the device for each of `seqs`; one that reaches its length limit with it
        leaves the decode list (it finishes when that token is read back)."""
        at_limit = False
        for s in seqs:
            s.num_launched += 1
            if s.num_launched >= s.max_len:
                at_limit = True
        if at_limit:
            self.decoding = [s for s in self.decoding if s.num_launched < s.max_len]

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (finished or aborted) and free its blocks and slot."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        for group in (self.running, self.prefilling, self.decoding):
            if seq in group:
                group.remove(seq)
        self._cache_written(seq)
        self.release(seq)

    def _cache_written(self, seq: Sequence) -> None:
        """Before a sequence lets go of its blocks: its full blocks whose tokens are known (read back) and whose k/v
        writes were launched join the prefix cache. Its prefill's blocks were registered as they were planned; this
        adds those of its generated tokens (vLLM caches them too), so that a later prompt that repeats the whole
        exchange (a chat's next turn) or the sequence's own recompute after a preemption reuses them. A decode step
        writes the k/v of the token before the one it samples, so a running sequence's last num_launched - 1
        positions are written; such a block is never written again (decode writes past it)."""
        if not (self.enable_prefix_caching and seq.blocks):
            return
        written = seq.num_launched - 1 if seq.prefill_done else seq.num_prefilled
        self._register(seq, min(written, seq.num_tokens, len(seq.blocks) * self.cache.block_size))

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references to its blocks (cached ones stay cached until evicted) and its slot."""
        if seq.blocks:
            self.cache.free(seq.blocks)
            seq.blocks = []
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
