"""MoE kernels (routing, grouping, decode GEMVs, prefill grouped GEMMs) against the expert-looping reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import DEVICE, assert_bf16_close, assert_tight, poisoned
from qwen2rt.kernels import fused_moe, fused_moe_ref, moe_align, route, route_ref, silu_and_mul_ref
from qwen2rt.kernels import moe as moe_mod
from qwen2rt.kernels import moe_config

MOE_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
           torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def make_layer(e, h, inter, shared, dtype, seed, device=DEVICE, hot=None):
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: a real 57B layer is 2e9 numbers

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    layer = dict(router=rnd(e, h, scale=h ** -0.5), gate_up=rnd(e, 2 * inter, h, scale=h ** -0.5),
                 down=rnd(e, h, inter, scale=inter ** -0.5))
    if hot is not None:  # (expert, direction u): tokens with a large u component all pick this expert first
        expert, u = hot
        layer["router"][expert] = (10.0 * u).to(dtype).to(device)
    if shared:
        layer.update(shared_gate_up=rnd(2 * shared, h, scale=h ** -0.5),
                     shared_down=rnd(h, shared, scale=shared ** -0.5), shared_gate=rnd(1, h, scale=h ** -0.5))
    return layer


def run(x, layer, top_k, renorm, regime, config=None, fold=None):
    out = poisoned(*x.shape, dtype=x.dtype, device=x.device)
    got = fused_moe(x, layer["router"], layer["gate_up"], layer["down"], top_k, renorm, layer.get("shared_gate_up"),
                    layer.get("shared_down"), layer.get("shared_gate"), config=config, regime=regime, out=out,
                    fold_shared=fold)
    assert got.data_ptr() == out.data_ptr()
    return got


def check(x, layer, top_k, renorm, regime, dtype, config=None, fold=None):
    got = run(x, layer, top_k, renorm, regime, config, fold)
    ref = fused_moe_ref(x, layer["router"], layer["gate_up"], layer["down"], top_k, renorm,
                        layer.get("shared_gate_up"), layer.get("shared_down"), layer.get("shared_gate"))
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), ref.float(), **MOE_TOL[dtype])


REGIMES = ["decode", "prefill"]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# fold: the shared expert folded into the grouped launches (True), run separately (False), or the config's choice
# (None), which falls back to separate when the shared width is not a multiple of the expert width
@pytest.mark.parametrize("t, e, k, h, inter, shared, renorm, fold", [
    (1, 7, 2, 64, 40, 0, False, None),      # one token
    (5, 7, 3, 100, 37, 74, True, True),     # fewer tokens than a block; odd H and I; shared expert of 2 chunks
    (5, 7, 3, 100, 37, 74, True, False),
    (3, 61, 4, 64, 32, 0, True, None),      # prime expert count: most experts receive no token
    (4, 5, 5, 48, 24, 72, False, True),     # top-k equal to E, plus 3 shared chunks
    (2, 7, 2, 64, 24, 40, True, None),      # a shared expert that cannot fold (40 is not a multiple of 24)
])
def test_small_batches(t, e, k, h, inter, shared, renorm, fold, dtype, regime):
    layer = make_layer(e, h, inter, shared, dtype, seed=t * 100 + e)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(dtype).to(DEVICE)
    check(x, layer, k, renorm, regime, dtype, fold=fold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t, k, split, fold", [
    (1, 3, 2, True),     # 3 + 2 shared chunks = 5 pairs: split 2 does not divide, falls back to 1
    (1, 2, 4, True),     # 2 + 2 = 4 pairs in 4 programs of one pair
    (3, 2, 2, True),     # 3 tokens, 2 programs of 2 pairs each
    (13, 4, 4, False),   # the wide decode bucket, 4 routed pairs in 4 programs, shared expert separate
])
def test_decode_down_gemv_split_over_pairs(t, k, split, fold, dtype):
    # SPLIT_PAIRS: each token's pairs summed in several programs (fp32 partial rows), then in a fixed order
    layer = make_layer(7, 64, 40, 80, dtype, seed=t + k)
    x = torch.randn(t, 64, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    config = dict(moe_mod.DEFAULT_CONFIGS["decode"], SPLIT_PAIRS=split)
    check(x, layer, k, False, "decode", dtype, config=config, fold=fold)
    unsplit = run(x, layer, k, False, "decode", config=moe_mod.DEFAULT_CONFIGS["decode"], fold=fold)
    torch.testing.assert_close(run(x, layer, k, False, "decode", config=config, fold=fold), unsplit,
                               **MOE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t, regime, shared, fold, split", [
    (1, "decode", 80, True, 1),     # all fused: router GEMV, routing and gate_up normalise, down adds the residual
    (3, "decode", 0, None, 1),      # no shared expert: fused too
    (2, "decode", 80, True, 2),     # split down GEMV: the residual added after the fixed-order sum
    (5, "decode", 80, False, 1),    # shared expert separate: one norm kernel before, one add after
    (6, "prefill", 80, None, 1),    # grouped GEMMs: the same
])
def test_post_attention_norm_and_residual(t, regime, shared, fold, split, dtype):
    """fused_moe(x, norm_weight=g, residual=r) == moe(rms_norm(x, g)) + r, on the residual stream of a layer (x is
    also the residual, as the model calls it)."""
    layer = make_layer(7, 64, 40, shared, dtype, seed=t + 17)
    gen = torch.Generator().manual_seed(t)
    x = (3 * torch.randn(t, 64, generator=gen)).to(dtype).to(DEVICE)
    g = (1 + 0.3 * torch.randn(64, generator=gen)).to(dtype).to(DEVICE)
    shared_w = [layer.get(n) for n in ("shared_gate_up", "shared_down", "shared_gate")]
    config = dict(moe_mod.DEFAULT_CONFIGS["decode" if regime == "decode" else "prefill-small"], SPLIT_PAIRS=split)
    got = fused_moe(x, layer["router"], layer["gate_up"], layer["down"], 2, True, *shared_w, config=config,
                    regime=regime, fold_shared=fold, norm_weight=g, eps=1e-6, residual=x,
                    out=poisoned(t, 64, dtype=dtype))
    ref = fused_moe_ref(x, layer["router"], layer["gate_up"], layer["down"], 2, True, *shared_w, norm_weight=g,
                        eps=1e-6, residual=x)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), ref.float(), **MOE_TOL[dtype])
    # the norm matters: without it the output is far off (the tolerance above would catch a dropped norm)
    unnormed = fused_moe_ref(x, layer["router"], layer["gate_up"], layer["down"], 2, True, *shared_w) + x
    assert (unnormed.float() - ref.float()).abs().max() > 10 * MOE_TOL[dtype]["atol"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t, shared, fold, split, quant, regime", [
    (4, 0, None, 1, None, "decode"),      # no shared expert: the norm and residual fused, padding rows = residual
    (6, 80, True, 1, None, "decode"),     # folded shared chunks skipped too
    (3, 80, True, 2, None, "decode"),     # split down GEMV: padding partial rows 0, the residual added after the sum
    (5, 80, False, 1, None, "decode"),    # shared expert separate: it still runs on padding rows (a dense GEMV)
    (4, 80, True, 1, "int4", "decode"),   # quantized experts (the QUANT path)
    (7, 0, None, 1, None, "prefill"),     # the grouped GEMMs: padding pairs in no block
    (6, 80, True, 1, None, "prefill"),    # ... the folded shared chunks' pairs too
])
def test_padding_rows_read_no_expert(t, shared, fold, split, quant, regime, dtype, monkeypatch):
    """token_slots < 0 marks padding rows (a CUDA graph's bucket filled up): no program of theirs reads an expert,
    and the live rows are bitwise what they are without token_slots. Seen from outside: the padding rows of x hold
    NaN, so their router logits are NaN and they select experts 0 and 1 (NaN rows rank the lowest ids first), whose
    weights are NaN too, while every live row selects two of experts 2-6 (a large component along v, which only
    those router rows have). Any gate_up program of a padding pair would leave NaN in its h row (read here through a spy
    on the scratch allocation: decode), any down program or grouped block NaN in the output; skipped, h is 0 and
    the output exactly the residual, or NaN with the shared expert run separately (a dense GEMV over every row)."""
    layer = make_layer(7, 64, 40, shared, dtype, seed=t + 29)
    gen = torch.Generator().manual_seed(t)
    v = F.normalize(torch.randn(64, generator=gen), dim=0)
    layer["router"][:2] = 0
    layer["router"][2:] += v.to(dtype).to(DEVICE)
    live = torch.arange(t) % 3 != 1  # padding rows between live ones
    x = 3 * torch.randn(t, 64, generator=gen) + 20 * v
    x[~live] = float("nan")
    x = x.to(dtype).to(DEVICE)
    slots = torch.where(live, torch.arange(t) + 5, -1).to(DEVICE)
    residual = torch.randn(t, 64, generator=gen).to(dtype).to(DEVICE)
    g = (1 + 0.3 * torch.randn(64, generator=gen)).to(dtype).to(DEVICE)
    if quant:  # the experts flattened into rows ([E 2I, H], [E H, I]), 4-bit, one group per row; NaN scales
        from qwen2rt.models.quant import QuantConfig, quantize
        cfg = QuantConfig("gptq", 4, -1)
        layer.update({name: quantize(layer[name].flatten(0, -2) if name in ("gate_up", "down") else layer[name],
                                     cfg, dtype) for name in ("gate_up", "down", "shared_gate_up", "shared_down")})
        layer["gate_up"].scales[:2 * 80] = float("nan")
        layer["down"].scales[:2 * 64] = float("nan")
    else:
        layer["gate_up"][:2] = float("nan")
        layer["down"][:2] = float("nan")
    shared_w = [layer.get(n) for n in ("shared_gate_up", "shared_down", "shared_gate")]
    config = dict(moe_mod.DEFAULT_CONFIGS[regime if regime == "decode" else "prefill-small"], SPLIT_PAIRS=split)
    pairs = 2 + (shared // 40 if fold else 0)
    scratch, empty = [], torch.empty

    def spy(*shape, **kw):  # fused_moe's scratch, NaN-poisoned (as unwritten memory may be); its h: [T pairs, I]
        out = empty(*shape, **kw)
        if out.is_floating_point():
            out.fill_(float("nan"))
        if shape == ((t * pairs, 40),):
            scratch.append(out)
        return out

    def moe(rows, res, token_slots=None):
        return fused_moe(rows, layer["router"], layer["gate_up"], layer["down"], 2, True, *shared_w, config=config,
                         regime=regime, fold_shared=fold, norm_weight=g, eps=1e-6, residual=res,
                         out=poisoned(*rows.shape, dtype=dtype), token_slots=token_slots)

    alone = moe(x[live], residual[live])
    assert not torch.isnan(alone).any()  # no live row selects expert 0 or 1
    monkeypatch.setattr(moe_mod.torch, "empty", spy)
    got = moe(x, residual, slots)
    monkeypatch.undo()
    if regime == "decode":  # live rows: bitwise as without padding (the decode GEMVs are batch invariant)
        assert torch.equal(got[live], alone)
    else:  # the grouped GEMMs' blocks and the router's cuBLAS GEMM differ with the row count: a few ulps
        torch.testing.assert_close(got[live], alone, **MOE_TOL[dtype])
    (h,) = scratch
    if regime == "decode":  # (the grouped gate_up leaves the rows of pairs in no block unwritten: nothing reads them)
        assert torch.equal(h.view(t, pairs, 40)[~live], torch.zeros_like(h.view(t, pairs, 40)[~live]))
    if fold is False:
        assert torch.isnan(got[~live]).all()  # the shared expert ran on them: only it
    else:
        assert torch.equal(got[~live], residual[~live])
        assert torch.isnan(moe(x, residual)[~live]).all()  # without token_slots the experts run on them
    with pytest.raises(ValueError, match=r"token_slots must be an int32 or int64 tensor \[%d\]" % t):
        moe(x, residual, slots[:-1])
    with pytest.raises(ValueError, match=r"token_slots must be an int32 or int64"):
        moe(x, residual, slots.float())


def test_model_marks_padding_rows_for_the_moe_block(monkeypatch):
    """The model hands the MoE block its tokens' KV slots: in a decode step of 3 sequences padded to the bucket of 4
    the padding row's slot is -1, so its experts are skipped (test above); the prefill rows are all live."""
    from qwen2rt import LLM, SamplingParams, kernels

    llm = LLM("tiny-moe", device="cpu", dtype="float32", backend="triton", max_seq_len=32, max_batch_size=4,
              cuda_graph_buckets=(1, 4))
    seen, real = [], kernels.fused_moe

    def spy(*args, **kwargs):
        seen.append(kwargs["token_slots"].tolist())
        return real(*args, **kwargs)
    monkeypatch.setattr(kernels, "fused_moe", spy)
    llm.generate([[1, 2], [3, 4, 5], [6]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    c = llm.config
    n = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert [len(s) for s in seen] == [6] * n + [4] * n  # the prefill's 6 tokens, one decode step: each MoE layer
    assert all(min(s) >= 0 for s in seen[:n]) and all(min(s[:3]) >= 0 and s[3] == -1 for s in seen[n:])


@pytest.mark.parametrize("dtype, shared, fold", [(torch.float32, 40, None), (torch.float16, 112, True)])
def test_two_hundred_tokens(dtype, shared, fold):
    layer = make_layer(61, 96, 56, shared, dtype, seed=3)
    x = torch.randn(200, 96, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    check(x, layer, 4, False, None, dtype, fold=fold)  # the launcher's choice for 200 tokens: the grouped GEMMs


@pytest.mark.parametrize("regime", REGIMES)
def test_all_tokens_on_one_expert(regime):
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(4)), dim=0)
    layer = make_layer(7, 64, 32, 0, torch.float32, seed=11, hot=(3, u))
    x = (torch.randn(20, 64, generator=torch.Generator().manual_seed(1)) + 4 * u).to(DEVICE)
    ids, _ = route_ref(torch.nn.functional.linear(x, layer["router"]), 1, False)
    assert (ids == 3).all()
    check(x, layer, 1, False, regime, torch.float32)
    check(x, layer, 2, True, regime, torch.float32)


@pytest.mark.parametrize("e, k, renorm", [(7, 2, False), (61, 4, True), (64, 8, False), (5, 5, True)])
def test_routing_kernel(e, k, renorm):
    logits = torch.randn(37, e, device=DEVICE)
    ids, w = route(logits, e, k, renorm)
    ref_ids, ref_w = route_ref(logits, k, renorm)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_routing_ties_go_to_the_lower_expert():
    # equal logits (bf16 routers give them): the choice is the lowest index, as in the decode GEMVs' routing
    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 3.0, 1.0]], device=DEVICE)
    ids, w = route(logits, 6, 3, False)
    assert ids.tolist() == [[1, 3, 4], [4, 0, 1]]
    torch.testing.assert_close(w, torch.softmax(logits, -1).gather(1, ids.long()))


@pytest.mark.parametrize("k, chunks", [(2, 1), (4, 3)])
def test_routing_kernel_writes_the_folded_shared_expert(k, chunks):
    e = 7
    logits = torch.randn(9, e + 1, device=DEVICE)  # the last column: the shared expert's gate logit
    ids, w = route(logits, e, k, True, chunks)
    ref_ids, ref_w = route_ref(logits[:, :e], k, True)
    assert ids.shape == w.shape == (9, k + chunks)
    assert torch.equal(ids[:, :k].long(), ref_ids)
    torch.testing.assert_close(w[:, :k], ref_w)
    assert (ids[:, k:] == torch.arange(e, e + chunks, device=DEVICE)).all()
    torch.testing.assert_close(w[:, k:], torch.sigmoid(logits[:, e:]).expand(9, chunks))
    with pytest.raises(ValueError, match="gate"):
        route(logits[:, :e], e, k, True, chunks)  # a folded shared expert needs the gate column


def test_router_and_shared_gate_in_one_gemm():
    router, gate = torch.randn(7, 32, device=DEVICE), torch.randn(1, 32, device=DEVICE)
    assert torch.equal(moe_mod.router_with_shared_gate(router, gate), torch.cat([router, gate]))  # a copy
    gates = torch.randn(8, 32, device=DEVICE)
    joined = moe_mod.router_with_shared_gate(gates[:7], gates[7:])  # adjacent rows, as the model allocates them
    assert joined.data_ptr() == gates.data_ptr() and torch.equal(joined, gates)
    assert moe_mod.router_with_shared_gate(router, None) is router


def test_decode_gemvs_route_like_the_routing_kernel():
    """The decode GEMVs route each token themselves: 32 tokens (the largest decode bucket) on the GEMV path equal the
    grouped path, which routes with the routing kernel, on tied router logits (duplicate router rows)."""
    layer = make_layer(9, 64, 24, 48, torch.float32, seed=21)
    layer["router"][5] = layer["router"][2]
    layer["router"][7] = layer["router"][2]
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert moe_mod.token_bucket(32) == "decode-wide"
    wide = dict(moe_mod.DEFAULT_CONFIGS["decode-wide"], BLOCK_N=64, BLOCK_K=64)  # few programs: the interpreter
    gemv = run(x, layer, 3, True, "decode", config=wide, fold=True)
    grouped = run(x, layer, 3, True, "prefill", config=dict(moe_mod.DEFAULT_CONFIGS["prefill-small"], BLOCK_M=32),
                  fold=True)
    torch.testing.assert_close(gemv, grouped, **MOE_TOL[torch.float32])
    # fp32_moe routes with a stable sort (ties to the lower index); torch.topk in fused_moe_ref may not
    torch.testing.assert_close(gemv, fp32_moe(x, layer, 3, True), **MOE_TOL[torch.float32])


def test_decode_block_is_three_launches():
    """norm + router/shared-gate GEMV, gate_up GEMV (norm, routing), down GEMV (routing, + residual) at 32 tokens."""
    from launch_count import LaunchCounter

    layer = make_layer(5, 32, 16, 32, torch.float32, seed=8)
    gates = torch.cat([layer["router"], layer["shared_gate"]])  # adjacent, as the model allocates them
    x = torch.randn(32, 32, device=DEVICE)
    g = 1 + 0.1 * torch.randn(32, device=DEVICE)
    with LaunchCounter() as counter:
        got = fused_moe(x, gates[:5], layer["gate_up"], layer["down"], 2, False, layer["shared_gate_up"],
                        layer["shared_down"], gates[5:], fold_shared=True, norm_weight=g, residual=x)
    assert counter.events == ["triton:_fused_linear_kernel", "triton:_gemv_gate_up_kernel",
                              "triton:_gemv_down_kernel"], counter.events
    ref = fused_moe_ref(x, layer["router"], layer["gate_up"], layer["down"], 2, False, layer["shared_gate_up"],
                        layer["shared_down"], layer["shared_gate"], norm_weight=g, residual=x)
    torch.testing.assert_close(got, ref, **MOE_TOL[torch.float32])


@pytest.mark.parametrize("t, e, k, bm", [(1, 7, 2, 16), (50, 61, 4, 16), (200, 5, 5, 64), (9, 3, 1, 4)])
def test_align_groups_every_pair_once(t, e, k, bm):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32).to(DEVICE)
    sorted_pairs, block_experts, num_rows = moe_align(ids, e, bm)
    n, rows = t * k, int(num_rows)
    assert rows % bm == 0 and sorted_pairs.numel() % bm == 0 and rows <= sorted_pairs.numel()
    used = sorted_pairs[:rows]
    real = used[used < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    assert (sorted_pairs[rows:] == n).all()
    flat = ids.flatten()
    for b in range(rows // bm):
        block = used[b * bm:(b + 1) * bm]
        members = block[block < n].long()
        assert members.numel() > 0 and (flat[members] == block_experts[b]).all()
    assert (block_experts[rows // bm:] == e).all()  # unused blocks: past the last expert


def test_align_leaves_padding_tokens_pairs_out_of_every_block():
    """moe_align(live=): the pairs of tokens not live are in no block below num_rows; the live ones exactly once,
    in their expert's blocks, as without padding."""
    t, e, k, bm = 9, 5, 2, 4
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32).to(DEVICE)
    live = torch.tensor([True, False, True, True, False, False, True, True, False], device=DEVICE)
    sorted_pairs, block_experts, num_rows = moe_align(ids, e, bm, live)
    rows, n = int(num_rows), t * k
    used = sorted_pairs[:rows]
    live_pairs = [p for p in range(n) if live[p // k]]
    assert sorted(used[used < n].tolist()) == live_pairs  # every live pair once, no padding pair
    for b in range(rows // bm):
        members = used[b * bm:(b + 1) * bm]
        members = members[members < n].long()
        assert members.numel() > 0 and (ids.flatten()[members] == block_experts[b]).all()
    assert (block_experts[rows // bm:] >= e).all()
    assert rows == int(moe_align(ids[live], e, bm)[2])  # the blocks of the live tokens alone


@pytest.mark.parametrize("t, pin, folds", [
    (1, None, True), (9, None, True), (40, None, False),  # the defaults: folded for the GEMVs, separate for grouped
    (1, {"FOLD_SHARED": False}, False), (40, {"FOLD_SHARED": True}, True),  # a pinned choice is followed
])
def test_the_config_decides_whether_the_shared_expert_folds(t, pin, folds, monkeypatch):
    monkeypatch.setattr(moe_config, "_tuned", {})
    monkeypatch.setattr(moe_config, "_resolved", {})
    monkeypatch.setenv("QWEN2RT_CACHE_DIR", "/nonexistent-qwen2rt-test")
    if pin:
        monkeypatch.setenv("QWEN2RT_MOE_CONFIG", json.dumps(pin))
    else:
        monkeypatch.delenv("QWEN2RT_MOE_CONFIG", raising=False)
    separate_calls = []  # a shared expert that is not folded runs on its own
    real_shared_expert = moe_mod._shared_expert

    def spy(*args, **kwargs):
        separate_calls.append(1)
        return real_shared_expert(*args, **kwargs)

    monkeypatch.setattr(moe_mod, "_shared_expert", spy)
    layer = make_layer(5, 32, 16, 32, torch.float32, seed=4)  # shared width 32 = 2 expert widths
    x = torch.randn(t, 32, device=DEVICE)
    check(x, layer, 2, False, None, torch.float32)
    assert bool(separate_calls) != folds
    assert moe_mod.token_bucket(t) == {1: "decode", 9: "decode-wide", 40: "prefill-small"}[t]


@pytest.mark.parametrize("fold", [True, False])
def test_decode_block_is_batch_invariant_with_the_shared_expert_folded_or_not(fold):
    """A token's output is bitwise the same alone and among others of its token bucket (1-4, then 5-32), the shared
    expert folded or run on its own: at decode sizes nothing goes through cuBLAS (whose kernel depends on the row
    count): the router and the separate shared expert are GEMVs too."""
    from launch_count import LaunchCounter

    layer = make_layer(7, 64, 24, 48, torch.float32, seed=31)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    g = 1 + 0.1 * torch.randn(64, device=DEVICE)

    def block(rows, config=None):  # as the model calls it: the post-attention norm and the residual
        return fused_moe(rows, layer["router"], layer["gate_up"], layer["down"], 2, True, layer["shared_gate_up"],
                         layer["shared_down"], layer["shared_gate"], config=config, regime="decode",
                         fold_shared=fold, norm_weight=g, residual=rows)

    with LaunchCounter() as counter:
        alone = run(x[2:3], layer, 2, True, "decode", fold=fold)
    assert not any(e.split(":")[1] in ("mm", "addmm", "linear", "matmul", "bmm") for e in counter.events), \
        counter.events
    assert ("triton:_fused_linear_kernel" in counter.events) and counter.events.count(
        "triton:_fused_linear_kernel") == (1 if fold else 3), counter.events  # the router (+ the shared expert's two)
    among = run(x[:4], layer, 2, True, "decode", fold=fold)
    assert torch.equal(alone[0], among[2]) and not torch.equal(among[2], among[1])
    assert torch.equal(block(x[2:3])[0], block(x[:4])[2])
    wide = dict(moe_mod.DEFAULT_CONFIGS["decode-wide"], BLOCK_N=64, BLOCK_K=64)  # few programs: the interpreter
    five, twenty = run(x[:5], layer, 2, True, "decode", config=wide, fold=fold), run(x, layer, 2, True, "decode",
                                                                                      config=wide, fold=fold)
    assert torch.equal(five, twenty[:5])
    assert torch.equal(block(x[:5], wide), block(x, wide)[:5])
    check(x[:4], layer, 2, True, "decode", torch.float32, fold=fold)


def test_non_finite_router_logits_still_choose_real_experts():
    """A row of NaN (or inf) logits gives NaN probabilities: every choice must still be an expert id < E (an id past
    the end would read past the expert weights, or index past moe_align's counts, on the GPU), on the routing
    kernel and on the decode GEMVs, and the other rows are unaffected."""
    e, k = 6, 3  # E not a power of two: padding lanes in the rank
    logits = torch.randn(4, e, device=DEVICE)
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    logits[3, 0] = float("nan")
    ids, w = route(logits, e, k, True)
    assert ((ids >= 0) & (ids < e)).all(), ids
    assert all(len(set(row)) == k for row in ids.tolist())  # k different experts per row
    assert torch.equal(ids[0].long(), route_ref(logits[:1], k, True)[0][0])
    for t in (1, 3):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(t, 64, device=DEVICE)
            x[0, 5] = bad
            for fold in (True, False):
                layer = make_layer(e, 64, 24, 48, torch.float32, seed=32)
                got = run(x, layer, k, True, "decode", fold=fold)
                assert torch.isnan(got[0]).all() and not torch.isnan(got[1:]).any()
    # the grouped path (moe_align counts per expert id) with NaN rows
    x = torch.randn(40, 64, device=DEVICE)
    x[7] = float("nan")
    got = run(x, make_layer(e, 64, 24, 0, torch.float32, seed=33), k, True, "prefill")
    assert torch.isnan(got[7]).all() and not torch.isnan(got[:7]).any() and not torch.isnan(got[8:]).any()


def test_non_contiguous_shared_weights_run_separately():
    layer = make_layer(5, 32, 16, 32, torch.float32, seed=6)
    layer["shared_down"] = layer["shared_down"].t().contiguous().t()  # [H, Is] with transposed strides
    x = torch.randn(3, 32, device=DEVICE)
    check(x, layer, 2, True, None, torch.float32)  # the config says fold; it cannot, so it runs separately
    with pytest.raises(ValueError, match="contiguous"):
        check(x, layer, 2, True, None, torch.float32, fold=True)


def test_bad_inputs():
    layer = make_layer(4, 32, 16, 0, torch.float32, seed=0)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="top_k must be in"):
        fused_moe(x, layer["router"], layer["gate_up"], layer["down"], 5, False)
    with pytest.raises(ValueError, match="MoE shapes disagree"):
        fused_moe(x[:, :31], layer["router"], layer["gate_up"], layer["down"], 2, False)
    with pytest.raises(ValueError, match="regime"):
        fused_moe(x, layer["router"], layer["gate_up"], layer["down"], 2, False, regime="turbo")
    with pytest.raises(ValueError, match="fold_shared=True needs"):
        fused_moe(x, layer["router"], layer["gate_up"], layer["down"], 2, False, fold_shared=True)
    shared = make_layer(4, 32, 16, 24, torch.float32, seed=0)
    with pytest.raises(ValueError, match="fold_shared=True needs"):  # 24 is not a multiple of 16
        fused_moe(x, *(shared[n] for n in ("router", "gate_up", "down")), 2, False, shared["shared_gate_up"],
                  shared["shared_down"], shared["shared_gate"], fold_shared=True)
    with pytest.raises(ValueError, match="shared expert shapes disagree"):
        fused_moe(x, *(shared[n] for n in ("router", "gate_up", "down")), 2, False, shared["shared_gate_up"],
                  shared["shared_down"][:, :20], shared["shared_gate"])


def test_out_overlapping_x_or_residual_and_bad_dtypes_are_errors():
    """out is written before x is last read (the separate shared expert) and before the residual is added: out=x
    or out=residual gave wrong numbers; x's dtype is checked before any path (float64 prefill ran, wrongly)."""
    layer = make_layer(5, 32, 16, 32, torch.float32, seed=4)
    args = [layer[n] for n in ("router", "gate_up", "down")] + [2, False, layer["shared_gate_up"],
                                                               layer["shared_down"], layer["shared_gate"]]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    res = torch.randn(6, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap x"):
        fused_moe(x, *args, out=x)
    with pytest.raises(ValueError, match="out must not overlap residual"):
        fused_moe(x, *args, residual=res, out=res)
    for bad in (x.double(), x.int()):
        with pytest.raises(ValueError, match=f"x must be a float32, float16 or bfloat16 tensor .*got {bad.dtype}"):
            fused_moe(bad, *args, regime="prefill")
    out = poisoned(6, 32, dtype=torch.float32)
    got = fused_moe(x, *args, residual=res, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, fused_moe_ref(x, *args, residual=res), **MOE_TOL[torch.float32])


def test_configs_tuning_cache_and_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2RT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QWEN2RT_MOE_CONFIG", raising=False)
    monkeypatch.setattr(moe_config, "_tuned", {})  # this test's tuning stays in this test
    monkeypatch.setattr(moe_config, "_resolved", {})
    layer = make_layer(5, 64, 32, 0, torch.float32, seed=2)
    key = moe_mod.config_key(64, 32, 5, 2, 0, torch.float32, "decode", DEVICE)
    assert key.split("|")[1] == moe_config.kernels_version()
    # a config of this layer timed against other kernels (another Triton or kernel source): not used, and replaced
    # when the layer is tuned; another layer's entry is kept
    stale = key.replace(moe_config.kernels_version(), "triton0.0.0-000000000000")
    other = moe_mod.config_key(64, 48, 5, 2, 0, torch.float32, "decode", DEVICE)
    (tmp_path / "moe_configs.json").write_text(json.dumps({stale: {"BLOCK_K": 512}, other: {"BLOCK_K": 16}}))
    assert moe_mod.get_config(key, "decode")["BLOCK_K"] != 512
    assert moe_mod.get_config(other, "decode")["BLOCK_K"] == 16
    candidates = [{"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 1}, {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 1}]
    fake_ms = iter([2.0, 1.0])  # the second candidate "wins"
    best = moe_mod.tune(torch.empty(1, 64, device=DEVICE), layer["router"], layer["gate_up"], layer["down"], 2,
                        False, tokens=3, candidates=candidates, bench=lambda fn: (fn(), next(fake_ms))[1])
    assert best == dict(candidates[1], FOLD_SHARED=True)  # the decode default: no shared expert, nothing to flip
    assert json.load(open(tmp_path / "moe_configs.json")) == {key: best, other: {"BLOCK_K": 16}}
    assert moe_mod.get_config(key, "decode") == dict(moe_mod.DEFAULT_CONFIGS["decode"], **best)
    # a foldable shared expert: the best block sizes are timed again with the shared expert separate, which "wins"
    shared = make_layer(5, 64, 32, 64, torch.float32, seed=2)
    fake_ms = iter([2.0, 1.0, 0.5])
    tuned = moe_mod.tune(torch.empty(1, 64, device=DEVICE), *(shared[n] for n in ("router", "gate_up", "down")), 2,
                         False, 3, shared["shared_gate_up"], shared["shared_down"], shared["shared_gate"],
                         candidates=candidates, bench=lambda fn: (fn(), next(fake_ms))[1])
    assert tuned == dict(candidates[1], FOLD_SHARED=False)
    shared_key = moe_mod.config_key(64, 32, 5, 2, 64, torch.float32, "decode", DEVICE)
    assert json.load(open(tmp_path / "moe_configs.json"))[shared_key] == tuned
    monkeypatch.setenv("QWEN2RT_MOE_CONFIG", json.dumps({"BLOCK_K": 128}))
    assert moe_mod.get_config(key, "decode")["BLOCK_K"] == 128
    # the version hashes the kernels' sources: one file fewer is another version
    monkeypatch.setattr(moe_config, "KERNEL_SOURCES", moe_config.KERNEL_SOURCES[:-1])
    moe_config.kernels_version.cache_clear()
    try:
        assert moe_config.kernels_version() != key.split("|")[1]
    finally:
        moe_config.kernels_version.cache_clear()
    # a tuned config gives the same result as the default one
    x = torch.randn(3, 64, device=DEVICE)
    check(x, layer, 2, False, None, torch.float32, config=candidates[1])


# ---- real layer shapes on the GPU ----------------------------------------------------------------------------------

LAYERS = {"qwen1.5-moe-a2.7b": (60, 4, 2048, 1408, 5632), "qwen2-57b-a14b": (64, 8, 3584, 2560, 20480)}


BF16_MOE_TOL = 2e-2  # bf16 roundings (h, output) give ~5e-3 against fp32; one expert dropped is >= 6e-2 away


def fp32_moe(x, layer, top_k, renorm, drop_smallest=False):
    """The MoE block in fp32 on bf16 inputs, routed like the kernels: from the same bf16 router logits (F.linear on
    the same device), ties to the lowest expert index. drop_smallest: each token's lowest-weight selected expert
    left out (a plausible bug)."""
    logits = F.linear(x, layer["router"])
    probs, ids = torch.sort(torch.softmax(logits.float(), dim=-1), dim=-1, descending=True, stable=True)
    weights, ids = probs[:, :top_k], ids[:, :top_k]
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if drop_smallest:
        weights = torch.cat([weights[:, :-1], torch.zeros_like(weights[:, -1:])], dim=1)
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        h = silu_and_mul_ref(F.linear(xf[token], layer["gate_up"][e].float()))
        out.index_add_(0, token, F.linear(h, layer["down"][e].float()) * weights[token, slot, None])
    if "shared_gate_up" in layer:
        shared = F.linear(silu_and_mul_ref(F.linear(xf, layer["shared_gate_up"].float())), layer["shared_down"].float())
        out += torch.sigmoid(F.linear(xf, layer["shared_gate"].float())) * shared
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("t", [1, 4, 16, 200])
@pytest.mark.parametrize("fold", [False, True])
def test_real_layer_shapes_bf16_gpu(name, t, fold):
    e, k, h, inter, shared = LAYERS[name]
    layer = make_layer(e, h, inter, shared, torch.bfloat16, seed=t, device="cuda")
    x = torch.randn(t, h, device="cuda").bfloat16()
    reference = fp32_moe(x, layer, k, False)
    assert_bf16_close(run(x, layer, k, False, None, fold=fold), reference, BF16_MOE_TOL)
    assert_tight(reference, {"one selected expert dropped": fp32_moe(x, layer, k, False, drop_smallest=True)},
                 BF16_MOE_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("fold", [False, True])
def test_decode_block_batch_invariant_bf16_gpu(name, fold):
    """Real shapes in bf16: a token alone (M = 1 compiles kernels of its own) and among 3 others, then 5 tokens and
    the same among 20 (the 5-32 bucket), bitwise, the shared expert folded or on its own (default configs: the
    tuned ones may differ between the buckets)."""
    e, k, h, inter, shared = LAYERS[name]
    layer = make_layer(e, h, inter, shared, torch.bfloat16, seed=11, device="cuda")
    x = torch.randn(20, h, device="cuda").bfloat16()
    configs = {b: moe_mod.DEFAULT_CONFIGS[b] for b in moe_mod.GEMV_BUCKETS}
    alone = run(x[2:3], layer, k, False, "decode", config=configs["decode"], fold=fold)
    among = run(x[:4], layer, k, False, "decode", config=configs["decode"], fold=fold)
    assert torch.equal(alone[0], among[2]) and not torch.equal(among[2], among[1])
    five = run(x[:5], layer, k, False, "decode", config=configs["decode-wide"], fold=fold)
    twenty = run(x, layer, k, False, "decode", config=configs["decode-wide"], fold=fold)
    assert torch.equal(five, twenty[:5])


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 40])  # decode GEMVs at 1 and 16 tokens, grouped GEMMs (device grouping) at 40
@pytest.mark.parametrize("fold", [False, True])
def test_moe_layer_in_a_cuda_graph_equals_eager(t, fold):
    e, k, h, inter, shared = LAYERS["qwen1.5-moe-a2.7b"]
    layer = make_layer(e, h, inter, shared, torch.bfloat16, seed=7, device="cuda")
    x = torch.randn(t, h, device="cuda").bfloat16()
    eager = run(x, layer, k, False, None, fold=fold).clone()
    static_out = torch.empty_like(x)
    run(x, layer, k, False, None, fold=fold)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(x, layer["router"], layer["gate_up"], layer["down"], k, False, layer["shared_gate_up"],
                  layer["shared_down"], layer["shared_gate"], out=static_out, fold_shared=fold)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    x.copy_(torch.randn_like(x))  # new input, same graph
    graph.replay()
    torch.testing.assert_close(static_out, run(x, layer, k, False, None, fold=fold), rtol=0, atol=0)
