"""Priority scheduling (scheduling_policy="priority", vLLM's): the queue in (priority, arrival) order, the least urgent
running request preempted when blocks run out, and a waiting request that finds no slot or too few blocks preempting
less urgent running ones; every request still gets exactly its tokens. On the fake chain model of test_host_overlap
(exact next-token rule) and through the API and the server's field."""

from __future__ import annotations

import random

import pytest
import torch

from qwen2rt import LLM, SamplingParams
from qwen2rt.engine import Engine, Sequence
from qwen2rt.kv_cache import KVCache
from test_host_overlap import VOCAB, ChainModel, assert_exact, check_blocks, check_sampler_counts, expected


def priority_engine(num_blocks=40, block_size=4, max_batch=4, max_prefill_tokens=24, policy="priority"):
    ref = []
    model = ChainModel(ref)
    cache = KVCache(model.config, num_blocks, block_size, "cpu", torch.float32)
    engine = Engine(model, cache, max_batch, 80, seed=0, max_prefill_tokens=max_prefill_tokens,
                    scheduling_policy=policy)
    ref.append(engine)
    return engine


def request(prompt, max_tokens, priority=0, stop_ids=()):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop_token_ids=list(stop_ids))
    return Sequence(prompt, params.resolved(), 80, None, frozenset(), priority=priority)


def run(engine):
    """Step until no work is left, checking the sampler slots, block tables and blocks after every step. -> the
    sequences in the order they got their first token."""
    order = []
    while engine.has_work():
        for s in engine.step():
            if len(s.output_ids) == 1 and s not in order:
                order.append(s)
        check_sampler_counts(engine)
        check_blocks(engine)
        engine.cache.check([s.blocks for s in engine.running])
    return order


def test_the_queue_runs_in_priority_then_arrival_order():
    engine = priority_engine(max_batch=1)
    seqs = [request([1 + i, 2, 3], 3, priority=p) for i, p in enumerate([5, 1, 1, 0, 5, -2])]
    for s in seqs:
        engine.add(s)
    order = run(engine)
    assert [seqs.index(s) for s in order] == [5, 3, 1, 2, 0, 4]
    assert engine.num_preemptions == 0  # none was running when the others came
    assert_exact(seqs, set())
    early, late = request([1, 2], 2, priority=1), request([3, 4], 2, priority=1)  # made in this order,
    engine.add(request([5], 9, priority=0))
    engine.step()
    engine.add(late)  # added in the other: equal priorities go in the order they reach the engine
    engine.add(early)
    assert run(engine)[-2:] == [late, early]
    fcfs = priority_engine(max_batch=1, policy="fcfs")
    with pytest.raises(ValueError, match="priority = 5: requests have priorities only with scheduling_policy"):
        fcfs.add(request([1, 2], 3, priority=5))
    assert not fcfs.has_work()


def test_an_urgent_request_preempts_a_less_urgent_one_for_its_slot():
    """One slot: a running request of priority 3 is preempted by a priority-0 arrival, which runs at once; one of
    equal priority waits. The preempted request recomputes and gets exactly its tokens."""
    engine = priority_engine(max_batch=1)
    slow = request([5, 6, 7], 20, priority=3)
    engine.add(slow)
    for _ in range(4):
        engine.step()
    assert slow.output_ids and not slow.finished
    peer, urgent = request([8, 9], 3, priority=3), request([4, 4], 3, priority=0)
    engine.add(peer)
    engine.step()
    assert engine.running == [slow] and engine.num_preemptions == 0  # equal priority: it waits
    engine.add(urgent)
    engine.step()
    assert engine.running == [urgent] and engine.num_preemptions == 1 and list(engine.waiting) == [slow, peer]
    order = run(engine)
    assert order[0] is urgent and order[-1] is peer and slow.num_preemptions == 1
    assert_exact([slow, peer, urgent], set())


def test_a_preempted_request_alone_again_is_staged_anew():
    """The only decoding request is preempted at admission by an urgent one-token request (which never decodes)
    and comes back alone: its decode batch looks like the last one staged but its slot, blocks and positions are
    new, so the runner stages it again (Engine._admit's forget_batch), and it gets exactly its tokens."""
    engine = priority_engine(max_batch=1)
    slow = request([5, 6, 7], 20, priority=3)
    engine.add(slow)
    for _ in range(4):
        engine.step()
    urgent = request([4, 4, 4, 4, 4, 4], 1, priority=0)
    engine.add(urgent)
    run(engine)
    assert slow.num_preemptions == 1 and urgent.output_ids
    assert_exact([slow, urgent], set())


def test_an_urgent_request_preempts_for_blocks_and_the_least_urgent_goes_first():
    """Blocks: an urgent prompt that needs more blocks than are free preempts running requests of larger priority
    values, the largest (then the latest) first, only as many as it needs; and when decode runs out of blocks the
    preempted one is the least urgent, not the newest (fcfs would take the newest)."""
    engine = priority_engine(num_blocks=12, block_size=4, max_batch=4)
    a, b, c = request([1] * 8, 30, priority=1), request([2] * 8, 30, priority=7), request([3] * 8, 30, priority=4)
    for s in (a, b, c):
        engine.add(s)
        engine.step()
    assert set(engine.running) == {a, b, c} and engine.cache.num_free_blocks <= 6
    urgent = request([9] * 20, 2, priority=0)  # 5 blocks
    engine.add(urgent)
    engine.step()
    assert urgent in engine.running and b.num_preemptions == 1 and a.num_preemptions == c.num_preemptions == 0
    run(engine)
    assert_exact([a, b, c, urgent], set())

    for policy, victim in (("priority", 0), ("fcfs", 2)):
        engine = priority_engine(num_blocks=9, block_size=4, max_batch=3, policy=policy)
        seqs = [request([1 + i] * 5, 25, priority=p if policy == "priority" else 0) for i, p in enumerate([9, 0, 0])]
        for s in seqs:
            engine.add(s)
        while not engine.num_preemptions:
            engine.step()
        assert [s.num_preemptions for s in seqs] == [int(i == victim) for i in range(3)], policy
        run(engine)
        assert_exact(seqs, set())


def test_no_preemption_for_a_request_that_would_not_fit_anyway():
    """A waiting request that lacks more blocks than every less urgent running request holds preempts none of them
    (it would still not fit: they would only recompute): they run on, and it is admitted once a more urgent one
    frees its blocks."""
    engine = priority_engine(num_blocks=20, block_size=4, max_batch=4)
    big, small = request([1] * 40, 30, priority=0), request([2] * 4, 3, priority=5)  # 10 blocks, 1 block
    for s in (big, small):
        engine.add(s)
    engine.step()
    assert set(engine.running) == {big, small}
    waiting = request([3] * 40, 2, priority=1)  # 10 blocks: 9 free less the watermark's 1, and small holds 1
    engine.add(waiting)
    order = run(engine)
    assert engine.num_preemptions == 0 and order == [big, small, waiting]
    assert_exact([big, small, waiting], set())


@pytest.mark.parametrize("seed", range(3))
def test_random_priorities_with_stops_aborts_and_preemptions_are_exact(seed):
    """Random arrivals with random priorities, budgets, stop tokens and aborts, on a cache small enough that
    requests wait and are preempted both for blocks and by more urgent arrivals; every request gets exactly its
    tokens, and after every step the blocks, block tables and sampler slots are consistent."""
    rng = random.Random(seed)
    engine = priority_engine(num_blocks=rng.choice([12, 16]), block_size=4, max_batch=rng.choice([2, 3, 4]),
                             max_prefill_tokens=rng.choice([5, 24]))
    seqs, aborted = [], set()
    for _ in range(60):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        full, _ = expected(prompt, 30)
        stop = [full[rng.randrange(len(full))]] if rng.random() < 0.3 else []
        s = request(prompt, rng.randint(1, 30), priority=rng.randint(0, 3), stop_ids=stop)
        seqs.append(s)
        engine.add(s)
        for _ in range(rng.randint(0, 2)):
            engine.step()
            check_sampler_counts(engine)
            check_blocks(engine)
            engine.cache.check([s.blocks for s in engine.running])
        if rng.random() < 0.1 and engine.running:
            victim = rng.choice(engine.running)
            engine.abort(victim)
            aborted.add(victim.id)
    run(engine)
    assert_exact(seqs, aborted)
    assert engine.num_preemptions >= 5  # 11, 52, 10
    engine.step()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and sorted(engine.free_slots) == list(
        range(engine.max_batch_size))


def test_the_api_takes_a_priority_per_request():
    kw = dict(device="cpu", max_seq_len=128, max_batch_size=1)
    llm = LLM("tiny", scheduling_policy="priority", **kw)
    plain = LLM("tiny", **kw)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    outs = llm.generate(prompts, params, priority=[2, 1, 0])
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(prompts, params)]
    # the most urgent ran first: the others waited for it, the last one for both
    assert outs[2].time_to_first_token_s < outs[1].time_to_first_token_s < outs[0].time_to_first_token_s
    assert "".join(llm.stream("ab", params, priority=-1)) == llm.generate(["ab"], params)[0].text
    for call, words in ((lambda: llm.generate(prompts, params, priority=[0]), "one integer per prompt"),
                        (lambda: llm.generate(prompts[:1], params, priority=[1.5]), "must be an integer"),
                        (lambda: plain.generate(prompts[:1], params, priority=[1]), "scheduling_policy='priority'"),
                        (lambda: plain.new_request("x", params, priority=2), "scheduling_policy='priority'"),
                        (lambda: LLM("tiny", scheduling_policy="lifo", **kw), "must be one of fcfs, priority")):
        with pytest.raises(ValueError, match=words):
            call()
    assert not llm.has_unfinished() and not plain.has_unfinished()
