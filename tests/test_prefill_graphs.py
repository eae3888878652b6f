"""Prefill graphs (model_runner): a prefill step of up to PREFILL_GRAPH_SEQS chunks, padded to a token bucket and run
on static buffers, against the eager prefill. CUDA graphs need a GPU, so here (as in test_engine) a stand-in graph
replays the same padded forward eagerly on whatever the static buffers hold when it is replayed; test_gpu replays
real graphs."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from qwen2rt import LLM, SamplingParams
from qwen2rt.kernels import rope_attention
from qwen2rt.model_runner import StepGraphs
from qwen2rt.models.backend import AttentionMetadata, AttentionShape, TritonBackend
from qwen2rt.sampling import VARIANTS
from test_parity import random_prompt

BUCKETS = (8, 16, 32)
LOGPROBS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
TOL = 1e-4  # logprobs, fp32 torch backend: the padded GEMMs' rows differ from the unpadded ones by ~1e-6


class StandInGraph:
    def __init__(self, replay):
        self.replay = replay


def stand_in_step(runner, bucket: int, variant: str) -> StepGraphs:
    """A decode step's graphs, stood in for: the forward replays the bucket's forward eagerly on whatever the static
    buffers hold and keeps its logits where the real forward graph's output is (runner._logits), the sampler reads
    them there (as do the log-probabilities)."""
    def forward():
        runner._logits[bucket] = runner._forward(bucket)

    return StepGraphs(StandInGraph(forward), StandInGraph(lambda: runner._sample(runner._logits[bucket], bucket,
                                                                                  variant)))


def with_stand_in_graphs(llm: LLM) -> dict:
    """Turn graphs on for a CPU LLM: each capture runs what ModelRunner's does to the static buffers (stage
    padding, warm up) and records a graph whose replay runs the step eagerly. -> what was captured and staged."""
    runner = llm.engine.decoder
    seen = {"prefill": [], "decode": [], "staged_at_capture": []}

    def capture_prefill(bucket):
        runner._stage_prefill([], bucket)
        host = runner.prefill_values.host
        seen["staged_at_capture"].append(host["seq_lens"].tolist() + host["query_start"].tolist())
        runner.prefill_logits[bucket] = runner._prefill_forward(bucket)
        seen["prefill"].append(bucket)

        def replay():
            runner.prefill_logits[bucket].copy_(runner._prefill_forward(bucket))

        runner.prefill_graphs[bucket] = StandInGraph(replay)
        return runner.prefill_graphs[bucket]

    def capture(bucket, variant):
        runner._fill([], bucket)
        runner._sample(runner._forward(bucket), bucket, variant)
        seen["decode"].append((bucket, variant))
        runner.graphs[(bucket, variant)] = stand_in_step(runner, bucket, variant)
        return runner.graphs[(bucket, variant)]

    def capture_logprobs(bucket):  # reads the forward graph's logits
        runner._logprob_graphs[bucket] = StandInGraph(lambda: runner._logprobs(runner._logits[bucket], bucket))
        return runner._logprob_graphs[bucket]

    runner.capture_prefill, runner.capture, runner.capture_logprobs = capture_prefill, capture, capture_logprobs
    runner.use_graphs = True
    return seen


def outputs(llm: LLM, prompts, params=LOGPROBS):
    return [(o.token_ids, o.logprobs, o.num_cached_tokens) for o in llm.generate(prompts, params)]


def assert_same(got, want, tol=TOL):
    for (tokens, logprobs, cached), (want_tokens, want_logprobs, want_cached) in zip(got, want, strict=True):
        assert tokens == want_tokens and cached == want_cached
        for (lp, top), (want_lp, want_top) in zip(logprobs, want_logprobs, strict=True):
            assert abs(lp - want_lp) < tol
            assert [i for i, _ in top] == [i for i, _ in want_top]
            assert max(abs(a - b) for (_, a), (_, b) in zip(top, want_top)) < tol


def poisoned(llm: LLM) -> LLM:
    for k, v in llm.kv_cache.layers:
        k.fill_(math.nan)
        v.fill_(math.nan)
    return llm


def assert_same_cache(a: LLM, b: LLM):
    """Bitwise, NaN for NaN: a padding row that wrote a cache slot (or a real row written elsewhere) fails it."""
    for (ka, va), (kb, vb) in zip(a.kv_cache.layers, b.kv_cache.layers, strict=True):
        for x, y in ((ka, kb), (va, vb)):
            assert torch.equal(torch.isnan(x), torch.isnan(y))
            torch.testing.assert_close(x.nan_to_num(), y.nan_to_num(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_padded_prefill_replays_match_eager(model):
    """Prompts of 5 (bucket 8), 8 (exactly 8), 9 (16) and 32 tokens (the largest bucket) replay a graph; 33 tokens
    (past it) with two more prompts in the same step run eagerly. Tokens, log-probabilities and the cache as the
    eager run."""
    kw = dict(device="cpu", max_batch_size=4, max_seq_len=128, cuda_graph_prefill_tokens=BUCKETS)
    eager, padded = poisoned(LLM(model, **kw)), poisoned(LLM(model, **kw))
    seen = with_stand_in_graphs(padded)
    runner = padded.engine.decoder
    assert runner.prefill_buckets == list(BUCKETS)
    attention, prefills = padded.model.backend.attention, []

    def spy(qkv, k_cache, v_cache, rope, meta, shape):
        if meta.is_prefill:
            prefills.append((qkv.shape[0], meta.padded))
        return attention(qkv, k_cache, v_cache, rope, meta, shape)

    padded.model.backend.attention = spy
    for n, seed in ((5, 1), (8, 2), (9, 3), (32, 4)):
        prompt = random_prompt(n, 256, seed)
        replays = runner.prefill_replays
        assert_same(outputs(padded, [prompt]), outputs(eager, [prompt]))
        assert runner.prefill_replays == replays + 1, n
    assert seen["prefill"] == [8, 16, 32]  # captured once each, on first use, with padding only staged
    assert seen["staged_at_capture"] == [[0] * 9] * 3  # 4 empty sequences (max_batch_size) and query_start
    replays = runner.prefill_replays
    three = [random_prompt(33, 256, 7), random_prompt(6, 256, 5), random_prompt(7, 256, 6)]  # one step, 3 chunks
    assert_same(outputs(padded, three), outputs(eager, three))
    assert runner.prefill_replays == replays
    assert_same_cache(padded, eager)
    # the padded forwards tell attention so (its padding rows must be 0: see test_triton_padded_attention_rows_are_zero)
    assert {rows for rows, is_padded in prefills if is_padded} == set(BUCKETS)
    assert {rows for rows, is_padded in prefills if not is_padded} == {33 + 6 + 7}  # one eager step


def test_padded_prefill_of_a_cached_prefix_tail():
    """With prefix caching a repeated prompt prefills only its uncached tail (start > 0): that tail replays a graph,
    attending over the cached blocks through the sequence's block-table row."""
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=128, block_size=8, cuda_graph_prefill_tokens=BUCKETS)
    eager, padded = LLM("tiny", **kw), LLM("tiny", **kw)
    with_stand_in_graphs(padded)
    prompt = random_prompt(40, 256, 8)
    for llm in (eager, padded):
        outputs(llm, [prompt[:36]])  # caches its 4 full blocks
    got, want = outputs(padded, [prompt]), outputs(eager, [prompt])
    assert got[0][2] == want[0][2] == 32  # 32 tokens from the cache, a chunk of 8 from position 32
    assert_same(got, want)
    assert padded.engine.decoder.prefill_replays == 1  # the tail; the first prompt (36 tokens) ran eagerly


def test_several_prompts_and_partial_chunks_in_one_graph():
    """A burst of short prompts is one prefill step of several chunks: one replay, each prompt's first token from its
    own logits row (a short prompt first, then a longer one). A long prompt chunked by max_prefill_tokens replays a
    graph for each chunk, and only its last samples."""
    kw = dict(device="cpu", max_batch_size=4, max_seq_len=128, cuda_graph_prefill_tokens=BUCKETS)
    eager, padded = poisoned(LLM("tiny-moe", **kw)), poisoned(LLM("tiny-moe", **kw))
    with_stand_in_graphs(padded)
    runner = padded.engine.decoder
    burst = [random_prompt(n, 256, 20 + n) for n in (3, 9, 6, 11)]  # 29 tokens, 4 sequences: the 32 bucket
    assert_same(outputs(padded, burst), outputs(eager, burst))
    assert runner.prefill_replays == 1
    kw.update(max_batch_size=10)  # 10 prompts of 2 tokens: more sequences than a graph takes (PREFILL_GRAPH_SEQS)
    eager, padded = LLM("tiny", **kw), LLM("tiny", **kw)
    with_stand_in_graphs(padded)
    burst = [random_prompt(2, 256, 30 + i) for i in range(10)]
    assert_same(outputs(padded, burst), outputs(eager, burst))
    assert padded.engine.decoder.prefill_replays == 0
    kw.update(max_batch_size=4, max_prefill_tokens=16, enable_prefix_caching=False)
    eager, padded = poisoned(LLM("tiny", **kw)), poisoned(LLM("tiny", **kw))
    with_stand_in_graphs(padded)
    prompt = random_prompt(40, 256, 12)  # chunks of 16, 16 and 8 tokens, a step each
    assert_same(outputs(padded, [prompt]), outputs(eager, [prompt]))
    assert padded.engine.decoder.prefill_replays == 3
    assert_same_cache(padded, eager)


def test_a_cached_prefix_tail_behind_another_prompt():
    """One step of two chunks, the second a prefix-cache tail (start 32): each chunk's own positions, length and
    block-table row."""
    kw = dict(device="cpu", max_batch_size=4, max_seq_len=128, block_size=8, cuda_graph_prefill_tokens=BUCKETS)
    eager, padded = poisoned(LLM("tiny", **kw)), poisoned(LLM("tiny", **kw))
    with_stand_in_graphs(padded)
    prompt = random_prompt(40, 256, 8)
    for llm in (eager, padded):
        outputs(llm, [prompt[:36]])  # caches its 4 full blocks (36 tokens: eager)
    two = [random_prompt(6, 256, 41), prompt]  # one step: (new, 0, 6), (prompt, 32, 8)
    got, want = outputs(padded, two), outputs(eager, two)
    assert [cached for _, _, cached in got] == [0, 32]
    assert_same(got, want)
    assert_same_cache(padded, eager)
    assert padded.engine.decoder.prefill_replays == 1


def test_a_shorter_prompt_after_a_longer_one_leaves_running_sequences_alone():
    """The padding rows are reset at every step: a 5-token prompt after a 7-token one in the same bucket must not
    replay the 7-token prompt's rows 5 and 6 (their cache slots may belong to a running sequence by then)."""
    def scenario(llm):
        greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        llm.generate(random_prompt(7, 256, 1), greedy)
        running = llm._new_sequence(random_prompt(12, 256, 2), llm._params(
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)))
        llm.submit([running])
        for _ in range(3):
            llm.step()
        short = llm._new_sequence(random_prompt(5, 256, 3), llm._params(greedy))
        llm.submit([short])
        while not (running.finished and short.finished):
            llm.step()
        return running.output_ids, [lp for lp, _ in running.logprobs], short.output_ids

    kw = dict(device="cpu", max_batch_size=4, max_seq_len=128, cuda_graph_prefill_tokens=BUCKETS,
              enable_prefix_caching=False)
    eager, padded = LLM("tiny", **kw), LLM("tiny", **kw)
    with_stand_in_graphs(padded)
    (tokens, logprobs, short), (want_tokens, want_logprobs, want_short) = scenario(padded), scenario(eager)
    assert tokens == want_tokens and short == want_short
    assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) < TOL
    assert padded.engine.decoder.prefill_replays == 3


def test_sampling_rows_cross_in_one_copy_field_by_field():
    """rows_to_device packs the int64 fields, then the float32 ones, into one copy: each field lands in its own."""
    from qwen2rt.sampling import SamplingRows, row_values, rows_tensor

    llm = LLM("tiny", device="cpu", max_seq_len=64)
    values = [row_values(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r,
                                        presence_penalty=pp, frequency_penalty=f).resolved(), seed, step, slot)
              for t, k, p, m, r, pp, f, seed, step, slot in ((0.7, 5, 0.8, 0.1, 1.2, 0.3, 0.4, 11, 2, 1),
                                                             (0.9, 7, 0.6, 0.2, 1.1, 0.5, 0.6, 13, 3, 0),
                                                             (0.5, 9, 0.7, 0.05, 1.3, 0.1, 0.2, 17, 4, 2))]
    got, want = llm.engine.decoder.rows_to_device(values), rows_tensor(values, "cpu")
    for field in SamplingRows.FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_padded_prefill_tolerance_sees_the_wrong_row():
    """TOL is tight: the padded prefill sampling from the row before the last (a plausible off-by-one) exceeds it."""
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=64, cuda_graph_prefill_tokens=BUCKETS)
    eager, padded = LLM("tiny", **kw), LLM("tiny", **kw)
    with_stand_in_graphs(padded)
    runner = padded.engine.decoder
    stage = runner._stage_prefill

    def off_by_one(chunks, bucket):
        stage(chunks, bucket)
        if chunks:
            runner.prefill_values.host["last"][0] -= 1
            runner.prefill_values.send()

    runner._stage_prefill = off_by_one
    prompt = random_prompt(12, 256, 9)
    (tokens, logprobs, _), = outputs(padded, [prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    (_, want, _), = outputs(eager, [prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    assert max(abs(a - b) for (_, a), (_, b) in zip(logprobs[0][1], want[0][1])) > 10 * TOL


def test_prefill_buckets_follow_the_chunk_limits():
    """Buckets past the largest step (max_prefill_tokens; PREFILL_GRAPH_SEQS sequences of max_seq_len - 1 tokens)
    are dropped, except the first that holds it; invalid buckets are an error naming the argument."""
    def buckets(**kw):
        return LLM("tiny", device="cpu", **kw).engine.decoder.prefill_buckets

    assert buckets(max_seq_len=100, max_batch_size=1) == [16, 32, 64, 128]
    assert buckets(max_seq_len=100, max_batch_size=4) == [16, 32, 64, 128, 256, 384, 512]
    assert buckets(max_seq_len=40, max_batch_size=16) == [16, 32, 64, 128, 256, 384]  # 8 sequences of 39 tokens
    assert buckets(max_seq_len=512, max_prefill_tokens=64) == [16, 32, 64]
    assert buckets(max_seq_len=512, cuda_graph_prefill_tokens=()) == []
    assert buckets(max_seq_len=512, cuda_graph_prefill_tokens=range(64, 257, 64)) == [64, 128, 192, 256]
    for bad in ((0, 16), (16.0,), "16", (True,)):
        with pytest.raises(ValueError, match="cuda_graph_prefill_tokens"):
            LLM("tiny", device="cpu", cuda_graph_prefill_tokens=bad)
    with pytest.raises(ValueError, match="cuda_graph_buckets"):
        LLM("tiny", device="cpu", cuda_graph_buckets=(0,))


def test_no_prefill_graphs_run_eagerly():
    llm = LLM("tiny", device="cpu", max_seq_len=64, cuda_graph_prefill_tokens=())
    seen = with_stand_in_graphs(llm)
    llm.generate([random_prompt(5, 256, 10)], SamplingParams(max_tokens=3, temperature=0))
    assert not seen["prefill"] and llm.engine.decoder.prefill_replays == 0
    assert seen["decode"] == [(1, "greedy")]
    assert set(VARIANTS) >= {v for _, v in seen["decode"]}


def test_triton_padded_attention_rows_are_zero(monkeypatch):
    """The triton backend's prefill attention with meta.padded: rows past query_start[-1] are 0 (not whatever the
    output buffer held: here NaN) and the real rows are those of the unpadded call (Triton interpreter)."""
    def nan_output(out, rows, width, like, reads):
        return torch.full((rows, width), math.nan, dtype=like.dtype) if out is None else out

    monkeypatch.setattr(rope_attention, "_output", nan_output)
    heads, kv_heads, d, n, pad, bs = 4, 2, 32, 5, 3, 4
    torch.manual_seed(0)
    qkv = torch.randn(n + pad, (heads + 2 * kv_heads) * d)
    cache = [torch.randn(6, bs, kv_heads, d) for _ in range(2)]
    cos, sin = torch.randn(64, d // 2), torch.randn(64, d // 2)
    shape = AttentionShape(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, scale=d ** -0.5)
    rope = type("Rope", (), {"cos": cos, "sin": sin})()

    def meta(rows, padded):
        return AttentionMetadata(positions=torch.cat([torch.arange(3, 3 + n), torch.zeros(rows - n, dtype=torch.long)]),
                                 slot_mapping=torch.cat([torch.arange(3, 3 + n), torch.full((rows - n,), -1)]),
                                 block_tables=torch.tensor([[1, 2, 3, 4]], dtype=torch.int32),
                                 seq_lens=torch.tensor([3 + n], dtype=torch.int32), is_prefill=True,
                                 query_start=torch.tensor([0, n], dtype=torch.int32), query_lens_host=[rows],
                                 padded=padded)

    backend = TritonBackend()
    want = backend.attention(qkv[:n].clone(), *[c.clone() for c in cache], rope, meta(n, False), shape)
    got = backend.attention(qkv, *[c.clone() for c in cache], rope, meta(n + pad, True), shape)
    assert torch.equal(got[n:], torch.zeros_like(got[n:]))
    torch.testing.assert_close(got[:n], want, rtol=0, atol=0)
    unpadded = backend.attention(qkv, *[c.clone() for c in cache], rope, meta(n + pad, False), shape)
    assert torch.isnan(unpadded[n:]).all()  # what padded=True is for


def test_triton_backend_padded_prefill_matches_eager():
    """The tiny model on the triton backend (interpreter), 4 sequences per graph: one short prompt (bucket 8, three
    empty sequences), a burst of two (20 tokens, bucket 32), then a short one again, whose empty sequences must not
    keep the burst's query rows (the kernel would read and write past the bucket); against the eager triton
    prefill."""
    kw = dict(device="cpu", backend="triton", max_batch_size=4, max_seq_len=64, cuda_graph_prefill_tokens=(8, 32))
    eager, padded = LLM("tiny", **kw), LLM("tiny", **kw)
    with_stand_in_graphs(padded)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    for prompts in ([random_prompt(6, 256, 4)], [random_prompt(3, 256, 1), random_prompt(17, 256, 2)],
                    [random_prompt(5, 256, 3)]):
        assert_same(outputs(padded, prompts, params), outputs(eager, prompts, params))
    assert padded.engine.decoder.prefill_replays == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_burst_sharing_a_prefix_in_one_graph(backend):
    """Three prompts with the same 16-token prefix in one step: the second and third take the first's two blocks,
    which its chunk writes in the same replay (each layer's k/v writes of every chunk before any attention), through
    their block-table rows rewritten after admission; tokens and log-probabilities as without prefix caching."""
    kw = dict(device="cpu", backend=backend, max_batch_size=4, max_seq_len=64, block_size=8,
              cuda_graph_prefill_tokens=(8, 32))
    padded = poisoned(LLM("tiny", **kw))
    with_stand_in_graphs(padded)
    plain = LLM("tiny", enable_prefix_caching=False, **kw)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    prefix = random_prompt(16, 256, 50)
    prompts = [prefix + random_prompt(n, 256, 50 + n) for n in (3, 5, 6)]  # 62 tokens, 30 computed: bucket 32
    got = outputs(padded, prompts, params)
    assert [cached for _, _, cached in got] == [0, 16, 16] and padded.engine.decoder.prefill_replays == 1
    assert_same([(tokens, logprobs, 0) for tokens, logprobs, _ in got], outputs(plain, prompts, params))


def test_a_failed_prefill_capture_says_so(monkeypatch):
    """capture_all raises a prefill graph's failure as PrefillGraphError (the benchmarks then load the model again
    without prefill graphs, and only then: benchmarks.bench_decode.load_llm), naming the bucket."""
    from qwen2rt.model_runner import PrefillGraphError

    llm = LLM("tiny", device="cpu", max_batch_size=2, max_seq_len=64, cuda_graph_prefill_tokens=(8, 32))
    runner = llm.engine.decoder
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # capture_all's CUDA bookkeeping, on CPU
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)

    def fail(bucket):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "capture_prefill", fail)
    with pytest.raises(PrefillGraphError, match="prefill graph of 32 tokens.*not permitted"):
        runner.capture_all()


def test_a_failed_capture_on_first_use_runs_the_prefill_eagerly(monkeypatch, caplog):
    """capture_graphs="lazy": the 32-token bucket's capture fails at its first prefill. That request still gets the
    eager engine's tokens, the bucket is dropped with a warning naming the error, and the next prompt of that size
    runs eagerly without trying the capture again; the 8-token bucket keeps its graph."""
    kw = dict(device="cpu", max_batch_size=4, max_seq_len=64, cuda_graph_prefill_tokens=(8, 32), capture_graphs="lazy")
    eager, lazy = LLM("tiny", **kw), LLM("tiny", **kw)
    seen = with_stand_in_graphs(lazy)
    runner = lazy.engine.decoder
    stand_in, tries = runner.capture_prefill, []

    def capture_prefill(bucket):
        tries.append(bucket)
        if bucket == 32:
            raise RuntimeError("operation not permitted when stream is capturing")
        return stand_in(bucket)

    monkeypatch.setattr(runner, "capture_prefill", capture_prefill)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    with caplog.at_level(logging.WARNING, logger="qwen2rt"):
        for prompts in ([random_prompt(20, 256, 1)], [random_prompt(5, 256, 2)], [random_prompt(25, 256, 3)]):
            assert_same(outputs(lazy, prompts, params), outputs(eager, prompts, params))
    assert tries == [32, 8] and seen["prefill"] == [8]
    assert runner.prefill_buckets == [8] and runner.prefill_replays == 1
    assert "not permitted" in runner.prefill_capture_errors[32] and 32 not in runner.prefill_logits
    assert "prefill graph of 32 tokens failed" in caplog.text and "not permitted" in caplog.text


def test_staged_values_are_aligned_and_sent_in_one_copy():
    """Staged: every array 16-byte aligned whatever the sizes before it (Triton specialises pointers on that), and
    send() carries what the host views hold to the device views."""
    from qwen2rt.model_runner import Staged

    staged = Staged({"a": (torch.int32, (3,)), "b": (torch.int64, (2, 5)), "c": (torch.float32, (7,)),
                     "d": (torch.int32, (1,))}, torch.device("cpu"))
    assert all(t.data_ptr() % 16 == 0 for t in staged.device.values())
    staged.host["a"][:] = (1, 2, 3)
    staged.host["b"][:] = torch.arange(10).view(2, 5).numpy()
    staged.host["c"][:] = 0.5
    staged.host["d"][:] = -1
    assert staged.device["a"].tolist() == [0, 0, 0]  # nothing crosses before send()
    staged.send()
    assert staged.device["a"].tolist() == [1, 2, 3] and staged.device["b"].tolist() == [list(range(5)),
                                                                                     list(range(5, 10))]
    assert staged.device["c"].tolist() == [0.5] * 7 and staged.device["d"].tolist() == [-1]


@pytest.mark.parametrize("max_batch_size", [1, 3, 5])
def test_per_row_values_are_16_byte_aligned(max_batch_size):
    """Every per-row array a kernel reads (the decode step's positions, lengths, slots and sampling rows; a prefill's
    sampling rows) starts 16-byte aligned whatever the batch size: Triton specialises pointers on it, and the
    variants aot_sm90.py compiles and warms are the aligned ones (an unaligned pointer compiles another on the GPU)."""
    from qwen2rt.sampling import SamplingRows, row_values

    runner = LLM("tiny", device="cpu", max_seq_len=64, max_batch_size=max_batch_size).engine.decoder
    decode_rows = [runner.positions, runner.slot_mapping, runner.seq_lens] + \
        [getattr(runner.rows, f) for f in SamplingRows.FIELDS]
    assert all(t.data_ptr() % 16 == 0 for t in decode_rows)
    prefill_rows = runner.rows_to_device([row_values(SamplingParams().resolved(), 1, 0, 0)] * max_batch_size)
    assert all(getattr(prefill_rows, f).data_ptr() % 16 == 0 for f in SamplingRows.FIELDS)


def test_prompt_logprobs_run_eagerly():
    """A prefill step with a prompt_logprobs request runs eagerly (a graph keeps the last rows' logits only), so
    every prompt position gets its log-probability, as without graphs; the next prompt replays a graph again."""
    kw = dict(device="cpu", max_batch_size=4, max_seq_len=128, cuda_graph_prefill_tokens=BUCKETS)
    eager, padded = LLM("tiny", **kw), LLM("tiny", **kw)
    with_stand_in_graphs(padded)
    runner = padded.engine.decoder
    prompt = random_prompt(12, 256, 9)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    got, want = padded.generate([prompt], params)[0], eager.generate([prompt], params)[0]
    assert runner.prefill_replays == 0 and len(got.prompt_logprobs) == len(prompt) and got.token_ids == want.token_ids
    for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert abs(a[0] - b[0]) < TOL and [t for t, _ in a[1]] == [t for t, _ in b[1]]
    padded.generate([prompt], SamplingParams(max_tokens=3))
    assert runner.prefill_replays == 1
