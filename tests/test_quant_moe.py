"""Quantized MoE experts (kernels.moe with kernels.quant's layout): the decode GEMVs' QUANT path and the prefill path
(dequantize, then the grouped GEMMs) against fused_moe_ref on the same quantized weights; the whole tiny MoE model
quantized at load, triton against torch; the launch count of a quantized MoE layer."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE, assert_tight, poisoned, rel_err
from launch_count import decode_layer_launches
from qwen2rt import LLM, SamplingParams
from qwen2rt.kernels import fused_moe, fused_moe_ref
from qwen2rt.kernels.quant import QuantizedWeight, dequantize
from qwen2rt.models.config import builtin_config
from qwen2rt.models.quant import QuantConfig, at_load_config, quantize, weight_bytes

# relative error against the reference on the same quantized weights (the kernels sum fp32 products in another
# order; fp16 rounds h and the output once more)
QUANT_MOE_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}
# the interpreter runs programs one after another: few large ones
DECODE_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "SPLIT_PAIRS": 1}
PREFILL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}


def quantized(w: torch.Tensor, kind: str, group: int) -> QuantizedWeight:
    """w [N, K] rounded to `kind` (int4 asymmetric / int8 symmetric) with groups of `group` inputs (fp8: per row)."""
    if kind == "fp8":
        return quantize(w, at_load_config("fp8"), w.dtype)
    return quantize(w, QuantConfig("gptq", 4 if kind == "int4" else 8, group), w.dtype)


def make_layer(e, h, inter, shared, kind, dtype, seed, groups=(32, 16, 32), device=DEVICE):
    """A MoE layer with quantized experts; groups: of gate_up (and the shared gate_up), down, and the shared down
    (a different group size from the routed down's: the folded chunks index the shared down's own groups)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    layer = dict(router=rnd(e, h, scale=h ** -0.5),
                 gate_up=quantized(rnd(e * 2 * inter, h, scale=h ** -0.5), kind, groups[0]),
                 down=quantized(rnd(e * h, inter, scale=inter ** -0.5), kind, groups[1]))
    if shared:
        layer.update(shared_gate_up=quantized(rnd(2 * shared, h, scale=h ** -0.5), kind, groups[0]),
                     shared_down=quantized(rnd(h, shared, scale=shared ** -0.5), kind, groups[2]),
                     shared_gate=rnd(1, h, scale=h ** -0.5))
    return layer


def args(layer):
    return (layer["router"], layer["gate_up"], layer["down"])


def shared_args(layer):
    return (layer.get("shared_gate_up"), layer.get("shared_down"), layer.get("shared_gate"))


def run(x, layer, top_k, renorm, config, fold, **kw):
    out = poisoned(*x.shape, dtype=x.dtype, device=x.device)
    got = fused_moe(x, *args(layer), top_k, renorm, *shared_args(layer), config=dict(config, FOLD_SHARED=fold),
                    out=out, fold_shared=fold, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any(), "output holds NaN (an element was never written?)"
    return got


def reference(x, layer, top_k, renorm, **kw):
    return fused_moe_ref(x, *args(layer), top_k, renorm, *shared_args(layer), **kw)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("t, dtype", [(1, torch.float32), (5, torch.float32), (32, torch.float32),
                                      (5, torch.float16)])
def test_decode_gemvs(t, dtype, fold, kind):
    """5 experts (top 2, renormalised) of width 32 over H = 64, a shared expert of width 64 (2 folded chunks)."""
    layer = make_layer(5, 64, 32, 64, kind, dtype, seed=t)
    x = torch.randn(t, 64, device=DEVICE).to(dtype)
    got = run(x, layer, 2, True, DECODE_CONFIG, fold)
    assert rel_err(got, reference(x, layer, 2, True)) < QUANT_MOE_TOL[dtype]


@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
def test_decode_norm_residual_and_odd_shapes(kind):
    """The norm in the GEMVs' prologues and the residual in the down GEMV, 7 experts of width 40 (5 int4 words per
    row: a partial word tile), H = 72, top 3 without renormalisation, the shared expert 3 chunks (int4 groups: 24
    inputs for gate_up, 8 for the down projections)."""
    h, inter = 72, 40
    layer = make_layer(7, h, inter, 3 * inter, kind, torch.float32, seed=3, groups=(24, 8, 8))
    x = torch.randn(6, h, device=DEVICE)
    norm, residual = torch.randn(h, device=DEVICE), torch.randn(6, h, device=DEVICE)
    got = run(x, layer, 3, False, DECODE_CONFIG, True, norm_weight=norm, residual=residual)
    expected = reference(x, layer, 3, False, norm_weight=norm, residual=residual)
    assert rel_err(got, expected) < QUANT_MOE_TOL[torch.float32]


@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_paths(kind, fold, dtype, monkeypatch):
    """Prefill (40 tokens): with the shared expert separate, the grouped GEMMs unpack and dequantize the experts in
    their K loops (no scratch copy of any expert weight; the shared expert is the fused dequantize-GEMM); with it
    folded in, the layer's experts and the shared expert are dequantized into scratch buffers for the float grouped
    GEMMs. Groups of 32 inputs for gate_up and 16 for down: BLOCK_K 64 is narrowed to fit each."""
    import qwen2rt.kernels.moe as moe

    scratch = []
    real = moe.dequantize_weight
    monkeypatch.setattr(moe, "dequantize_weight", lambda w, dt: scratch.append(tuple(w.shape)) or real(w, dt))
    layer = make_layer(5, 64, 32, 64, kind, dtype, seed=11)
    x = torch.randn(40, 64, device=DEVICE).to(dtype)
    got = run(x, layer, 2, True, PREFILL_CONFIG, fold)
    assert rel_err(got, reference(x, layer, 2, True)) < QUANT_MOE_TOL[dtype]
    assert bool(scratch) == fold, scratch


def test_prefill_falls_back_to_scratch_for_odd_groups(monkeypatch):
    """Groups of 24 inputs: no BLOCK_K of at least 16 divides them, so the experts go through the scratch path."""
    import qwen2rt.kernels.moe as moe

    scratch = []
    real = moe.dequantize_weight
    monkeypatch.setattr(moe, "dequantize_weight", lambda w, dt: scratch.append(tuple(w.shape)) or real(w, dt))
    layer = make_layer(7, 72, 40, 0, "int4", torch.float32, seed=5, groups=(24, 8, 8))
    x = torch.randn(37, 72, device=DEVICE)
    got = run(x, layer, 3, False, PREFILL_CONFIG, False)
    assert rel_err(got, reference(x, layer, 3, False)) < QUANT_MOE_TOL[torch.float32]
    assert scratch == [(7 * 2 * 40, 72), (7 * 72, 40)]


def test_tolerance_is_tight():
    """A plausible bug exceeds the tolerance: expert 1's gate_up scales read for expert 0 (and back), the down
    projection's zeros off by one, the shared chunks' down groups taken from the routed down's group size."""
    layer = make_layer(5, 64, 32, 64, "int4", torch.float32, seed=5)
    x = torch.randn(5, 64, device=DEVICE)
    expected = reference(x, layer, 2, True)
    assert rel_err(run(x, layer, 2, True, DECODE_CONFIG, True), expected) < QUANT_MOE_TOL[torch.float32]

    def mutant(name, edit):
        mutated = {k: v for k, v in layer.items()}
        mutated[name] = edit(layer[name])
        return reference(x, mutated, 2, True)

    def swap_scales(w):  # experts 0 and 1 (64 rows each)
        scales = torch.cat([w.scales[64:128], w.scales[:64], w.scales[128:]])
        return QuantizedWeight(w.kind, w.qweight, scales, w.zeros, w.group_size)

    def shared_groups_wrong(w):  # group g of 16 inputs read as group g of 32
        scales = w.scales.repeat_interleave(2, dim=1)[:, :w.scales.shape[1]].contiguous()
        return QuantizedWeight(w.kind, w.qweight, scales, w.zeros.repeat_interleave(2, dim=1)[:, :w.zeros.shape[1]]
                               .contiguous(), w.group_size)

    assert_tight(expected, {
        "wrong expert's scales": mutant("gate_up", swap_scales),
        "zeros off by one": mutant("down", lambda w: QuantizedWeight(w.kind, w.qweight, w.scales, w.zeros + 1,
                                                                        w.group_size)),
        "shared down groups": mutant("shared_down", shared_groups_wrong),
    }, QUANT_MOE_TOL[torch.float16])


def test_bad_quantized_experts():
    layer = make_layer(5, 64, 32, 64, "int4", torch.float32, seed=1)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="shared_gate_up: quantized experts need every expert weight quantized"):
        fused_moe(x, *args(layer), 2, True, dequantize(layer["shared_gate_up"]), layer["shared_down"],
                  layer["shared_gate"])
    int8_down = quantized(dequantize(layer["down"]), "int8", 16)
    with pytest.raises(ValueError, match="down: every expert weight must be int4"):
        fused_moe(x, layer["router"], layer["gate_up"], int8_down, 2, True)
    with pytest.raises(ValueError, match=r"down: expected a quantized \[320, 32\] weight"):
        fused_moe(x, layer["router"], layer["gate_up"], layer["down"].rows(0, 256), 2, True)
    other_group = quantized(dequantize(layer["shared_gate_up"]), "int4", 64)
    with pytest.raises(ValueError, match="fold_shared=True needs"):  # one GROUP_WORDS for both gate_up weights
        fused_moe(x, *args(layer), 2, True, other_group, layer["shared_down"], layer["shared_gate"],
                  fold_shared=True)


# ---- the whole model ------------------------------------------------------------------------------------------

PROMPT = [5, 17, 99, 3]


@pytest.fixture(scope="module")
def tiny_moe_int4():
    kw = dict(device="cpu", dtype="float32", max_seq_len=64, max_batch_size=2, quantization="int4")
    return LLM("tiny-moe", backend="torch", **kw), LLM("tiny-moe", backend="triton", **kw)


def test_tiny_moe_int4_triton_matches_torch(tiny_moe_int4):
    """4 prompt tokens (the decode GEMVs), 40 (dequantize + grouped GEMMs), then a greedy decode step. (Slow on the
    interpreter, ~1 minute: every MoE layer is a few hundred programs.)"""
    ref, tri = tiny_moe_int4
    mlp = tri.model.weights.layers[1].mlp
    assert isinstance(mlp.gate_up, QuantizedWeight) and mlp.gate_up.shape == (8 * 2 * 96, 128)
    assert mlp.gate_up.group_size == 128 and not isinstance(mlp.router, QuantizedWeight)
    for prompt in (PROMPT, (PROMPT * 10)[:40]):
        assert rel_err(tri.logits(prompt), ref.logits(prompt)) < 1e-5
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    assert tri.generate([PROMPT[:1]], greedy)[0].token_ids == ref.generate([PROMPT[:1]], greedy)[0].token_ids


def test_tiny_moe_int4_weight_bytes(tiny_moe_int4):
    config = builtin_config("tiny-moe")
    q = at_load_config("int4")
    total, per_token = weight_bytes(config, 4, q)
    assert tiny_moe_int4[1].model.weights.nbytes() == total < weight_bytes(config, 4, None)[0]
    assert per_token < weight_bytes(config, 4, None)[1]


def test_quantized_moe_layer_is_still_seven_launches(tiny_moe_int4):
    """As tests/test_launches.py counts a float MoE layer: one decode step of a one-token prompt."""
    llm = tiny_moe_int4[1]
    config = llm.model.config
    per_layer = decode_layer_launches(llm, [1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert len(per_layer) == config.num_hidden_layers
    for i, launches in enumerate(per_layer):
        bound = 7 if config.is_moe_layer(i) else 6
        assert len(launches) <= bound, (i, launches)
        assert not [e for e in launches if e.startswith("torch:")], launches


def test_57b_int4_fits_one_80gb_gpu():
    total, per_token = weight_bytes(builtin_config("qwen2-57b-a14b"), 2, at_load_config("int4"))
    assert 28e9 < total < 36e9 and per_token < 10e9


# ---- GPU, bf16, real layer shapes -----------------------------------------------------------------------------

LAYERS = {"qwen1.5-moe-a2.7b": (60, 4, 2048, 1408, 5632), "qwen2-57b-a14b": (64, 8, 3584, 2560, 20480)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("t", [1, 16, 200])
@pytest.mark.parametrize("fold", [False, True])
def test_real_layer_shapes_bf16_gpu(name, kind, t, fold):
    e, k, h, inter, shared = LAYERS[name]
    layer = make_layer(e, h, inter, shared, kind, torch.bfloat16, seed=t, groups=(128, 128, 128), device="cuda")
    x = torch.randn(t, h, device="cuda").bfloat16()
    got = fused_moe(x, *args(layer), k, False, *shared_args(layer), fold_shared=fold)
    expected = reference(x.float(), dict(layer, router=layer["router"].float(),
                                         shared_gate=layer["shared_gate"].float()), k, False)
    assert rel_err(got, expected) < QUANT_MOE_TOL[torch.bfloat16]


@pytest.mark.parametrize("kind, block_n, block_k, warps, words", [
    ("int8", 32, 256, 4, 32), ("int8", 16, 256, 2, 32),  # BLOCK_K / 4 = 64 words: 16 a thread, capped to 8
    ("int8", 16, 256, 4, 64), ("int8", 8, 256, 2, 64),  # 8 a thread: as derived
    ("int4", 32, 256, 4, 32), ("fp8", 16, 256, 2, 128)])  # int4 BLOCK_K / 8; fp8 bytes, not capped
def test_decode_gemv_word_tiles_hold_at_most_8_words_a_thread(kind, block_n, block_k, warps, words):
    """The decode GEMVs' [BLOCK_N, BLOCK_KW] tiles of packed words (each with an fp32 scale and zero beside it): int8
    at BLOCK_K / 4 words spilled inside the gate_up GEMV's loop on sm_90 above 8 words a thread (tests/aot_sm90.py),
    so the launcher narrows them."""
    from qwen2rt.kernels.moe import _gemv_weight_args

    layer = make_layer(2, 512, 512, 0, kind, torch.float32, seed=0, groups=(128, 128, 128))  # >= 64 words a row
    cfg = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
    gate_up, down = _gemv_weight_args(layer["gate_up"], layer["down"], None, None, torch.empty(0), cfg)
    assert gate_up["meta"]["BLOCK_KW"] == down["meta"]["BLOCK_KW"] == words
