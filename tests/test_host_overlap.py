"""The engine one step ahead of the host: the next step is launched before the last one's tokens are read back, its
inputs come from the device, and a sequence that stopped has its extra token dropped. A model whose every token
depends on the whole cached context (read through the block tables) and on the input id the runner gathered on the
device checks that the KV cache, the per-step values and the sampler's slots stay exactly right through stops,
aborts, slot and block reuse, and the switches between prefill and decode; the tiny real model checks seeded,
penalised sampling of requests that share slots with stopped ones."""

from __future__ import annotations

import contextlib
import random
import time
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_host
from qwen2rt import LLM, SamplingParams, model_runner
from qwen2rt.engine import Engine, Sequence
from qwen2rt.kv_cache import KVCache
from test_parity import random_prompt

VOCAB = 53


def next_token(tokens: list[int]) -> int:
    """What ChainModel emits after `tokens`: it depends on the newest token, its position and all the others."""
    return (3 * tokens[-1] + len(tokens) - 1 + sum(tokens[:-1])) % VOCAB


class ChainModel:
    """Stands in for Qwen2Model on a one-layer cache of one value per token: reads every earlier position of the
    sequence back through the block tables, writes the token's value (`cell`: its input id) at its cache slot, and
    emits next_token (the hidden row carries it to compute_logits). Checks each decode step's rows against the
    engine's sequences."""

    def __init__(self, engine_ref: list):
        self.config = SimpleNamespace(vocab_size=VOCAB, num_hidden_layers=1, num_key_value_heads=1, head_dim=1)
        self.device = torch.device("cpu")
        self.engine_ref = engine_ref
        self.log: list[str] = []

    def named_range(self, name):
        return contextlib.nullcontext()

    def forward(self, ids, meta, kv_caches):
        self.log.append("prefill" if meta.is_prefill else "decode")
        cache = kv_caches[0][0].view(-1)
        bs = kv_caches[0][0].shape[1]
        if meta.is_prefill:
            row = torch.searchsorted(meta.query_start, torch.arange(ids.shape[0], dtype=torch.int32), right=True) - 1
        else:
            row = torch.arange(ids.shape[0])
            self.check_decode_rows(ids, meta)
        out = torch.zeros(ids.shape[0], 1)
        for t in range(ids.shape[0]):  # in order: a prompt's rows read the positions its earlier rows wrote
            p, table = int(meta.positions[t]), meta.block_tables[row[t]]
            if not meta.is_prefill and int(meta.seq_lens[t]) == 0:
                continue  # padding
            earlier = [int(table[q // bs]) * bs + q % bs for q in range(p)]
            value, out[t] = self.cell(int(ids[t]), p, cache[earlier])
            if int(meta.slot_mapping[t]) >= 0:
                cache[int(meta.slot_mapping[t])] = float(value)
        return out

    def cell(self, token: int, position: int, earlier: torch.Tensor) -> tuple[int, int]:
        """-> (the value cached for a token at `position` after the earlier positions' values, the next token)."""
        return token, (3 * token + position + int(earlier.sum())) % VOCAB

    def compute_logits(self, hidden):
        return torch.nn.functional.one_hot(hidden[:, 0].long(), VOCAB).float()

    def check_decode_rows(self, ids, meta):
        runner = self.engine_ref[0].runner
        bs = runner.cache.block_size
        for i, s in enumerate(runner._batch):
            p = s.num_launched - 1  # the newest token (the launch has not counted this step's yet)
            assert int(meta.positions[i]) == p and int(meta.seq_lens[i]) == p + 1
            assert meta.block_tables[i, :len(s.blocks)].tolist() == s.blocks
            assert int(meta.slot_mapping[i]) == s.blocks[p // bs] * bs + p % bs
            assert int(runner.rows.step[i]) == len(s.output_ids) + s.in_flight
            assert int(runner.rows.slot[i]) == s.slot and int(runner.rows.seed[i]) == s.seed
            if s.in_flight == 0:  # the input id is known to the host: the device gathered the right one
                assert int(ids[i]) == s.output_ids[-1]
        for i in range(len(runner._batch), ids.shape[0]):  # padding rows write and read nothing
            assert int(meta.slot_mapping[i]) == -1 and int(meta.seq_lens[i]) == 0


def chain_engine(num_blocks=40, block_size=4, max_batch=4, max_prefill_tokens=24, max_seq_len=80,
                 enable_prefix_caching=True):
    ref = []
    model = ChainModel(ref)
    cache = KVCache(model.config, num_blocks, block_size, "cpu", torch.float32)
    engine = Engine(model, cache, max_batch, max_seq_len, seed=0, max_prefill_tokens=max_prefill_tokens,
                    enable_prefix_caching=enable_prefix_caching)
    ref.append(engine)
    return engine


def expected(prompt: list[int], max_tokens: int, stop_ids=(), max_seq_len=80, rule=None) -> tuple[list[int], str]:
    """The tokens and finish reason a request gets from a model whose next token after `tokens` is rule(tokens)
    (default: ChainModel's next_token)."""
    rule = rule or next_token
    tokens, out = list(prompt), []
    while True:
        t = rule(tokens)
        tokens.append(t)
        out.append(t)
        if t in stop_ids:
            return out, "stop"
        if len(out) == max_tokens or len(tokens) >= max_seq_len:
            return out, "length"


def request(prompt, max_tokens, stop_ids=()):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop_token_ids=list(stop_ids))
    return Sequence(prompt, params.resolved(), 80, None, frozenset())


def check_sampler_counts(engine):
    """Every running sequence's sampler slot has counted exactly its own tokens (read back or in flight): the extra
    token of a stopped sequence never reaches the slot's next owner."""
    for s in engine.running:
        assert int(engine.sampler.counts[s.slot].sum()) == len(s.output_ids) + s.in_flight


def check_blocks(engine):
    """Blocks are taken as tokens come: a running sequence holds those of its prefill, and once decoding those of
    every position launched (its newest token's block is taken by the step that writes it), no more."""
    blocks_for = engine.cache.blocks_for
    for s in engine.running:
        want = blocks_for(len(s.prefill_ids)) if not s.prefill_done else blocks_for(s.num_launched - 1)
        assert len(s.blocks) == want, (s.id, len(s.blocks), want)


def test_next_step_is_launched_before_the_last_one_is_read_back(monkeypatch):
    engine = chain_engine()
    log = engine.model.log
    append = Sequence.append
    monkeypatch.setattr(Sequence, "append", lambda s, *args: (log.append("read"), append(s, *args)))
    seq = request([5, 6, 7, 8], 4)
    engine.add(seq)
    assert engine.step() == [seq]  # launches the prefill and the first decode step, reads the prefill's token
    assert log == ["prefill", "decode", "read"]
    while not seq.finished:
        engine.step()
    # the last decode step is launched when the one before is read; nothing is launched past the length limit
    assert log == ["prefill", "decode", "read", "decode", "read", "decode", "read", "read"]
    assert (seq.output_ids, seq.finish_reason) == expected([5, 6, 7, 8], 4)
    assert engine.step() == [] and not engine.has_work()


def test_a_token_arrives_when_its_step_is_read_back_not_before(monkeypatch):
    """Launched.token_ids waits for the step (on CUDA its event: a prefill's whole device time). A token's time
    (time to first token, the per-token rate) is read after that wait, never before it."""
    engine = chain_engine()
    waited = []
    token_ids = model_runner.Launched.token_ids

    def slow_device(launched):
        time.sleep(0.01)  # the device still at work
        waited.append(time.perf_counter())
        return token_ids(launched)

    monkeypatch.setattr(model_runner.Launched, "token_ids", slow_device)
    seq = request([5, 6, 7, 8], 3)
    engine.add(seq)
    while not seq.finished:
        engine.step()
    assert len(waited) == 3  # the prefill and two decode steps, each read back once
    assert seq.first_token_time >= waited[0] and seq.last_token_time >= waited[-1]


def test_token_after_a_stop_is_computed_and_dropped():
    engine = chain_engine()
    prompt = [1, 2, 3]
    full, _ = expected(prompt, 10)
    stop = full[3]
    seq = request(prompt, 10, stop_ids=[stop])
    engine.add(seq)
    while not seq.finished:
        engine.step()
    assert (seq.output_ids, seq.finish_reason) == expected(prompt, 10, [stop])
    assert engine.model.log.count("decode") == len(seq.output_ids)  # one decode step more than it needed
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.running
    # the step still in flight belongs to nobody: the next request takes the slot and blocks and is unaffected
    other = request([9, 9, 9, 9, 9], 6, stop_ids=[expected([9] * 5, 6)[0][2]])
    engine.add(other)
    while not other.finished:
        engine.step()
        check_sampler_counts(engine)
    assert (other.output_ids, other.finish_reason) == expected([9] * 5, 6, other.params.stop_token_ids)


def random_workload(engine, rng, num_requests, new_prompt, max_tokens, stop_p, max_steps_between, check):
    """Requests arriving between 0..max_steps_between engine steps, each with a random budget up to max_tokens and,
    with probability stop_p, a stop token from its own expected output; after each arrival a running or preempted
    (waiting again) request is aborted with probability 0.1; then drained. check(engine) after every step. ->
    (sequences, ids aborted)."""
    seqs, aborted = [], set()
    for _ in range(num_requests):
        prompt = new_prompt()
        full, _ = expected(prompt, max_tokens)
        stop_ids = [full[rng.randrange(len(full))]] if rng.random() < stop_p else []
        s = request(prompt, rng.randint(1, max_tokens), stop_ids)
        seqs.append(s)
        engine.add(s)
        for _ in range(rng.randint(0, max_steps_between)):
            engine.step()
            check(engine)
        candidates = engine.running + [s for s in engine.waiting if s.num_preemptions]
        if rng.random() < 0.1 and candidates:
            victim = rng.choice(candidates)
            engine.abort(victim)
            aborted.add(victim.id)
    while engine.has_work():
        engine.step()
        check(engine)
    return seqs, aborted


def assert_exact(seqs, aborted) -> None:
    """Each request got exactly its own tokens (an aborted one: a prefix of them)."""
    for s in seqs:
        want, reason = expected(s.prompt_ids, s.params.max_tokens, s.params.stop_token_ids)
        if s.id in aborted:
            assert s.finish_reason == "abort" and s.output_ids == want[:len(s.output_ids)]
        else:
            assert (s.output_ids, s.finish_reason) == (want, reason)


@pytest.mark.parametrize("seed, caching", [(0, True), (1, True), (2, False)])
def test_many_requests_with_stops_and_aborts_are_exact(seed, caching):
    """Random arrivals, prompt lengths, budgets, stop tokens and aborts, with chunked prefill alternating with decode
    and a cache small enough that requests wait and running ones are preempted (and recompute their tokens, some
    with one in flight): every request gets exactly its own tokens, nothing leaks."""
    rng = random.Random(seed)
    engine = chain_engine(num_blocks=30, max_batch=4, max_prefill_tokens=rng.choice([5, 16, 64]),
                          enable_prefix_caching=caching)
    def check(engine):
        check_sampler_counts(engine)
        check_blocks(engine)
    seqs, aborted = random_workload(engine, rng, 150, lambda: [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))],
                                    max_tokens=40, stop_p=0.5, max_steps_between=4, check=check)
    assert engine.step() == []  # reads back the step still in flight (a stopped sequence's extra token)
    assert_exact(seqs, aborted)
    assert engine.num_preemptions >= 20
    assert any(s.id in aborted and s.num_preemptions for s in seqs)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    assert sorted(engine.free_slots) == list(range(4))
    assert engine._in_flight is None
    # nothing is launched past a length limit; past a stop (or an abort), at most the one step already launched
    assert all(s.in_flight == 0 for s in seqs if s.finish_reason == "length")
    assert all(s.in_flight in (0, 1) for s in seqs)


def test_stopped_requests_do_not_disturb_seeded_penalised_neighbours():
    """Seeded sampling with penalties (which read the sampler slot's counts): each request alone, then all together
    two at a time, where requests stop on a stop token (so an extra token is computed for them) and the next one
    takes their slot. Every request draws exactly its tokens alone."""
    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=2)

    def params(seed, stop=()):
        return SamplingParams(max_tokens=12, temperature=0.8, top_k=0, top_p=0.95, repetition_penalty=1.3,
                              presence_penalty=1.5, frequency_penalty=2.0, seed=seed, ignore_eos=True,
                              stop_token_ids=list(stop))

    prompts = [random_prompt(4 + i, 256, 20 + i) for i in range(6)]
    stops = [llm.generate(p, params(i))[0].token_ids[2 + i % 3] for i, p in enumerate(prompts)]
    alone = [llm.generate(p, params(i, [stops[i]]))[0] for i, p in enumerate(prompts)]
    assert sum(o.finish_reason == "stop" for o in alone) >= 4
    seqs = [llm._new_sequence(p, llm._params(params(i, [stops[i]]))) for i, p in enumerate(prompts)]
    llm.submit(seqs)
    while not all(s.finished for s in seqs):
        llm.step()
    assert [s.output_ids for s in seqs] == [o.token_ids for o in alone]


def test_a_request_that_preempts_itself_and_comes_back_alone_is_staged_anew():
    """The only decoding request needs a block while the rest of the cache is held by one whose last token is in
    flight: it preempts itself, and later comes back alone, the same Sequence in a batch of one as before, but in
    another slot, with other blocks and positions: the runner must stage it anew, not advance the old values (found
    by a review helper's fuzzing: the decode rows' check failed, and the tokens went wrong)."""
    engine = chain_engine(num_blocks=32, block_size=1, max_batch=2, max_prefill_tokens=2,
                          enable_prefix_caching=False)
    b = request([1, 2], 30)
    engine.add(b)
    engine.step()
    a = request(list(range(3, 23)), 1)  # its 20-token prompt's prefill samples its only token
    engine.add(a)
    while engine.has_work():
        engine.step()
        check_blocks(engine)
    assert b.num_preemptions == 1 and engine.num_preemptions == 1
    assert (b.output_ids, b.finish_reason) == expected([1, 2], 30)
    assert (a.output_ids, a.finish_reason) == expected(a.prompt_ids, 1)


def test_preempted_requests_draw_exactly_their_tokens():
    """A cache that holds one request's whole length (83 tokens at most) but not four: the newest requests are
    preempted (their blocks freed) and recompute their prompt and tokens when admitted again. Seeded, penalised
    sampling with min_tokens, a logit bias (+100 on the stop token of two: held until min_tokens), logprobs and
    prompt_logprobs gives each request the tokens it draws with a block per request (taken at admission), with the
    same log-probabilities (those of a recomputed token come from a prefill's logits: equal within float32)."""
    def params(i):
        return SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, repetition_penalty=1.3 if i % 2 else 1.0,
                              presence_penalty=1.5, frequency_penalty=2.0, seed=i, ignore_eos=True, min_tokens=45,
                              stop_token_ids=[stops[i]], logit_bias={7: 2.0, stops[i]: 100.0 if i >= 2 else 0.0},
                              logprobs=2, prompt_logprobs=1 if i % 2 else None)

    prompts = [random_prompt(20 + i, 256, 30 + i) for i in range(4)]
    roomy = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4, block_size=128)  # a block per request
    stops = [511, 511, 9, 9]  # the first two: a token each draws at step 50 (with the same holds until then)
    stops[:2] = [roomy.generate(prompts[i], params(i))[0].token_ids[50] for i in range(2)]
    want = roomy.generate(prompts, [params(i) for i in range(4)])
    small = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=4, block_size=8, num_kv_blocks=11)
    got = small.generate(prompts, [params(i) for i in range(4)])
    assert small.engine.num_preemptions >= 4
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    # the last two are forced to stop once min_tokens lets them (a bias of 100): held back until then
    assert [(len(o.token_ids), o.finish_reason) for o in want[2:]] == [(46, "stop")] * 2
    assert sum(len(o.token_ids) < 60 for o in want[:2]) >= 1 and all(len(o.token_ids) > 45 for o in want)
    for a, b in zip(got, want):
        assert [t for t, _ in a.logprobs] == pytest.approx([t for t, _ in b.logprobs], abs=1e-4)
        assert [[i for i, _ in top] for _, top in a.logprobs] == [[i for i, _ in top] for _, top in b.logprobs]
        if b.prompt_logprobs is not None:
            assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(b.prompt_token_ids)
            assert [e[0] for e in a.prompt_logprobs[1:]] == pytest.approx([e[0] for e in b.prompt_logprobs[1:]],
                                                                         abs=1e-4)
    assert small.kv_cache.num_free_blocks == 11 and not small.engine.running


def test_abort_with_a_token_in_flight_then_the_engine_goes_on():
    llm = LLM("tiny", device="cpu", max_seq_len=128, max_batch_size=2)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    before = llm.generate("keep going", greedy)[0].token_ids
    it = llm.stream("cancel me", SamplingParams(max_tokens=50, temperature=1.0, ignore_eos=True))
    next(it)
    next(it)
    assert llm.engine._in_flight is not None and llm.engine._in_flight.seqs  # a decode step is on its way
    it.close()
    assert not llm.engine.running and len(llm.engine.free_slots) == 2
    assert llm.generate("keep going", greedy)[0].token_ids == before


def test_bench_host_runs(tmp_path):
    rows = bench_host.main(["--smoke", "--out", str(tmp_path / "host.json")])
    assert {r["mode"] for r in rows} == {"graphs", "eager"}
    assert all(r["us_per_step"] > 0 for r in rows)
