"""Automatic prefix caching: the allocator's reference counts, keys and LRU (kv_cache.py), hits, misses and partial
hits on the tiny model, logits equal with and without a hit, eviction under memory pressure, blocks shared by running
requests, and thousands of random requests with shared prefixes and aborts (fake models) that leak nothing."""

from __future__ import annotations

import random

import pytest
import torch

from qwen2rt import LLM, SamplingParams
from qwen2rt.engine import Engine, Sequence
from qwen2rt.kv_cache import KVCache
from qwen2rt.models.config import builtin_config
from test_engine import drain, fake_engine
from test_host_overlap import (VOCAB, ChainModel, assert_exact, chain_engine, check_blocks, check_sampler_counts,
                               expected, random_workload, request)
from test_parity import generate_recording_logits, random_prompt, rel_err

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BS = 16


def check_engine(engine):
    """The allocator's invariants, with the running sequences as the only holders of blocks."""
    engine.cache.check([s.blocks for s in engine.running])


# ---- the allocator ---------------------------------------------------------------------------------------------
def test_allocator_refcounts_keys_and_lru():
    cache = KVCache(builtin_config("tiny"), 4, 2, "cpu", torch.float32)
    a = cache.allocate(3)
    assert a == [0, 1, 2] and cache.num_free_blocks == 1
    e0 = cache.register(a[0], -1, (5, 6))
    e1 = cache.register(a[1], e0, (7, 8))
    assert cache.match([(5, 6), (7, 8), (9, 9)]) == ([0, 1], [e0, e1])
    assert cache.match([(5, 6), (7, 9)]) == ([0], [e0])
    assert cache.match([(7, 8)]) == ([], [])  # the same tokens under another parent are another key
    # a block already cached under the same key: the duplicate stays uncached, its sequence chains on the other
    dup = cache.allocate(1)
    assert cache.register(dup[0], -1, (5, 6)) == e0 and cache.num_cached_blocks == 2
    cache.free(dup)
    cache.free(a)  # blocks 1 and 0 go to the LRU (later blocks first), 2 to the free list
    assert cache.num_free_blocks == 4 and cache.num_evictable_blocks == 2
    cache.check([])
    hits, _ = cache.match([(5, 6)])
    assert cache.num_unreferenced(hits) == 1
    cache.acquire(hits)  # a hit leaves the LRU
    assert cache.num_free_blocks == 3
    b = cache.allocate(3)  # the free blocks, then the least recently released cached block (1): its entry goes
    assert sorted(b) == [1, 2, 3] and cache.evictions == 1 and cache.match([(5, 6), (7, 8)]) == ([0], [e0])
    cache.check([hits, b])
    with pytest.raises(RuntimeError, match="0 free"):
        cache.allocate(1)
    cache.free(b)
    cache.free(hits)
    with pytest.raises(RuntimeError, match="double free"):
        cache.free(hits)
    cache.check([])


def test_a_held_duplicate_takes_over_an_unheld_blocks_entry():
    """Registering a key that an unheld cached block has: the held block takes over the entry (same id, so blocks
    chained from it stay reachable while it is held) and the other block is freed; a held original keeps it."""
    cache = KVCache(builtin_config("tiny"), 4, 2, "cpu", torch.float32)
    a = cache.allocate(2)
    e0 = cache.register(a[0], -1, (5, 6))
    e1 = cache.register(a[1], e0, (7, 8))
    cache.free(a)
    assert cache.num_evictable_blocks == 2
    b = cache.allocate(2)  # the two never-cached blocks
    assert sorted(b) == [2, 3] and cache.evictions == 0
    assert cache.register(b[0], -1, (5, 6)) == e0  # the same entry id, now in held block b[0]; a[0] is free
    assert cache.match([(5, 6), (7, 8)]) == ([b[0], a[1]], [e0, e1])
    assert cache.num_cached_blocks == 2 and cache.num_evictable_blocks == 1 and cache.num_free_blocks == 2
    cache.check([b])
    c = cache.allocate(1)  # a[0], free again (not an eviction: its entry lives on in b[0])
    assert c == [a[0]] and cache.evictions == 0
    assert cache.register(c[0], -1, (5, 6)) == e0 and cache.match([(5, 6)]) == ([b[0]], [e0])  # held: stays
    cache.free(c)
    cache.free(b)
    cache.check([])


# ---- the tiny model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llms():
    """The same tiny model with and without prefix caching."""
    kwargs = dict(device="cpu", max_seq_len=256, max_batch_size=4, block_size=BS)
    return LLM("tiny", **kwargs), LLM("tiny", enable_prefix_caching=False, **kwargs)


def test_hit_miss_and_partial_hit(llms):
    llm, _ = llms
    base = random_prompt(50, 256, 100)  # 3 full blocks and 2 tokens
    assert llm.generate([base], GREEDY)[0].num_cached_tokens == 0  # miss
    stats = llm.engine.prefix_cache_stats()
    assert llm.generate([base], GREEDY)[0].num_cached_tokens == 48  # hit: every full block
    after = llm.engine.prefix_cache_stats()
    assert after["queried_tokens"] - stats["queried_tokens"] == 50 and after["hit_tokens"] - stats["hit_tokens"] == 48
    assert llm.generate([base[:40] + random_prompt(9, 256, 101)], GREEDY)[0].num_cached_tokens == 32  # partial
    assert llm.generate([base[:15] + random_prompt(30, 256, 102)], GREEDY)[0].num_cached_tokens == 0  # < a block
    assert llm.generate([random_prompt(50, 256, 103)], GREEDY)[0].num_cached_tokens == 0
    # a prompt that is exactly its cached blocks still computes its last token: its last block is prefilled again
    assert llm.generate([base[:48]], GREEDY)[0].num_cached_tokens == 32
    assert llm.generate([base[:17]], GREEDY)[0].num_cached_tokens == 16
    assert llm.generate([base[:16]], GREEDY)[0].num_cached_tokens == 0
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks
    check_engine(llm.engine)


@pytest.mark.parametrize("length, shared", [(64, 64), (64, 40), (83, 83), (83, 35)])
def test_logits_equal_with_and_without_a_hit(llms, length, shared):
    """A prompt after another with the same first `shared` tokens: its prefill starts past the cached blocks, and
    the logits of its prefill and of every decode step equal those of a full prefill without caching."""
    llm, plain = llms
    prompt = random_prompt(length, 256, 200 + length + shared)
    llm.generate([prompt[:shared] + random_prompt(20, 256, 300 + shared)], GREEDY)  # caches the shared blocks
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    out, logits = generate_recording_logits(llm, prompt, params)
    assert out.num_cached_tokens == min(shared, length - 1) // BS * BS > 0
    ref, ref_logits = generate_recording_logits(plain, prompt, params)
    assert ref.num_cached_tokens == 0
    assert out.token_ids == ref.token_ids
    assert rel_err(logits, ref_logits) < 1e-5


def test_next_turn_reuses_the_replys_blocks(llms):
    """A finished request's full blocks of generated tokens join the prefix cache: a prompt that repeats the whole
    exchange and adds to it (a chat's next turn) reuses them, and its logits, prefill and decode, equal those of a
    prefill of everything without caching."""
    llm, plain = llms
    prompt = random_prompt(30, 256, 700)
    reply = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.8, seed=1, ignore_eos=True))[0]
    turn = prompt + reply.token_ids + random_prompt(12, 256, 701)  # 82 tokens
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out, logits = generate_recording_logits(llm, turn, params)
    assert out.num_cached_tokens == 64  # of 69 written tokens (the reply's last was never an input): 4 blocks
    ref, ref_logits = generate_recording_logits(plain, turn, params)
    assert out.token_ids == ref.token_ids and rel_err(logits, ref_logits) < 1e-5
    check_engine(llm.engine)


@pytest.mark.parametrize("ends", ["length", "stop"])
def test_generated_blocks_cached_are_those_written(ends):
    """At its end a request caches the full blocks of the tokens whose k/v were written: a reply cut at its length
    limit never had its last token as an input (not written), one that ends on a stop token had it written by the
    step launched after it (before it was read back). A next turn hits exactly those and gets its exact tokens."""
    engine = chain_engine(block_size=4)
    prompt = [(5 * i + 1) % VOCAB for i in range(10)]
    full, _ = expected(prompt, 14)
    assert full[9] not in full[:9]
    first = request(prompt, 10 if ends == "length" else 14, [full[9]] if ends == "stop" else [])
    engine.add(first)
    while not first.finished:
        engine.step()
    assert first.finish_reason == ends and len(first.output_ids) == 10  # 20 tokens: 5 full blocks
    turn = prompt + first.output_ids + [7, 8, 9]
    second = request(turn, 5)
    engine.add(second)
    while not second.finished:
        engine.step()
    assert second.num_cached_tokens == (16 if ends == "length" else 20)
    assert (second.output_ids, second.finish_reason) == expected(turn, 5)
    engine.step()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    engine.cache.check([])


def test_running_requests_share_blocks(llms):
    llm, plain = llms
    prefix = random_prompt(64, 256, 400)
    prompts = [prefix + random_prompt(6, 256, 401), prefix + random_prompt(9, 256, 402)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    first, second = (llm._new_sequence(p, llm._params(params)) for p in prompts)
    llm.submit([first])
    llm.step()  # the prefill of `first` is launched: its four full blocks are cached
    assert first.prefill_done and not first.finished
    llm.submit([second])
    llm.step()
    assert second.num_cached_tokens == 64 and second.blocks[:4] == first.blocks[:4]
    assert [llm.kv_cache._refs[b] for b in first.blocks[:5]] == [2, 2, 2, 2, 1]
    check_engine(llm.engine)
    while not (first.finished and second.finished):
        llm.step()
    assert [first.output_ids, second.output_ids] == [o.token_ids for o in plain.generate(prompts, params)]
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks
    check_engine(llm.engine)


def test_requests_admitted_together_share_their_prefix(llms):
    """Three prompts with the same 40-token prefix admitted in one step: the first prefills it, the others take its
    two full blocks in the same step (their chunks read them after its writes) and prefill only their own tokens;
    every logit equals that of the same batch without caching. Then n = 3 choices of one prompt share it too."""
    llm, plain = llms
    prefix = random_prompt(40, 256, 500)
    prompts = [prefix + random_prompt(n, 256, 510 + n) for n in (3, 9, 17)]
    seqs = [llm._new_sequence(p, llm._params(GREEDY)) for p in prompts]
    rows, forward = [], llm.model.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm.model, "forward", lambda ids, *a, **k: rows.append(ids.shape[0]) or forward(ids, *a, **k))
        llm.submit(seqs)
        llm.step()
    assert rows[0] == 43 + 49 + 57 - 2 * 32  # one prefill step: the prefix computed once
    assert [s.num_cached_tokens for s in seqs] == [0, 32, 32]
    assert seqs[1].blocks[:2] == seqs[2].blocks[:2] == seqs[0].blocks[:2]
    assert [llm.kv_cache._refs[b] for b in seqs[0].blocks] == [3, 3, 1]
    check_engine(llm.engine)
    for s in seqs:
        llm.engine.abort(s)
    llm.step()
    check_engine(llm.engine)

    prefix = random_prompt(40, 256, 530)  # not cached: shared within the batch only
    prompts = [prefix + p[40:] for p in prompts]
    runs = []
    for engine_llm in (llm, plain):
        recorded, compute_logits = [], engine_llm.model.compute_logits
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine_llm.model, "compute_logits",
                          lambda h, f=compute_logits: recorded.append(f(h).float().clone()) or recorded[-1])
            runs.append((engine_llm.generate(prompts, GREEDY), torch.cat(recorded)))
    (outs, got), (ref, want) = runs
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32] and [o.num_cached_tokens for o in ref] == [0, 0, 0]
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert got.shape == want.shape and rel_err(got, want) < 1e-5

    before = llm.engine.prefix_cache_stats()["hit_tokens"]
    prompt = random_prompt(40, 256, 540)
    out = llm.generate(prompt, SamplingParams(n=3, max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert llm.engine.prefix_cache_stats()["hit_tokens"] - before == 2 * 32
    assert [c.token_ids for c in out.outputs] == [plain.generate(prompt, GREEDY)[0].token_ids] * 3
    check_engine(llm.engine)


def test_eviction_under_memory_pressure():
    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=2, block_size=BS, num_kv_blocks=6)
    a, b = random_prompt(40, 256, 600), random_prompt(70, 256, 601)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)  # a: 3 blocks, b: 5 blocks
    want_a = llm.generate([a], params)[0].token_ids
    assert llm.kv_cache.num_cached_blocks == 2 and llm.kv_cache.num_free_blocks == 6  # cached, still allocatable
    assert llm.generate([a], params)[0].num_cached_tokens == 32
    out_b = llm.generate([b], params)[0]  # needs 5 blocks of 6: the LRU's oldest cached block goes
    assert out_b.num_cached_tokens == 0 and llm.engine.prefix_cache_stats()["evictions"] == 1
    # a's second block was evicted first (later blocks first); its first block survives
    again = llm.generate([a], params)[0]
    assert again.num_cached_tokens == 16 and again.token_ids == want_a
    assert llm.generate([b], params)[0].token_ids == out_b.token_ids
    stats = llm.engine.prefix_cache_stats()
    assert stats["free_blocks"] == 6 and stats["cached_blocks"] <= 6
    check_engine(llm.engine)


def test_aborted_mid_prefill_keeps_only_launched_blocks():
    """A prompt aborted between prefill chunks leaves exactly its written (launched) full blocks cached."""
    engine = chain_engine(block_size=4, max_prefill_tokens=5)
    prompt = [(7 * i + 3) % VOCAB for i in range(30)]
    first = request(prompt, 5)
    engine.add(first)
    engine.step()  # two prefill chunks launched (nothing decodes yet): 10 tokens, 2 full blocks
    assert first.num_prefilled == 10 and engine.cache.num_cached_blocks == 2
    engine.abort(first)
    check_engine(engine)
    again = request(prompt, 5)
    engine.add(again)
    while not again.finished:
        engine.step()
    assert again.num_cached_tokens == 8 and (again.output_ids, again.finish_reason) == expected(prompt, 5)
    engine.step()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_disabled_caches_nothing():
    engine = chain_engine(enable_prefix_caching=False)
    prompt = list(range(1, 30))
    for _ in range(2):
        s = request(prompt, 5)
        engine.add(s)
        while not s.finished:
            engine.step()
        assert s.num_cached_tokens == 0 and (s.output_ids, s.finish_reason) == expected(prompt, 5)
    engine.step()
    assert engine.cache.num_cached_blocks == 0 and engine.cache._free == list(range(39, -1, -1))
    assert engine.prefix_cache_stats()["queried_tokens"] == 0


# ---- thousands of requests on fake models ----------------------------------------------------------------------
def shared_prefix_prompt(rng, documents, vocab, max_len):
    doc = rng.choice(documents)
    prompt = doc[:rng.randint(0, len(doc))] + [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
    return (prompt or [rng.randrange(vocab)])[:max_len]


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefixes_with_stops_and_aborts_are_exact(seed):
    """A model that reads every earlier token's cache entry through the block tables: requests that share prefixes
    with finished, running and aborted ones, under memory pressure (evictions, preemptions), chunked prefill and
    stops, each get exactly their own tokens; the allocator's invariants hold after every step and nothing leaks."""
    rng = random.Random(seed)
    engine = chain_engine(num_blocks=24, max_batch=4, max_prefill_tokens=rng.choice([5, 16, 64]))
    documents = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(4)]

    def check(engine):
        check_engine(engine)
        check_sampler_counts(engine)
    seqs, aborted = random_workload(engine, rng, 400, lambda: shared_prefix_prompt(rng, documents, VOCAB, 45),
                                    max_tokens=20, stop_p=0.3, max_steps_between=3, check=check)
    engine.step()
    assert_exact(seqs, aborted)
    stats = engine.prefix_cache_stats()
    assert stats["hit_tokens"] > stats["queried_tokens"] // 8 and stats["evictions"] > 0
    assert sum(s.num_cached_tokens for s in seqs) == stats["hit_tokens"]
    assert engine.num_preemptions >= 10  # and each recomputed from its prompt's cached blocks where it could
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    engine.cache.check([])


@pytest.mark.parametrize("seed", [0, 1])
def test_next_turns_of_random_exchanges_are_exact(seed):
    """Requests that repeat a finished, stopped or aborted one's prompt and reply and add to it (a chat's next
    turn), beside fresh ones, with chunked prefill, stops, aborts and some cache pressure: the earlier replies'
    blocks are found in the cache, and each request gets exactly its own tokens."""
    rng = random.Random(seed)
    engine = chain_engine(num_blocks=60, max_batch=4, max_prefill_tokens=rng.choice([5, 16, 64]))
    made, add, turns = [], engine.add, {}
    engine.add = lambda s: (made.append(s), add(s))

    def new_prompt():
        done = [s for s in made if s.finished and s.output_ids]
        if done and rng.random() < 0.6:
            s = rng.choice(done[-30:])
            turn = (s.prompt_ids + s.output_ids + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))])[:60]
            turns[tuple(turn)] = s
            return turn
        return [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]

    def check(engine):
        check_engine(engine)
        check_sampler_counts(engine)
    seqs, aborted = random_workload(engine, rng, 200, new_prompt, max_tokens=16, stop_p=0.3, max_steps_between=6,
                                    check=check)
    engine.step()
    assert_exact(seqs, aborted)
    beyond = [s for s in seqs if tuple(s.prompt_ids) in turns
              and s.num_cached_tokens > len(turns[tuple(s.prompt_ids)].prompt_ids)]
    assert len(beyond) >= 20  # found blocks of the earlier reply's tokens
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    engine.cache.check([])


def test_thousands_of_requests_with_shared_prefixes_leak_nothing():
    rng = random.Random(7)
    engine = fake_engine(num_blocks=30, block_size=4, max_batch=4, max_prefill_tokens=rng.choice([8, 64]))
    documents = [[rng.randrange(50) for _ in range(60)] for _ in range(6)]
    seqs = []
    for i in range(3000):
        s = request(shared_prefix_prompt(rng, documents, 50, 60), rng.randint(1, 12))
        seqs.append(s)
        engine.add(s)
        if rng.random() < 0.4:
            engine.step()
        if rng.random() < 0.05 and engine.running:
            engine.abort(rng.choice(engine.running))
        if i % 50 == 0:
            check_engine(engine)
    drain(engine)
    engine.step()
    for s in seqs:  # FakeModel emits position + 1: a prefill from the wrong offset shows in the first token
        n = len(s.prompt_ids)
        assert s.output_ids == [(n + i) % 50 for i in range(len(s.output_ids))]
    stats = engine.prefix_cache_stats()
    assert stats["hit_tokens"] > 0 and stats["evictions"] > 0
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and sorted(engine.free_slots) == list(range(4))
    engine.cache.check([])


# ---- a model whose cache values depend on the whole prefix -----------------------------------------------------
PRIME = 1_000_003


def prefix_value(token: int, position: int, earlier_sum: int) -> int:
    return (7919 * token + 104729 * (position + 1) + 31 * earlier_sum + 17) % PRIME


def prefix_values(tokens: list[int]) -> list[int]:
    values, total = [], 0
    for p, t in enumerate(tokens):
        values.append(prefix_value(t, p, total % PRIME))
        total += values[-1]
    return values


def prefix_expected(prompt: list[int], max_tokens: int, stop_ids=()) -> tuple[list[int], str]:
    return expected(prompt, max_tokens, stop_ids, rule=lambda tokens: prefix_values(tokens)[-1] % VOCAB)


class PrefixModel(ChainModel):
    """ChainModel whose cache value at position p is a function of its token, p and every earlier value (read
    through the block tables; float64, exact): a block is right only if it was written after exactly its own
    prefix at its own positions, so a block cached under the wrong parent or key shows up (CacheChecker) and
    gives wrong tokens. The next token is the newest value % VOCAB."""

    def cell(self, token: int, position: int, earlier: torch.Tensor) -> tuple[int, int]:
        value = prefix_value(token, position, int(earlier.sum()) % PRIME if len(earlier) else 0)
        return value, value % VOCAB


def prefix_engine(num_blocks, block_size, max_batch, max_prefill_tokens, max_seq_len=80):
    ref = []
    model = PrefixModel(ref)
    cache = KVCache(model.config, num_blocks, block_size, "cpu", torch.float64)
    engine = Engine(model, cache, max_batch, max_seq_len, seed=0, max_prefill_tokens=max_prefill_tokens)
    ref.append(engine)
    return engine


def check_cached_blocks(engine, chains: dict) -> None:
    """Every cached block holds exactly the values of its key chain's tokens (chains: entry id -> the tokens up to
    the end of its block, filled as entries appear; an entry whose parent was evicted unseen is skipped)."""
    cache = engine.cache
    bs, kv = cache.block_size, cache.layers[0][0].view(-1)
    entries = {entry: (block, key) for block, (entry, key) in cache._entry.items()}
    for entry in sorted(entries):  # a parent's id is smaller than its children's
        block, (parent, tokens) = entries[entry]
        if entry not in chains and (parent == -1 or parent in chains):
            chains[entry] = (chains[parent] if parent != -1 else []) + list(tokens)
        if entry in chains:
            held = [int(v) for v in kv[block * bs:(block + 1) * bs].tolist()]
            assert held == prefix_values(chains[entry])[-bs:], f"block {block} (entry {entry}) holds other values"


def prefix_request(prompt, max_tokens, stop_ids=(), prompt_logprobs=None, logprobs=None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop_token_ids=list(stop_ids),
                            prompt_logprobs=prompt_logprobs, logprobs=logprobs)
    return Sequence(prompt, params.resolved(), 80, None, frozenset())


def test_random_next_turns_keep_every_cached_block_exact():
    """Random workloads (block sizes 1-8, batches of 1-4, chunked prefill of 1-64 tokens, caches from one
    request's length up) where most prompts are next turns of finished, stopped or aborted requests, with stops,
    aborts of running and waiting requests, prompt_logprobs requests (no hits, duplicate registrations) and
    preemptions: after every step every cached block holds exactly its key chain's values, and every request
    gets exactly its tokens. (A review helper's fuzzer; 4000 seeds passed.)"""
    preemptions = hits = 0
    for seed in range(40):
        rng = random.Random(seed)
        bs, max_batch, max_prompt = rng.randint(1, 8), rng.randint(1, 4), rng.choice([3, 10, 30])
        engine = prefix_engine(-(-80 // bs) + rng.choice([0, 0, 1, 2, 5, 20]), bs, max_batch,
                               rng.choice([1, 2, 3, 5, 16, 64]))
        chains, seqs, aborted = {}, [], set()
        base = [rng.randrange(VOCAB) for _ in range(40)]

        def step():
            engine.step()
            check_sampler_counts(engine)
            check_blocks(engine)
            engine.cache.check([s.blocks for s in engine.running])
            check_cached_blocks(engine, chains)
        for _ in range(rng.randint(10, 60)):
            done = [s for s in seqs if s.finished and s.output_ids]
            r = rng.random()
            if done and r < 0.6:
                s = rng.choice(done[-20:])
                prompt = s.prompt_ids + s.output_ids + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
                prompt = prompt[:rng.randint(max(1, len(prompt) - 3), len(prompt))][:70]
            elif r < 0.8:
                prompt = base[:rng.randint(1, max_prompt)]
            else:
                prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))]
            max_tokens = 1 if rng.random() < 0.2 else rng.randint(1, rng.choice([2, 10, 40]))
            full, _ = prefix_expected(prompt, max_tokens)
            stop = [full[rng.randrange(len(full))]] if rng.random() < 0.3 else []
            s = prefix_request(prompt, max_tokens, stop, 1 if rng.random() < 0.1 else None)
            seqs.append(s)
            engine.add(s)
            for _ in range(rng.randint(0, 4)):
                step()
            candidates = engine.running + list(engine.waiting)
            if rng.random() < 0.25 and candidates:
                victim = rng.choice(candidates)
                engine.abort(victim)
                aborted.add(victim.id)
        while engine.has_work():
            step()
        engine.step()
        check_cached_blocks(engine, chains)
        for s in seqs:
            want, reason = prefix_expected(s.prompt_ids, s.params.max_tokens, s.params.stop_token_ids)
            if s.id in aborted:
                assert s.finish_reason == "abort" and s.output_ids == want[:len(s.output_ids)], (seed, s.id)
            else:
                assert (s.output_ids, s.finish_reason) == (want, reason), (seed, s.id)
        assert engine.cache.num_free_blocks == engine.cache.num_blocks, seed
        engine.cache.check([])
        preemptions += engine.num_preemptions
        hits += sum(s.num_cached_tokens > 0 for s in seqs)
    assert preemptions >= 10 and hits >= 300  # 12 and 437


def test_a_duplicate_prefill_keeps_later_blocks_reachable():
    """A prompt_logprobs request recomputes a cached prompt (no hits) and registers duplicates: it takes over the
    unheld cached blocks' entries, so the blocks of its reply, chained after them, are found by its next turn even
    after the other copies' memory went to other requests (found by a review helper: 2 of 16 tokens before)."""
    engine = prefix_engine(num_blocks=10, block_size=2, max_batch=1, max_prefill_tokens=64)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for s in (prefix_request(prompt, 2), prefix_request(prompt, 10, prompt_logprobs=1)):
        engine.add(s)
        while engine.has_work():
            engine.step()
        engine.step()
    turn = prompt + s.output_ids + [7]
    nxt = prefix_request(turn, 1)
    engine.add(nxt)
    while engine.has_work():
        engine.step()
    assert nxt.num_cached_tokens == 16 and nxt.output_ids == prefix_expected(turn, 1)[0]


def test_bursts_with_a_shared_prefix_compute_it_once():
    """Bursts of requests whose prompts share random prefixes, added together (block sizes 1-8, batches of 1-4,
    chunk budgets of 1-64 tokens, a cache that never evicts): every request takes from the cache every full block
    of the prefix it shares with one added before it in its burst, whether that one's chunk wrote them in the same
    step or earlier; each gets exactly its tokens; every cached block holds its chain's values after every step;
    and the model computed exactly the prompt tokens not taken from the cache."""
    shared = 0
    for seed in range(30):
        rng = random.Random(seed)
        bs, max_batch = rng.randint(1, 8), rng.randint(1, 4)
        engine = prefix_engine(400, bs, max_batch, rng.choice([1, 2, 3, 5, 16, 64]))
        rows, forward = [0], engine.model.forward
        engine.model.forward = lambda ids, meta, kv: (rows.__setitem__(0, rows[0] + len(ids) * meta.is_prefill)
                                                      or forward(ids, meta, kv))
        chains, seqs, bursts = {}, [], []
        for _ in range(rng.randint(1, 4)):
            base = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
            burst = []
            for _ in range(rng.randint(2, 5)):
                prompt = base[:rng.randint(1, len(base))] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 9))]
                burst.append(prefix_request(prompt[:70], rng.randint(1, 6)))
                engine.add(burst[-1])
            seqs += burst
            bursts.append(burst)
            for _ in range(rng.randint(0, 3)):
                engine.step()
                check_cached_blocks(engine, chains)
                engine.cache.check([s.blocks for s in engine.running])
        while engine.has_work():
            engine.step()
            check_cached_blocks(engine, chains)
        for burst in bursts:
            for i, b in enumerate(burst):
                for a in burst[:i]:
                    common = next((j for j, (x, y) in enumerate(zip(a.prompt_ids, b.prompt_ids)) if x != y),
                                  min(len(a.prompt_ids), len(b.prompt_ids)))
                    want = min(common // bs, len(a.prompt_ids) // bs, (len(b.prompt_ids) - 1) // bs) * bs
                    assert b.num_cached_tokens >= want, (seed, i)
        for s in seqs:
            assert (s.output_ids, s.finish_reason) == prefix_expected(s.prompt_ids, s.params.max_tokens), seed
            assert s.num_cached_tokens < len(s.prompt_ids)
        assert rows[0] == sum(len(s.prompt_ids) - s.num_cached_tokens for s in seqs), seed
        assert engine.cache.evictions == 0 and engine.num_preemptions == 0
        shared += sum(s.num_cached_tokens for s in seqs)
    assert shared > 1000


def test_a_prefill_that_fails_to_launch_leaves_nothing_cached():
    """A prefill plan registers the blocks its chunks write; when its launch fails (its requests end with the
    error), those entries go: the same prompt afterwards is computed again, not read from blocks never written."""
    engine = prefix_engine(num_blocks=20, block_size=2, max_batch=2, max_prefill_tokens=64)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    seqs = [prefix_request(prompt, 3), prefix_request(prompt[:7], 3)]
    forward = engine.model.forward

    def fail(*args):
        raise RuntimeError("device error")
    engine.model.forward = fail
    for s in seqs:
        engine.add(s)
    with pytest.raises(RuntimeError, match="device error"):
        engine.step()
    assert [s.finish_reason for s in seqs] == ["abort", "abort"] and seqs[1].num_cached_tokens == 6
    assert engine.cache.num_cached_blocks == 0 and engine.cache.num_free_blocks == 20
    engine.cache.check([])
    engine.model.forward = forward
    again = prefix_request(prompt, 3)
    engine.add(again)
    while engine.has_work():
        engine.step()
    assert again.num_cached_tokens == 0 and (again.output_ids, again.finish_reason) == prefix_expected(prompt, 3)


def test_a_prompt_takes_blocks_cached_in_the_middle_of_its_prefill():
    """A prompt that repeats a running request's exchange, prefilled in 3-token chunks over 2-token blocks: the
    request finishes between two of its chunks, its reply's blocks join the cache, and the prompt's next chunk
    takes the one it had half written (its own copy dropped) and computes only the rest."""
    engine = prefix_engine(num_blocks=40, block_size=2, max_batch=2, max_prefill_tokens=3)
    first = prefix_request([3, 1, 4, 1], 12)
    engine.add(first)
    while len(first.output_ids) < 9:
        engine.step()
    turn = first.prompt_ids + prefix_expected(first.prompt_ids, 12)[0] + [7, 2, 8]
    second = prefix_request(turn, 2)
    engine.add(second)
    engine.step()
    assert (second.num_prefilled, second.num_cached_tokens, first.finished) == (7, 4, False)
    while engine.has_work():
        engine.step()
        check_cached_blocks(engine, {})
    assert (second.output_ids, second.finish_reason) == prefix_expected(turn, 2)
    assert second.num_cached_tokens == 5  # admission: positions 0-3; then 7 (its chunk had written 6)
    engine.step()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    engine.cache.check([])
