"""The engine: allocator and scheduler (with a fake model, so thousands of requests take seconds), chunked prefill,
decode interleaving, and the asyncio API."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import gc
import random

import pytest
import torch

from qwen2rt import LLM, SamplingParams
from qwen2rt.engine import Engine, Sequence
from qwen2rt.kv_cache import KVCache
from qwen2rt.models.config import builtin_config
from qwen2rt.tokenizer import ByteTokenizer
from test_parity import hf_greedy, hf_logits, random_prompt, rel_err
from test_prefill_graphs import stand_in_step

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class FakeModel:
    """Stands in for Qwen2Model: instant, and it emits token (position % vocab) so outputs are checkable."""

    def __init__(self, vocab=50):
        self.config = dataclasses.replace(builtin_config("tiny"), vocab_size=vocab)
        self.device = torch.device("cpu")
        self.steps = []

    def forward(self, ids, meta, layers):
        self.steps.append("prefill" if meta.is_prefill else "decode")
        # each hidden row carries its token to compute_logits, whichever rows the engine picks
        return ((meta.positions + 1) % self.config.vocab_size).float()[:, None]

    def named_range(self, name):
        return contextlib.nullcontext()

    def compute_logits(self, hidden):
        return torch.nn.functional.one_hot(hidden[:, 0].long(), self.config.vocab_size).float()


def fake_engine(num_blocks=20, block_size=4, max_batch=4, max_prefill_tokens=64, enable_prefix_caching=True):
    model = FakeModel()
    cache = KVCache(model.config, num_blocks, block_size, "cpu", torch.float32)
    return Engine(model, cache, max_batch, 256, seed=0, max_prefill_tokens=max_prefill_tokens,
                  enable_prefix_caching=enable_prefix_caching)


def seq(prompt_len, max_tokens):
    return Sequence([i % 50 for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                            ignore_eos=True).resolved(), 256, None, frozenset())


def drain(engine, limit=100000):
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_thousands_of_requests_leak_nothing():
    engine = fake_engine()
    rng = random.Random(0)
    seqs = []
    for _ in range(2000):
        s = seq(rng.randint(1, 20), rng.randint(1, 12))
        seqs.append(s)
        engine.add(s)
        if rng.random() < 0.3:
            engine.step()
    drain(engine)
    assert all(s.finish_reason == "length" for s in seqs)
    for s in seqs[:50]:  # FakeModel emits position + 1: the tokens say where each sequence was
        n = len(s.prompt_ids)
        assert s.output_ids == [(n + i) % 50 for i in range(len(s.output_ids))]
        assert len(s.output_ids) == min(s.max_len - n, s.params.max_tokens)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    assert sorted(engine.free_slots) == list(range(4))


def test_requests_wait_when_blocks_or_slots_run_out():
    engine = fake_engine(num_blocks=7, block_size=4, max_batch=2, enable_prefix_caching=False)
    big = [seq(12, 8) for _ in range(3)]  # 3 prompt blocks and 5 in all: a second would leave no watermark block
    for s in big:
        engine.add(s)
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 2 and len(big[0].blocks) == 4  # its first decode's
    drain(engine)
    assert all(s.output_ids == [(12 + i) % 50 for i in range(8)] for s in big)
    engine = fake_engine(num_blocks=4, block_size=4, max_batch=2)
    whole = seq(15, 1)  # its prompt takes every block: the watermark is kept only while others run
    engine.add(whole)
    drain(engine, limit=50)
    assert whole.output_ids == [15]
    engine = fake_engine(num_blocks=50, max_batch=2)
    small = [seq(2, 3) for _ in range(5)]
    for s in small:
        engine.add(s)
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 3  # two slots
    drain(engine)
    with pytest.raises(ValueError, match="needs 64 KV cache blocks"):
        engine.add(seq(200, 56))


def test_blocks_are_taken_as_tokens_come_and_the_newest_request_is_preempted():
    """Two requests whose whole lengths do not fit together both start (each with its prompt's block); when the
    cache runs out, the newer one is preempted, goes back to the front of the queue (before a request that came
    after it), then recomputes its tokens and goes on where it stopped."""
    engine = fake_engine(num_blocks=6, block_size=4, max_batch=2)
    old, new, late = seq(4, 16), seq(4, 16), seq(4, 1)  # 5 blocks each at the end; late waits for a slot
    for s in (old, new, late):
        engine.add(s)
    engine.step()
    assert engine.running == [old, new] and len(old.blocks) == len(new.blocks) == 2
    held = []
    while engine.running == [old, new]:
        held.append((len(old.blocks), len(new.blocks)))
        engine.step()
    assert max(held) == (3, 3) and held[-1] == (3, 3)  # the seventh block was not there
    assert engine.running == [old] and list(engine.waiting) == [new, late] and engine.num_preemptions == 1
    assert new.blocks == [] and new.slot is None and new.num_preemptions == 1 and 0 < len(new.output_ids) < 16
    drain(engine)
    for s in (old, new, late):  # FakeModel emits position + 1: each token says where it was computed
        assert s.finish_reason == "length" and s.output_ids == [(4 + i) % 50 for i in range(s.params.max_tokens)]
    assert old.num_preemptions == 0 and engine.num_preemptions == 1
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and sorted(engine.free_slots) == [0, 1]


def test_long_prompt_is_chunked_and_does_not_starve_decodes():
    engine = fake_engine(num_blocks=100, max_prefill_tokens=16)
    short = seq(3, 40)
    engine.add(short)
    engine.step()  # short is prefilled and decoding
    long = seq(100, 2)
    engine.add(long)
    tokens_before = len(short.output_ids)
    steps = 0
    while not long.output_ids:
        engine.step()
        steps += 1
    assert long.num_prefilled == 100 and steps >= 2 * 7 - 1  # 7 chunks of <= 16 tokens, decodes in between
    assert len(short.output_ids) - tokens_before >= 6  # the running decode kept going
    assert long.output_ids[0] == 100 % 50


@pytest.mark.parametrize("name", ["dense_gqa", "moe_renorm"])
def test_chunked_prefill_matches_hf(name, hf_checkpoints):
    path, hf = hf_checkpoints[name]
    llm = LLM(path, device="cpu", max_seq_len=128, max_prefill_tokens=7)
    prompt = random_prompt(40, hf.config.vocab_size, 6)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, prompt, 20)
    assert rel_err(llm.logits(prompt), hf_logits(hf, prompt)) < 1e-4


def test_asyncio_api():
    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    prompts = ["one", "two two", "three three three", "four", "five five"]
    expected = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]

    async def main():
        outs = await asyncio.gather(*(llm.agenerate(p, GREEDY) for p in prompts))
        assert [o[0].token_ids for o in outs] == expected
        pieces = [piece async for piece in llm.astream("two two", GREEDY)]
        assert "".join(pieces) == llm.generate("two two", GREEDY)[0].text
        free = llm.kv_cache.num_free_blocks
        it = llm.astream("cancel", SamplingParams(max_tokens=100, temperature=1.0, ignore_eos=True))
        await it.__anext__()
        await it.aclose()
        assert llm.kv_cache.num_free_blocks == free

    asyncio.run(main())


def test_asyncio_api_never_waits_for_the_engine_lock_on_the_event_loop():
    """While another thread holds the engine lock (a step in progress), a new agenerate / astream submits from a
    worker thread: the event loop keeps running (it waited for whole steps on the lock before). The lock is let go
    only once the loop has shown it runs, so a blocked loop fails the test instead of hanging it."""
    import threading

    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    want = llm.generate("two two", GREEDY)[0]
    assert want.text  # the stream yields pieces

    async def main():
        loop_ran, holding, waited = threading.Event(), threading.Event(), []

        def hold():
            with llm._locked():
                holding.set()
                waited.append(loop_ran.wait(timeout=5))  # False: the loop stood still while the lock was held
        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait()
        task = asyncio.ensure_future(llm.agenerate("two two", GREEDY))
        stream = llm.astream("two two", GREEDY)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # returns only if the loop is free while the lock is held
        assert not task.done() and not first.done()
        loop_ran.set()
        holder.join()
        assert waited == [True], "the event loop waited for the engine lock"
        assert (await task)[0].token_ids == want.token_ids
        pieces = [await first] + [piece async for piece in stream]
        assert "".join(pieces) == want.text
        assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks

    asyncio.run(main())


def test_asyncio_requests_share_one_stepping_task_and_leave_the_default_executor_free():
    """Concurrent agenerate / astream requests (and a thread calling generate meanwhile) are stepped by one task per
    event loop, one step at a time in the loop's default executor: never more than one engine step is queued or
    running there (each waiting request used to keep one queued, which then stepped the engine once more, and the
    application's own to_thread calls waited behind them all), the outputs are those of generate, and every block
    is freed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    prompts = ["one", "two two", "three three three", "four", "five five", "six"]
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    want_text = llm.generate("two two", GREEDY)[0].text
    steps = {"pending": 0, "most": 0, "all": 0}

    def runs_a_step(fn, args) -> bool:  # through functools.partial and Context.run wrappers
        while isinstance(fn, functools.partial):
            fn, args = fn.func, fn.args + tuple(args)
        return "step" in getattr(fn, "__name__", "") or any(callable(a) and runs_a_step(a, ()) for a in args)

    class CountingExecutor(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            if not runs_a_step(fn, args):
                return super().submit(fn, *args, **kwargs)
            steps["pending"] += 1
            steps["all"] += 1
            steps["most"] = max(steps["most"], steps["pending"])
            future = super().submit(fn, *args, **kwargs)
            future.add_done_callback(lambda _: steps.update(pending=steps["pending"] - 1))
            return future

    async def main():
        asyncio.get_running_loop().set_default_executor(CountingExecutor(max_workers=4))
        side = []
        thread = threading.Thread(target=lambda: side.append(llm.generate("four", GREEDY)[0].token_ids))
        thread.start()

        async def stream():
            return "".join([piece async for piece in llm.astream("two two", GREEDY)])
        outs = await asyncio.gather(*(llm.agenerate(p, GREEDY) for p in prompts), stream())
        thread.join()
        assert [o[0].token_ids for o in outs[:-1]] == want and outs[-1] == want_text
        assert side == [want[3]]
        assert steps["all"] >= GREEDY.max_tokens and steps["most"] == 1, steps  # the executor was the loop's
        assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks
        assert llm._async_driver().waiters == []
        # a request cancelled while it waits: its blocks are freed, the others go on
        cancelled = asyncio.ensure_future(llm.agenerate("cancel", SamplingParams(max_tokens=100, ignore_eos=True)))
        other = asyncio.ensure_future(llm.agenerate("two two", GREEDY))
        while len(llm._async_driver().waiters) < 2:
            await asyncio.sleep(0.001)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (await other)[0].text == want_text
        assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks and llm._async_driver().waiters == []

    asyncio.run(main())
    # a request's submit runs in its caller's context (contextvars), as asyncio.to_thread runs it
    request_id, seen, submit = contextvars.ContextVar("request_id"), [], llm.submit
    llm.submit = lambda seqs: seen.append(request_id.get(None)) or submit(seqs)

    async def tagged(i):
        request_id.set(i)
        return await llm.agenerate(prompts[i], GREEDY)

    async def three():
        return await asyncio.gather(*(tagged(i) for i in range(3)))
    asyncio.run(three())
    assert sorted(seen) == [0, 1, 2]
    gc.collect()
    assert len(llm._drivers) == 0  # no finished event loop is kept alive by its driver (its task held it)


def test_asyncio_requests_fail_with_a_failed_step_and_the_engine_goes_on():
    """A step that raises fails every request waiting on the stepping task with an error naming it (not a short
    output), frees their blocks, and the next requests run normally; a stepping task that stops (cancelled) ends
    its waiting requests with an error instead of leaving them hanging."""
    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    want = llm.generate("two two", GREEDY)[0].token_ids
    real_step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected")
        return real_step()

    async def main():
        llm.engine.step = failing_step
        results = await asyncio.gather(llm.agenerate("one", GREEDY), llm.agenerate("two", GREEDY),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "engine step failed: ValueError('injected')" in str(r)
                   for r in results), results
        assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks
        assert (await llm.agenerate("two two", GREEDY))[0].token_ids == want
        llm.engine.step = real_step

        task = asyncio.ensure_future(llm.agenerate("two two", SamplingParams(max_tokens=100, ignore_eos=True)))
        while llm._async_driver().task is None or llm._async_driver().task.done():
            await asyncio.sleep(0)
        llm._async_driver().task.cancel()
        with pytest.raises(RuntimeError, match="the asyncio task stepping the engine stopped"):
            await task
        assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks
        assert (await llm.agenerate("two two", GREEDY))[0].token_ids == want  # a new task steps again

    asyncio.run(main())


def test_an_abort_from_inside_a_step_runs_when_the_step_ends():
    """A stream generator finalised by the garbage collector while its thread runs a step aborts its request from
    inside that step: the abort waits for the step's end instead of deadlocking on the engine lock."""
    import threading

    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    seq = llm.new_request("inside", SamplingParams(max_tokens=50, ignore_eos=True))
    llm.submit([seq])
    real_step, seen = llm.engine.step, []

    def step_that_aborts():
        out = real_step()
        llm.abort([seq])  # what the finaliser does
        seen.append(seq.finished)  # not yet: deferred to the step's end
        return out
    llm.engine.step = step_that_aborts
    worker = threading.Thread(target=llm.step, daemon=True)  # a deadlock must not keep pytest from exiting
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "deadlock: abort re-took the engine lock inside a step"
    llm.engine.step = real_step
    assert seen == [False] and seq.finish_reason == "abort" and not llm.has_unfinished()
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


def test_a_deferred_abort_that_raises_is_kept_and_the_lock_let_go():
    """A deferred abort that fails (an interrupt) stays queued for the next release, and the lock's owner is
    cleared: a later abort from outside any step runs at once instead of being deferred for ever."""
    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    a, b = (llm.new_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in ("a", "b"))
    llm.submit([a, b])
    real_abort, calls = llm.engine.abort, []

    def interrupted_once(seq):
        calls.append(seq)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_abort(seq)
    llm.engine.abort = interrupted_once
    with pytest.raises(KeyboardInterrupt):
        with llm._locked():
            llm.abort([a])  # from the holder: deferred to the release, where it raises
    assert llm._lock_owner is None and a.finish_reason is None and llm._deferred_aborts == [a]
    llm.abort([b])  # not the holder: runs now, and the release runs the kept abort of a too
    llm.engine.abort = real_abort
    assert (a.finish_reason, b.finish_reason) == ("abort", "abort") and not llm.has_unfinished()
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


def test_a_step_that_fails_while_reading_back_ends_its_sequences(monkeypatch):
    """The read-back of a step raises (an interrupt, a device error surfacing at the event): its tokens are lost,
    so its sequences end as aborted instead of waiting for ever for tokens planned as delivered; a stream of one
    of them says so instead of ending as if complete."""
    from qwen2rt.model_runner import Launched

    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4)
    other = llm.new_request("other", SamplingParams(max_tokens=20, ignore_eos=True))
    llm.submit([other])
    stream = llm.stream("streamed", SamplingParams(max_tokens=20, ignore_eos=True))
    next(stream)
    real, calls = Launched.token_ids, []

    def failing(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Launched, "token_ids", failing)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(5):
            llm.step()
    assert other.finish_reason == "abort" and not llm.has_unfinished()
    with pytest.raises(RuntimeError, match="aborted by a failed engine step"):
        list(stream)
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks
    assert len(llm.generate("other", GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_graph_options_on_cpu_run_eagerly():
    llm = LLM("tiny", device="cpu", enforce_eager=False, capture_graphs="lazy")
    assert not llm.use_graphs  # CUDA graphs need CUDA and the triton backend
    with pytest.raises(ValueError, match="capture_graphs"):
        LLM("tiny", device="cpu", capture_graphs="sometimes")
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        LLM("tiny", device="cpu", max_prefill_tokens=0)


def test_lazily_captured_graph_replays_the_real_batch(monkeypatch):
    """Capturing a bucket on first use runs it with padding rows; the replay right after must see the real batch.
    A stand-in graph (CUDA graphs need a GPU) replays the step on whatever the static buffers then hold."""
    eager = LLM("tiny", device="cpu", max_batch_size=8)
    lazy = LLM("tiny", device="cpu", max_batch_size=8, cuda_graph_prefill_tokens=())  # decode graphs only here
    decoder = lazy.engine.decoder
    captured = []

    def capture(bucket, variant):  # what ModelRunner.capture does to the buffers: padding, warm-up step, record
        decoder._fill([], bucket)
        decoder._sample(decoder._forward(bucket), bucket, variant)
        captured.append((bucket, variant))
        decoder.graphs[(bucket, variant)] = stand_in_step(decoder, bucket, variant)
        return decoder.graphs[(bucket, variant)]

    monkeypatch.setattr(decoder, "capture", capture)
    decoder.use_graphs = True
    prompts = [random_prompt(5 + 3 * i, 256, i) for i in range(5)]  # 5 sequences: the 8 bucket
    assert [o.token_ids for o in lazy.generate(prompts, GREEDY)] == \
        [o.token_ids for o in eager.generate(prompts, GREEDY)]
    assert (8, "greedy") in captured


def test_seeded_request_draws_the_same_tokens_whatever_sampler_form_its_batch_needs():
    llm = LLM("tiny", device="cpu", max_batch_size=4)
    top20 = SamplingParams(max_tokens=24, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=5,
                           ignore_eos=True)
    nucleus = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=6, ignore_eos=True)
    prompt = random_prompt(9, 256, 3)
    alone = llm.generate(prompt, top20)[0].token_ids  # the top-k sampler
    seq = llm._new_sequence(prompt, llm._params(top20))
    other = llm._new_sequence(random_prompt(5, 256, 4), llm._params(nucleus))
    llm.submit([seq, other])  # one batch that needs the full sampler (top-p over the whole vocabulary)
    while not seq.finished:
        llm.step()
    assert seq.output_ids == alone


def feed_bytes(text, params, max_seq_len=256):
    """A Sequence fed `text` one byte token at a time (the byte tokenizer), streaming as it goes: -> (sequence,
    the pieces take_new_text handed out, each taken right after its token)."""
    s = Sequence([1, 2, 3], params.resolved(), max_seq_len, ByteTokenizer(512), frozenset())
    pieces = []
    for token in text.encode():
        s.append(token)
        pieces.append(s.take_new_text())
        if s.finished:
            break
    return s, pieces


@pytest.mark.parametrize("stop", [["XYZ"], ["XYZ", "Q"], ["XYZW", "XYZ"]])
def test_stop_string_split_across_tokens_is_never_streamed(stop):
    """'abcXYZdef' byte by byte with stop 'XYZ': the stream gives 'abc' and nothing of the stop string, even while
    'X' and 'XY' could still be the start of something else."""
    s, pieces = feed_bytes("abcXYZdef", SamplingParams(max_tokens=20, temperature=0, stop=stop))
    assert s.finish_reason == "stop" and s.text == "abc" and "".join(pieces) == "abc"
    assert s.output_ids == list(b"abcXYZ")  # finished on the token that completed the stop string
    assert not any(c in "".join(pieces) for c in "XYZ")


def test_held_back_text_is_released_when_the_stop_string_does_not_form():
    s, pieces = feed_bytes("abXYabXYZ", SamplingParams(max_tokens=20, temperature=0, stop="XYZW"))
    assert pieces[:5] == ["", "", "", "a", "b"]  # three characters held back at every step
    assert s.finish_reason is None and "".join(pieces) == "abXYab"
    s, pieces = feed_bytes("abXY", SamplingParams(max_tokens=4, temperature=0, stop="XYZ"))
    assert s.finish_reason == "length" and "".join(pieces) == "abXY"  # the end of the text releases the hold


def test_stop_strings_after_a_long_text():
    """The stop-string scan looks only at the characters that can end a new match: a stop string 5,000 characters
    in is still found where it forms ('bS' completes before 'STOP' does), the text is cut where it starts, and the
    streamed pieces join to exactly the text."""
    body = "x" * 5000
    s, pieces = feed_bytes(body + "abSTOPzzz", SamplingParams(max_tokens=6000, temperature=0, stop=["STOP", "bS"]),
                           max_seq_len=8192)
    assert s.finish_reason == "stop" and s.text == body + "a" and "".join(pieces) == s.text
    assert s.output_ids == list((body + "abS").encode())
    s, pieces = feed_bytes(body + "abSTOP", SamplingParams(max_tokens=6000, temperature=0, stop=["STOP"]),
                           max_seq_len=8192)
    assert s.text == body + "ab" and "".join(pieces) == s.text
    s, pieces = feed_bytes(body, SamplingParams(max_tokens=5000, temperature=0, stop=["xxxy"]), max_seq_len=8192)
    assert s.finish_reason == "length" and s.text == body and "".join(pieces) == body
