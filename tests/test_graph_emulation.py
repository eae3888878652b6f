"""ModelRunner's real capture code under CUDA-graph semantics, on CPU (tests/graph_emulation.py): the triton backend
and the Triton sampler (what CUDA runs) captured into recorded graphs, whose replays run only the recorded kernels
on the recorded tensors. Generation through them must equal the eager engine's, nothing inside a capture may read
device data on the host, and the runner must hold every tensor one capture allocates and another graph reads.
test_prefill_graphs' stand-in graphs re-run the Python at every replay; these do not, so a value the host computed
at capture and a kernel argument frozen there show up here."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
import torch

from graph_emulation import CaptureError, EmulatedCudaGraphs, RecordingGraph
from qwen2rt import LLM, SamplingParams, StructuredOutputs, model_runner, sampling
from qwen2rt.kernels import rms_norm
from qwen2rt.models.config import BUILTIN_CONFIGS
from test_parity import random_prompt

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
TOP_K = SamplingParams(max_tokens=2, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1,
                       presence_penalty=0.2, seed=3, ignore_eos=True, logit_bias={7: 4.0, 11: -2.0})
FULL = SamplingParams(max_tokens=2, temperature=0.9, top_p=0.95, min_p=0.01, frequency_penalty=0.1, seed=4,
                      ignore_eos=True, min_tokens=1, stop_token_ids=list(range(0, 512, 2)))
TOL = 1e-4  # logprobs: a padded prefill's GEMM rows differ from the unpadded ones by ~1e-6 (test_prefill_graphs)


@pytest.fixture
def triton_sampler(monkeypatch):
    """The Triton sampler, as on CUDA (the CPU's default is the torch one)."""
    def sample(*args, **kwargs):
        return sampling.sample_tokens(*args, **kwargs, impl="triton")
    monkeypatch.setattr(model_runner, "sample_tokens", sample)


@pytest.fixture(autouse=True)
def short_models(monkeypatch):
    """The tiny shapes with fewer layers (the interpreter's time goes into the layers): one dense layer; a dense and
    a MoE layer."""
    monkeypatch.setitem(BUILTIN_CONFIGS, "tiny-1l", dataclasses.replace(BUILTIN_CONFIGS["tiny"], num_hidden_layers=1))
    moe = BUILTIN_CONFIGS["tiny-moe"]
    assert moe.mlp_only_layers == (0,)
    monkeypatch.setitem(BUILTIN_CONFIGS, "tiny-moe-2l", dataclasses.replace(moe, num_hidden_layers=2))


def engine(model: str, prefill_tokens: int = 16, quantization: str | None = None) -> LLM:
    return LLM(model, device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2,
               cuda_graph_prefill_tokens=(prefill_tokens,), quantization=quantization)


def run(llm: LLM, lengths=(5, 11, 12, 17, 9)):
    """Each sampler form in a batch of its own: greedy with log-probabilities on 2 prompts, 4 and 2 tokens (a
    decode step at bucket 2, then 2 at bucket 1 once the short one has finished; a prefill step of 2 chunks that
    fills the prefill graph's tokens), top-k on the next 2 with a logit bias (an eager prefill, past the graph;
    only with 5 prompts), the full sampler on the last prompt alone with min_tokens 1 holding back half the
    vocabulary at its first token (the prefill graph) and releasing it at the next (bucket 1). -> tokens and
    log-probabilities of every request."""
    prompts = [random_prompt(n, 256, 20 + n) for n in lengths]
    seqs = [llm._new_sequence(p, llm._params(params))
            for p, params in zip(prompts, (GREEDY, dataclasses.replace(GREEDY, max_tokens=2)))]
    llm.submit(seqs)
    while not all(s.finished for s in seqs):
        llm.step()
    outs = [llm._output([s]) for s in seqs]
    if len(prompts) == 5:
        outs += llm.generate(prompts[2:4], TOP_K)
    outs += llm.generate(prompts[-1:], FULL)
    first = outs[-1].token_ids[0]  # min_tokens holds back the even stop ids at the first step (the prefill graph)
    assert first % 2 and (outs[-1].finish_reason == "stop") == (outs[-1].token_ids[-1] % 2 == 0), outs[-1].token_ids
    return [(o.token_ids, o.logprobs) for o in outs]


def assert_same(got, want):
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert tokens == want_tokens
        for (lp, top), (want_lp, want_top) in zip(logprobs or [], want_logprobs or [], strict=True):
            assert abs(lp - want_lp) < TOL and [t for t, _ in top] == [t for t, _ in want_top]


@pytest.mark.slow
@pytest.mark.parametrize("model, quantization, capture, prefill_tokens, lengths", [
    ("tiny-1l", None, "startup", 16, (5, 11, 12, 17, 9)),
    # past kernels.gemv.MAX_ROWS tokens: the prefill graph holds the GEMM paths (cuBLAS, the grouped MoE, the
    # dequantizing GEMM); in the interpreter they are also faster than the GEMVs at 8-32 rows. 3 prompts: no top-k
    # batch (its sampler graph is the dense model's)
    ("tiny-moe-2l", None, "lazy", 64, (20, 30, 40)),
    ("tiny-1l", "int4", "lazy", 64, (20, 30, 40)),
])
def test_generation_through_emulated_graphs_equals_eager(model, quantization, capture, prefill_tokens, lengths,
                                                         triton_sampler):
    """Every graph captured at start-up (capture_all: each bucket, sampler form and log-probabilities graph, the
    prefill graph), or each on its first use; then the batches of `run` through them."""
    want = run(engine(model, prefill_tokens, quantization), lengths)
    llm = engine(model, prefill_tokens, quantization)
    runner = llm.engine.decoder
    launches, launch = [], runner.launch_decode

    def counted_launch(seqs, split=False):  # each decode step: the forward and sampler graphs, the log-probabilities
        launches.append(3 if any(s.params.logprobs is not None for s in seqs) else 2)  # graph
        return launch(seqs, split)

    with EmulatedCudaGraphs(runner) as emulated:
        replays, capturing = [], []
        real_replay = RecordingGraph.replay

        def counted_replay(graph):  # a step's, not a capture's (which replays the forward before a warm-up)
            if not capturing:
                replays.append(graph)
            real_replay(graph)

        def flagged(capture):
            def call(*args):
                capturing.append(args)
                try:
                    return capture(*args)
                finally:
                    capturing.pop()
            return call

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RecordingGraph, "replay", counted_replay)
            patch.setattr(runner, "launch_decode", counted_launch)
            for name in ("capture", "capture_logprobs", "capture_prefill"):
                patch.setattr(runner, name, flagged(getattr(runner, name)))
            if capture == "startup":
                runner.capture_all()
                assert len(runner.graphs) == len(runner.buckets) * len(sampling.VARIANTS)
                assert list(runner.prefill_graphs) == [prefill_tokens]
            got = run(llm, lengths)
    assert_same(got, want)
    # leaving the emulation found every tensor a graph reads from another capture (the forward's logits, read by the
    # sampler and log-probabilities graphs) still held by the runner
    assert emulated.shared and not emulated.unheld_outputs()
    # the prefill graph (the first and last batches), every decode step through graphs (none eager)
    assert runner.prefill_replays == 2 and not runner.prefill_capture_errors
    assert set(replays) <= set(emulated.graphs) and len(replays) == 2 + sum(launches)
    # decode steps: greedy 1 at bucket 2 and 2 at bucket 1 (the short request's second step is never launched: it
    # finished at its first), top-k 1, full 1
    assert len(launches) == (5 if len(lengths) == 5 else 4)
    assert {(2, "greedy"), (1, "greedy"), (1, "full")} <= set(runner.graphs)


@pytest.mark.slow
def test_structured_steps_in_halves_through_emulated_graphs_equal_eager(triton_sampler):
    """A structured request's decode step is replayed in halves: the forward graph, then (the step before read back,
    the mask written) the sampler graph, with log-probabilities. Beside a free request, every token and
    log-probability equals the eager engine's, the regex matches, and every decode step ran through graphs."""
    pattern = r"[a-f]{2,4}( [a-f]{2,4}){1,2}"
    prompts = [random_prompt(n, 256, 60 + n) for n in (7, 10)]
    params = [SamplingParams(max_tokens=20, temperature=0, logprobs=2, structured_outputs=StructuredOutputs(
        regex=pattern)), dataclasses.replace(GREEDY, max_tokens=6)]
    want = [(o.token_ids, o.logprobs) for o in engine("tiny-1l").generate(prompts, params)]
    llm = engine("tiny-1l")
    runner = llm.engine.decoder
    halves = []  # each decode launch: (its batch size, whether it stopped before its sampling)
    launch = runner.launch_decode

    def logged_launch(seqs, split=False):
        launched = launch(seqs, split)
        halves.append((len(seqs), isinstance(launched, model_runner.DecodeForward)))
        return launched

    with EmulatedCudaGraphs(runner) as emulated, pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "launch_decode", logged_launch)
        outs = llm.generate(prompts, params)
    assert_same([(o.token_ids, o.logprobs) for o in outs], want)
    assert re.fullmatch(pattern, outs[0].text) and outs[0].finish_reason == "stop"
    assert emulated.shared and not emulated.unheld_outputs() and runner.graphs
    # decode steps: 5 of both (the free request's tokens after its first), then the structured request's alone, up
    # to the one launched while its eos was in flight (its token dropped)
    assert halves == [(2, True)] * 5 + [(1, True)] * (len(outs[0].token_ids) - 5)


@pytest.mark.slow
def test_preemption_and_growing_block_tables_through_emulated_graphs_equal_eager(triton_sampler):
    """Blocks of 4 tokens taken as decode goes (each new one written into the slot's block-table row on the device
    and gathered into the graphs' static batch rows) and a cache of 9 blocks for two requests of 6 and 7: one is
    preempted and recomputes. Tokens and log-probabilities equal the eager engine's with a cache for both."""
    def make(graphs: bool, blocks: int, block_size: int) -> LLM:
        return LLM("tiny-1l", device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2,
                   cuda_graph_prefill_tokens=(16,), block_size=block_size, num_kv_blocks=blocks,
                   enforce_eager=not graphs)

    prompts = [random_prompt(n, 256, 40 + n) for n in (9, 12)]
    params = [dataclasses.replace(GREEDY, max_tokens=14), dataclasses.replace(TOP_K, max_tokens=14)]
    # the reference: one block per request, taken at admission (no block is added as decode goes)
    want = [(o.token_ids, o.logprobs) for o in make(False, 2, 64).generate(prompts, params)]
    llm = make(True, 9, 4)
    with EmulatedCudaGraphs(llm.engine.decoder):
        got = [(o.token_ids, o.logprobs) for o in llm.generate(prompts, params)]
    assert llm.engine.num_preemptions >= 1 and llm.engine.decoder.graphs
    assert_same(got, want)


def test_emulated_capture_rejects_host_reads_runs_nothing_and_replays_frozen_values():
    """The emulation itself: inside a capture a host read fails, as do a copy from the runner's host memory and a
    kernel on it; a capture runs no kernel (its outputs are unwritten, a tensor it updates in place keeps its values);
    a replay runs the recorded kernels on the recorded tensors with the arguments of the capture, whatever the host
    holds by then."""
    runner = engine("tiny-1l").engine.decoder
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    w = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.5
    with EmulatedCudaGraphs(runner):
        for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0, 0] > 0), lambda: x[x > 0],
                    lambda: torch.tensor([1, 2]), lambda: x.nonzero(), lambda: torch.cuda.synchronize(),
                    lambda: runner.values.device["ints"].copy_(torch.from_numpy(runner.values.host["ints"])),
                    lambda: rms_norm(torch.from_numpy(runner.values.host["floats"]), w[:4], 1e-6)):
            graph = torch.cuda.CUDAGraph()
            with pytest.raises(CaptureError, match="inside a CUDA graph capture"), \
                    torch.cuda.graph(graph, capture_error_mode="thread_local"):
                bad()
        with pytest.raises(CaptureError, match="capture_error_mode='global'"):  # the runner captures thread-local
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
        host = {"eps": 1e-6}
        acc = torch.ones(3, 40)
        rows = torch.tensor([2, 0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.inference_mode():
            y = rms_norm(x, w, host["eps"])  # a Triton launch (eps frozen)
            z = (y * 2.0).add_(x)  # torch ops: out of place, in place
            c = x.to(torch.float64)  # an op that may alias, seen whole under inference mode: here a copy
            v = x.to(torch.float32)[1:]  # ... and here a view, as is the slice
            acc.add_(x)  # in place on a tensor from before the capture
            picked = rows.index_select(0, torch.zeros(1, dtype=torch.long))  # an integer output
        assert all(t.isnan().all() for t in (y, z, c)) and picked.tolist() == [torch.iinfo(torch.long).min]
        assert torch.equal(acc, torch.ones(3, 40)) and v.data_ptr() == x[1:].data_ptr()
        x.copy_(torch.randn(3, 40, generator=torch.Generator().manual_seed(2)))
        host["eps"] = 10.0  # a re-run of the Python would read this; a replay does not
        graph.replay()
    want = rms_norm(x, w, 1e-6)
    assert torch.equal(y, want)
    assert torch.equal(z, (want * 2.0) + x)
    assert torch.equal(c, x.double()) and torch.equal(acc, 1 + x) and torch.equal(picked, torch.tensor([2]))


def test_a_forward_capture_that_fails_as_it_ends_is_captured_again():
    """A capture can fail as it ends (an invalidated capture), after the forward's logits were set inside it: no graph
    is kept, and the bucket's next capture warms up and captures the forward again (it does not replay a graph
    that does not exist)."""
    runner = engine("tiny-1l").engine.decoder
    with EmulatedCudaGraphs(runner) as emulated, pytest.MonkeyPatch.context() as patch:
        real, failed = emulated._graph, []

        @contextlib.contextmanager
        def fails_once(graph, **kwargs):
            with real(graph, **kwargs) as g:
                yield g
            if not failed:
                failed.append(graph)
                raise RuntimeError("operation not permitted when stream is capturing (injected)")

        patch.setattr(torch.cuda, "graph", fails_once)
        with pytest.raises(RuntimeError, match="injected"):
            runner.capture(1, "greedy")
        assert 1 in runner._logits and 1 not in runner._forward_graphs
        graphs = runner.capture(1, "greedy")
    assert runner.graphs[(1, "greedy")] is graphs and graphs.forward is not failed[0]
