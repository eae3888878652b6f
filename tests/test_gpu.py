"""The torch backend on a CUDA GPU against Hugging Face on the same GPU (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen2rt import LLM, SamplingParams
from qwen2rt.models.config import BUILTIN_CONFIGS, builtin_config
from kernel_utils import rel_err as rel_norm_err
from test_parity import hf_logits, random_prompt, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["dense_gqa", "moe_renorm"])
def test_fp32_logits_on_gpu_match_hf(name, hf_checkpoints):
    path, hf = hf_checkpoints[name]
    llm = LLM(path, device="cuda", dtype="float32", backend="torch", max_seq_len=256)
    ids = random_prompt(45, hf.config.vocab_size, 1)
    assert rel_err(llm.logits(ids).cpu(), hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("name", ["dense_gqa", "moe_sparse_step_sharded"])
def test_bf16_on_gpu_close_to_fp32_hf(name, hf_checkpoints):
    path, hf = hf_checkpoints[name]
    llm = LLM(path, device="cuda", backend="torch", max_seq_len=256)
    assert llm.dtype == torch.bfloat16
    ids = random_prompt(45, hf.config.vocab_size, 2)
    # bf16 weights and activations against fp32 HF: 1.6e-2 at this seed, up to 2.6e-2 at others (bf16 on CPU)
    assert rel_err(llm.logits(ids).cpu(), hf_logits(hf, ids)) < 5e-2
    out = llm.generate([ids, ids[:7]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [16, 16]


def test_builtin_shape_on_gpu_is_deterministic():
    a = LLM("qwen2-0.5b", device="cuda", seed=1, max_seq_len=512, max_batch_size=2)
    b = LLM("qwen2-0.5b", device="cuda", seed=1, max_seq_len=512, max_batch_size=2)
    ids = list(range(100, 140))
    torch.testing.assert_close(a.logits(ids), b.logits(ids), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["tiny", "tiny-moe", "qwen2-0.5b"])
@pytest.mark.parametrize("batch", [1, 5])  # 5 runs padded in the 8 bucket
def test_cuda_graph_decode_equals_eager(model, batch):
    kw = dict(device="cuda", seed=0, max_seq_len=256, max_batch_size=8)
    # prefill eager in both, so that the decode graphs alone are compared (a padded prefill of 5 prompts runs its
    # GEMMs over 64 rows instead of 55: other bits; test_prefill_graphs_equal_eager_prefill covers prefill graphs)
    graphs = LLM(model, cuda_graph_prefill_tokens=(), **kw)
    assert graphs.use_graphs and graphs.backend.name == "triton" and graphs.engine.decoder.graphs
    eager = LLM(model, enforce_eager=True, **kw)
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + 3 * i)] for i in range(batch)]
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in graphs.generate(prompts, greedy)] == \
        [o.token_ids for o in eager.generate(prompts, greedy)]
    # sampling inside the graph: the same draws as eager (counter-based RNG, per-request seeds), with the top-k
    # sampler (top_k <= 256) and with the full one (top-p over the whole vocabulary)
    for top_k in (50, 0):
        sampled = SamplingParams(max_tokens=32, temperature=0.8, top_k=top_k, top_p=0.9, min_p=0.01,
                                 repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1, seed=11,
                                 ignore_eos=True)
        assert [o.token_ids for o in graphs.generate(prompts, sampled)] == \
            [o.token_ids for o in eager.generate(prompts, sampled)]


def test_preempted_requests_through_cuda_graphs_draw_their_tokens():
    """KV blocks of 16 tokens taken as decode goes (each new one written into the device block tables between graph
    replays) and a cache too small for four requests at once: the newest are preempted and recompute their tokens.
    Greedy and seeded sampled tokens equal those of an eager run with a block per request taken at admission
    (float32: a recomputed token's k/v come from the prefill's GEMMs, not the decode GEMVs)."""
    kw = dict(device="cuda", dtype="float32", seed=0, max_seq_len=256, max_batch_size=4,
              cuda_graph_prefill_tokens=())
    small = LLM("tiny", num_kv_blocks=12, block_size=16, **kw)
    assert small.use_graphs and small.engine.decoder.graphs
    roomy = LLM("tiny", num_kv_blocks=4, block_size=256, enforce_eager=True, **kw)
    prompts = [[(13 * i + j) % 500 + 1 for j in range(20 + 5 * i)] for i in range(4)]
    greedy = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=100, temperature=0.8, top_p=0.9, frequency_penalty=0.5, seed=5,
                             ignore_eos=True)
    for params in (greedy, sampled):
        assert [o.token_ids for o in small.generate(prompts, params)] == \
            [o.token_ids for o in roomy.generate(prompts, params)]
    assert small.engine.num_preemptions >= 2 and roomy.engine.num_preemptions == 0


def test_structured_outputs_through_cuda_graphs():
    """Structured outputs with CUDA graphs (a step's forward graph replayed before the step before is read back, the
    masks then written into the sampler's bias rows through pinned memory, then its sampler graph): JSON objects and
    choices, greedy and seeded, in one batch with an unconstrained request, equal an eager LLM's tokens (float32),
    and the objects are complete."""
    from qwen2rt import StructuredOutputs
    from qwen2rt.structured import check_json_object

    kw = dict(device="cuda", dtype="float32", seed=0, max_seq_len=256, max_batch_size=4)
    graphs, eager = LLM("tiny", **kw), LLM("tiny", enforce_eager=True, **kw)
    assert graphs.use_graphs
    close = {ord('"'): 6.0, ord("}"): 6.0, **{ord(c): -20.0 for c in " \t\r\n"}}  # (random weights)
    json_object, choice = StructuredOutputs(json_object=True), StructuredOutputs(choice=["north", "south", "east"])
    params = [SamplingParams(max_tokens=80, temperature=0, logit_bias=close, structured_outputs=json_object),
              SamplingParams(max_tokens=80, temperature=1.0, seed=3, n=3, logit_bias=close,
                             structured_outputs=json_object),
              SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=4, structured_outputs=choice),
              SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True)]
    prompts = ["{", "data:", "way?", "free"]
    got, want = graphs.generate(prompts, params), eager.generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
    objects = [o for r in got[:2] for o in r.outputs]
    assert all(check_json_object(o.text) for o in objects if o.finish_reason == "stop")
    assert sum(o.finish_reason == "stop" for o in objects) >= 2
    assert all(o.text in choice.choice for o in got[2].outputs)


def test_priority_preemption_through_cuda_graphs():
    """scheduling_policy="priority" with CUDA graphs: two long requests fill both slots, then an urgent one preempts
    the less urgent (its decode batch restaged: new slot, blocks and positions in the graphs' static buffers) and
    both recompute; every request's greedy and seeded tokens equal those of an eager LLM that runs each alone
    (float32)."""
    kw = dict(device="cuda", dtype="float32", seed=0, max_seq_len=256, cuda_graph_prefill_tokens=())
    llm = LLM("tiny", max_batch_size=2, scheduling_policy="priority", **kw)
    assert llm.use_graphs
    alone = LLM("tiny", max_batch_size=1, enforce_eager=True, **kw)
    prompts = [[(17 * i + j) % 500 + 1 for j in range(12 + 3 * i)] for i in range(3)]
    params = [SamplingParams(max_tokens=80, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=80, temperature=0.9, top_k=40, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.7, seed=4, ignore_eos=True)]
    seqs = [llm.new_request(p, q, priority=r) for p, q, r in zip(prompts[:2], params, (1, 2))]
    llm.submit(seqs)
    for _ in range(20):
        llm.step()
    urgent = llm.new_request(prompts[2], params[2], priority=0)
    llm.submit([urgent])
    while not all(s.finished for s in seqs + [urgent]):
        llm.step()
    assert llm.engine.num_preemptions == 1 and seqs[1].num_preemptions == 1
    for s, p, q in zip(seqs + [urgent], prompts, params):
        assert s.output_ids == alone.generate([p], q)[0].token_ids


def test_a_burst_sharing_a_prefix_through_prefill_graphs():
    """Three prompts with the same 48-token prefix in one step, on the Triton kernels with prefill and decode graphs:
    the second and third take the first's three blocks, written by the same replay, and generate the tokens of an
    LLM without prefix caching (float32)."""
    kw = dict(device="cuda", dtype="float32", seed=0, max_seq_len=256, max_batch_size=4, block_size=16)
    shared = LLM("tiny", **kw)
    assert shared.engine.decoder.prefill_graphs
    plain = LLM("tiny", enable_prefix_caching=False, **kw)
    prefix = [(7 * j) % 500 + 1 for j in range(48)]
    prompts = [prefix + [(11 * i + j) % 500 + 1 for j in range(3 + 4 * i)] for i in range(3)]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = shared.generate(prompts, greedy)
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48]
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(prompts, greedy)]


def test_lazily_captured_graphs_equal_eager():
    kw = dict(device="cuda", seed=0, max_seq_len=256, max_batch_size=8)
    lazy = LLM("tiny-moe", capture_graphs="lazy", **kw)
    assert lazy.use_graphs and not lazy.engine.decoder.graphs  # nothing captured before the first decode step
    eager = LLM("tiny-moe", enforce_eager=True, **kw)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for batch in (3, 1, 3):  # first use of bucket 4, of bucket 1, then bucket 4 again from its graph
        prompts = [[(11 * i + j) % 500 + 1 for j in range(6 + 2 * i)] for i in range(batch)]
        assert [o.token_ids for o in lazy.generate(prompts, greedy)] == \
            [o.token_ids for o in eager.generate(prompts, greedy)]
    assert {(4, "greedy"), (1, "greedy")} <= set(lazy.engine.decoder.graphs)


def test_lazy_capture_survives_another_threads_cuda_work():
    """Graphs captured on first use, while another thread of the application does CUDA work of its own on its own
    stream (allocations of new sizes, pinned host-to-device copies, a kernel, a sync of that stream): thread-local
    capture mode (model_runner._capturing), in which that work neither fails nor invalidates the capture (the
    default global mode is what vLLM#48053 saw invalidated by such a thread). A check that the mode works with
    concurrent CUDA work; whether global mode fails it depends on timing (an unsafe call must coincide with a
    capture: after its first 64 rounds the thread's allocations come from the caching allocator)."""
    import threading

    kw = dict(device="cuda", seed=0, max_seq_len=256, max_batch_size=8)
    lazy = LLM("tiny", capture_graphs="lazy", **kw)
    eager = LLM("tiny", enforce_eager=True, **kw)
    stop, errors, rounds = threading.Event(), [], [0]

    def busy():
        stream, pinned = torch.cuda.Stream(), torch.ones(1 << 20, dtype=torch.uint8).pin_memory()
        while not stop.is_set():
            try:
                with torch.cuda.stream(stream):
                    size = (1 + rounds[0] % 64) << 20
                    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
                    dst[:1 << 20].copy_(pinned, non_blocking=True)
                    dst.add_(1)
                stream.synchronize()
            except Exception as e:  # reported below
                errors.append(e)
            rounds[0] += 1
    thread = threading.Thread(target=busy)
    thread.start()
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    try:
        for batch in (3, 1, 6, 2):  # first uses of buckets 4, 1, 8, 2: four captures while the thread runs
            prompts = [[(13 * i + j) % 500 + 1 for j in range(5 + 2 * i)] for i in range(batch)]
            assert [o.token_ids for o in lazy.generate(prompts, greedy)] == \
                [o.token_ids for o in eager.generate(prompts, greedy)]
    finally:
        stop.set()
        thread.join()
    assert not errors and rounds[0] > 0
    assert {(b, "greedy") for b in (1, 2, 4, 8)} <= set(lazy.engine.decoder.graphs)

@pytest.mark.parametrize("model", ["tiny-moe", "qwen2-0.5b"])
def test_prefill_graphs_equal_eager_prefill(model):
    """Prefill graphs, captured at start-up: a replay gives the logits of the same padded forward run eagerly
    (bitwise where every projection is a GEMV, up to 32 tokens; cuBLAS may pick another algorithm on the capture
    stream, so past that within 1e-3) and, within bf16 noise of the GEMMs' other row counts, those of the unpadded
    eager prefill; prompts of 5 (GEMV path), 40 (MoE: the grouped GEMMs) and 300 tokens. Then whole generations,
    one prompt and a burst of three in one step, against an LLM whose prefill is eager."""
    kw = dict(device="cuda", seed=0, max_seq_len=640, max_batch_size=4)
    llm = LLM(model, **kw)
    runner = llm.engine.decoder
    assert sorted(runner.prefill_graphs) == runner.prefill_buckets and runner.prefill_buckets  # at start-up
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for n in (5, 40, 300):
        prompt = random_prompt(n, llm.config.vocab_size, n)
        seq = llm._new_sequence(prompt, llm._params(params))
        llm.engine.add(seq)
        llm.engine._admit()
        chunks = [(seq, seq.num_prefilled, n - seq.num_prefilled)]
        bucket = runner.graph_prefill_bucket(chunks)
        with torch.inference_mode():
            replays = []
            for _ in range(2):
                runner._stage_prefill(chunks, bucket)
                runner.prefill_graphs[bucket].replay()
                replays.append(runner.prefill_logits[bucket][:1].clone())
            runner._stage_prefill(chunks, bucket)
            eager = runner._prefill_forward(bucket)[:1]
        llm.engine.abort(seq)
        diff = (replays[0] - eager).abs().max().item()
        assert torch.equal(replays[0], replays[1]), f"{n} tokens: two replays differ"
        if n <= 32:
            assert torch.equal(replays[0], eager), f"{n} tokens: replay vs eager max |diff| {diff:.3g}"
        else:
            assert rel_norm_err(replays[0], eager) < 1e-3, f"{n} tokens: replay vs eager max |diff| {diff:.3g}"
        unpadded = llm.logits(prompt)[-1:]
        # bf16 GEMMs over n rows vs the bucket's: a few ulps of the logits; the row before the last is far off
        assert rel_norm_err(replays[0], unpadded) < 1e-2, n
        assert rel_norm_err(llm.logits(prompt[:-1])[-1:], unpadded) > 1e-1
    eager_prefill = LLM(model, cuda_graph_prefill_tokens=(), **kw)
    # up to 32 tokens the projections are GEMVs whose rows do not depend on the row count: the same tokens
    vocab = llm.config.vocab_size
    replays = runner.prefill_replays
    for prompts in ([random_prompt(20, vocab, 7)], [random_prompt(n, vocab, 100 + n) for n in (5, 7, 9)]):
        assert [o.token_ids for o in llm.generate(prompts, params)] == \
            [o.token_ids for o in eager_prefill.generate(prompts, params)]
    assert runner.prefill_replays == replays + 2 and eager_prefill.engine.decoder.prefill_replays == 0


# ---- the triton backend in bf16 with CUDA graphs against the fp32 torch backend on the same weights ---------------

PARITY_SHAPES = {"qwen2-0.5b": 4, "qwen1.5-moe-a2.7b": 2, "qwen2-57b-a14b": 2}  # real layer shapes, few layers
# bf16 weights, activations and KV cache through a few layers, measured with the torch backend in bf16 on the CPU:
# 1.0e-2 of the logits' norm (qwen2-0.5b, 4 layers), 1.4e-2 (qwen1.5-moe, 2 layers: some tokens route differently);
# a 0.9x attention scale moves them 3.7e-2 and 9.3e-2
MODEL_TOL = 2.5e-2


def weight_tensors(obj):
    """Every tensor of a ModelWeights tree, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield from weight_tensors(getattr(obj, field.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from weight_tensors(item)


def same_weights(dst: LLM, src: LLM) -> None:
    """dst's weights := src's (bf16 values, exactly representable in fp32)."""
    pairs = list(zip(weight_tensors(dst.model.weights), weight_tensors(src.model.weights), strict=True))
    for d, s in pairs:
        d.copy_(s)


@pytest.mark.parametrize("base", list(PARITY_SHAPES))
def test_bf16_triton_graphs_match_fp32_torch(base, monkeypatch):
    name = f"{base}-{PARITY_SHAPES[base]}l"
    monkeypatch.setitem(BUILTIN_CONFIGS, name, dataclasses.replace(builtin_config(base),
                                                                    num_hidden_layers=PARITY_SHAPES[base]))
    kw = dict(device="cuda", seed=3, max_seq_len=160, max_batch_size=2)
    # prefill eager, as in the enforce_eager LLM the seeded draws are compared with below (a prefill graph pads the
    # 57 prompt tokens to 64 rows: other bits in the GEMMs)
    fast = LLM(name, dtype="bfloat16", backend="triton", cuda_graph_prefill_tokens=(), **kw)
    assert fast.use_graphs and fast.engine.decoder.graphs
    ref = LLM(name, dtype="float32", backend="torch", **kw)
    same_weights(ref, fast)
    prompt = random_prompt(40, fast.config.vocab_size, 5)
    steps = 24
    greedy = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    ref_tokens = ref.generate(prompt, greedy)[0].token_ids
    seq = prompt + ref_tokens
    # logits at every position of the fp32 model's own continuation, relative to their norm
    want, got = ref.logits(seq), fast.logits(seq)
    err = rel_norm_err(got, want)
    assert err < MODEL_TOL, f"bf16 triton logits {err:.2e} from fp32 torch"
    # the same, with a 0.9x attention scale in the fp32 model: the tolerance tells such a bug apart
    shape = ref.model.attention_shape
    monkeypatch.setattr(ref.model, "attention_shape", dataclasses.replace(shape, scale=0.9 * shape.scale))
    assert rel_norm_err(ref.logits(seq), want) > MODEL_TOL, "tolerance too loose to see a 0.9x attention scale"
    monkeypatch.setattr(ref.model, "attention_shape", shape)
    # greedy decode through the graphs: the fp32 tokens, up to the first step whose top-2 margin is within the
    # largest logit error seen (there either token is right)
    fast_tokens = fast.generate(prompt, greedy)[0].token_ids
    rows = want[len(prompt) - 1:len(prompt) - 1 + steps]
    top2 = rows.topk(2, dim=-1).values
    bound = 2 * (got - want).abs().max().item()
    close = ((top2[:, 0] - top2[:, 1]) < bound).nonzero()
    first_close = close[0].item() if len(close) else steps
    assert fast_tokens[:first_close] == ref_tokens[:first_close]
    # seeded top-k sampling: the graphs draw exactly what the eager step draws
    eager = LLM(name, dtype="bfloat16", backend="triton", enforce_eager=True, **kw)
    same_weights(eager, fast)
    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    prompts = [prompt, prompt[:17]]
    assert [o.token_ids for o in fast.generate(prompts, sampled)] == \
        [o.token_ids for o in eager.generate(prompts, sampled)]
