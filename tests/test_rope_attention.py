"""Fused RoPE-attention kernels (prefill and decode over the paged KV cache) against the PyTorch reference.

Every cache row no sequence owns is NaN, and block-table entries past a sequence's blocks point at NaN blocks, so
a kernel that reads anything outside a sequence's context, or leaves an output element unwritten, fails."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kernel_utils import DEVICE, assert_bf16_close, assert_tight, poisoned, rel_err
from qwen2rt.kernels import decode_attention, paged_attention_ref, prefill_attention
from qwen2rt.kernels.rope_attention import _causal_attention, _gather, apply_rotary

ATTN_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=5e-3, atol=5e-3),
            torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def rope_tables(head_dim: int, max_pos: int, theta: float = 1e6, device=DEVICE):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().to(device), freqs.sin().to(device)


class Case:
    """B sequences, sequence b with cached[b] tokens already in the cache and new[b] tokens in this step."""

    def __init__(self, cached, new, hq, hkv, d, dtype, block_size=16, seed=0, extra_blocks=3, device=DEVICE):
        g = torch.Generator().manual_seed(seed)
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        ctx = [c + n for c, n in zip(cached, new)]
        blocks_per_seq = [math.ceil(c / block_size) for c in ctx]
        num_blocks = sum(blocks_per_seq) + extra_blocks
        width = max(max(blocks_per_seq), 1) + 1
        order = torch.randperm(num_blocks, generator=g).tolist()
        tables, self.slots, self.positions = [], [], []
        for b, (c, n) in enumerate(zip(cached, new)):
            own = [order.pop() for _ in range(blocks_per_seq[b])]
            filler = order[0] if order else 0  # an unowned (NaN) block
            tables.append(own + [filler] * (width - len(own)))
            for p in range(c, c + n):
                self.positions.append(p)
                self.slots.append(own[p // block_size] * block_size + p % block_size if own else -1)
        shape = (num_blocks, block_size, hkv, d)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        for b, c in enumerate(cached):  # the cached prefix: random values in the sequence's first c rows
            for p in range(c):
                blk, row = tables[b][p // block_size], p % block_size
                self.k_cache[blk, row] = torch.randn(hkv, d, generator=g).to(dtype)
                self.v_cache[blk, row] = torch.randn(hkv, d, generator=g).to(dtype)
        t = sum(new)
        self.qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
        self.k_cache, self.v_cache = self.k_cache.to(device), self.v_cache.to(device)
        self.block_tables = torch.tensor(tables, dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor(ctx, dtype=torch.int32, device=device)
        self.query_start = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32, device=device)
        self.positions = torch.tensor(self.positions, dtype=torch.long, device=device)
        self.slot_mapping = torch.tensor(self.slots, dtype=torch.long, device=device)
        self.cos, self.sin = rope_tables(d, max(ctx) + 8, device=device)
        self.scale = d ** -0.5
        self.max_query_len = max(new)

    def args(self, k_cache, v_cache):
        return (self.qkv, k_cache, v_cache, self.cos, self.sin, self.positions, self.slot_mapping, self.block_tables,
                self.seq_lens)

    def reference(self):
        k, v = self.k_cache.clone(), self.v_cache.clone()
        out = paged_attention_ref(*self.args(k, v), self.query_start, self.hq, self.hkv, self.scale)
        return out, k, v


def check(case: Case, out, k, v):
    ref_out, ref_k, ref_v = case.reference()
    assert not torch.isnan(out).any(), "output holds NaN"
    torch.testing.assert_close(out.float(), ref_out.float(), **ATTN_TOL[case.dtype])
    # the cache: written rows equal, every other row untouched (NaN stays NaN)
    torch.testing.assert_close(k, ref_k, equal_nan=True, **ATTN_TOL[case.dtype])
    torch.testing.assert_close(v, ref_v, equal_nan=True, rtol=0, atol=0)


def run_prefill(case: Case):
    k, v = case.k_cache.clone(), case.v_cache.clone()
    out = poisoned(case.qkv.shape[0], case.hq * case.d, dtype=case.dtype)
    prefill_attention(*case.args(k, v), case.query_start, case.max_query_len, case.hq, case.hkv, case.scale,
                      out=out)
    return out, k, v


def run_decode(case: Case, num_splits=None):
    k, v = case.k_cache.clone(), case.v_cache.clone()
    out = poisoned(case.qkv.shape[0], case.hq * case.d, dtype=case.dtype)
    decode_attention(*case.args(k, v), case.hq, case.hkv, case.scale, num_splits=num_splits, out=out)
    return out, k, v


CPU_DTYPES = [torch.float32, torch.float16]  # bf16 tl.dot is wrong in the interpreter (triton #11584): GPU only
HEADS = [(4, 4), (14, 2)]  # GQA 1:1 and 7:1


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hq, hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [1, 7, 63])
def test_prefill_single_sequence(t, d, hq, hkv, dtype):
    case = Case([0], [t], hq, hkv, d, dtype, seed=t + d)
    check(case, *run_prefill(case))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hq, hkv", HEADS)
def test_prefill_varlen_batch_on_cached_prefixes(hq, hkv, dtype):
    # new tokens on top of cached prefixes (chunked prefill / reused prompt), crossing block boundaries
    case = Case([0, 20, 5, 70], [37, 13, 1, 66], hq, hkv, 64, dtype, seed=1)
    out, k, v = run_prefill(case)
    check(case, out, k, v)
    # and equal to running each sequence alone
    starts = case.query_start.tolist()
    for b, (c, n) in enumerate(zip([0, 20, 5, 70], [37, 13, 1, 66])):
        alone = Case([c], [n], hq, hkv, 64, dtype, seed=1)
        alone.qkv = case.qkv[starts[b]:starts[b + 1]].clone()
        alone.k_cache, alone.v_cache = case.k_cache, case.v_cache
        alone.block_tables = case.block_tables[b:b + 1].contiguous()
        alone.slot_mapping = case.slot_mapping[starts[b]:starts[b + 1]].clone()
        alone.cos, alone.sin = case.cos, case.sin
        out_b, _, _ = run_prefill(alone)
        torch.testing.assert_close(out_b, out[starts[b]:starts[b + 1]], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hq, hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128])
def test_decode_batch_with_padding(d, hq, hkv, dtype):
    # context lengths 1 (only the new token), across block boundaries, long; two padding rows (length 0, slot -1)
    cached = [0, 16, 99, 300, 0, 40]
    new = [1, 1, 1, 1, 0, 1]
    case = Case(cached, new, hq, hkv, d, dtype, seed=d)
    # a padding row still has a qkv row: give it one at row 4, slot -1, length 0
    qkv = case.qkv
    case.qkv = torch.cat([qkv[:4], torch.randn(1, qkv.shape[1]).to(dtype).to(DEVICE), qkv[4:]])
    case.positions = torch.cat([case.positions[:4], torch.zeros(1, dtype=torch.long, device=DEVICE),
                                case.positions[4:]])
    case.slot_mapping = torch.cat([case.slot_mapping[:4], torch.full((1,), -1, dtype=torch.long, device=DEVICE),
                                   case.slot_mapping[4:]])
    case.query_start = torch.arange(len(cached) + 1, dtype=torch.int32, device=DEVICE)
    for splits in (1, 3, 8):
        out, k, v = run_decode(case, num_splits=splits)
        check(case, out, k, v)
        assert torch.equal(out[4], torch.zeros_like(out[4]))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_equals_per_sequence_loop(dtype):
    cached, hq, hkv, d = [5, 47, 130], 14, 2, 64
    case = Case(cached, [1, 1, 1], hq, hkv, d, dtype, seed=9)
    out, _, _ = run_decode(case)
    for b in range(3):
        k, v = case.k_cache.clone(), case.v_cache.clone()
        one = decode_attention(case.qkv[b:b + 1], k, v, case.cos, case.sin, case.positions[b:b + 1],
                               case.slot_mapping[b:b + 1], case.block_tables[b:b + 1], case.seq_lens[b:b + 1],
                               hq, hkv, case.scale, num_splits=4)
        torch.testing.assert_close(one[0], out[b], **ATTN_TOL[dtype])


def test_bad_inputs():
    case = Case([3], [2], 4, 2, 64, torch.float32)
    k, v = case.k_cache.clone(), case.v_cache.clone()
    with pytest.raises(ValueError, match="num_kv_heads=4"):
        prefill_attention(*case.args(k, v), case.query_start, 2, 8, 4, case.scale)
    with pytest.raises(ValueError, match="qkv .* must share a float dtype"):
        prefill_attention(case.qkv.half(), k, v, *case.args(k, v)[3:], case.query_start, 2, 4, 2, case.scale)
    with pytest.raises(ValueError, match="one token per sequence"):
        decode_attention(*case.args(k, v), 4, 2, case.scale)
    bad_d = torch.zeros(4, 16, 2, 48)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        decode_attention(torch.zeros(1, 8 * 48), bad_d, bad_d, *case.args(k, v)[3:], 4, 2, 1.0)


# ---- real Qwen2 shapes in bf16 on the GPU --------------------------------------------------------------------
# The kernels' bf16 output is compared with the fp32 function on the same bf16 inputs, by relative error. The
# tolerance is proven tight on the same data: the fp32 function with one plausible bug (10% of the context dropped,
# 0.9x the softmax scale, the newest token not attended) lands farther than the tolerance from it. The new token's
# V is scaled up 8x so that attending it or not is visible at 4096 keys (with near-uniform attention one key's share
# of the output is ~1/sqrt(context)); the check runs on the CPU too, so CI proves the tolerance without a GPU.

BF16_ATTN_TOL = 1e-2  # bf16 rounding of q, k, v and the output gives ~2.5e-3 against fp32
BF16_MUTATIONS = {"10% of the context dropped": dict(drop_oldest=0.1), "0.9x softmax scale": dict(scale_mult=0.9),
                  "newest token not attended": dict(skip_newest=True)}
DECODE_SHAPES = [(1, 512), (1, 4096), (16, 512), (4, 2000)]
GPU_LAYOUTS = [(14, 2, 64), (28, 4, 128)]


def fp32_attention(case: Case) -> dict[str, torch.Tensor]:
    """The attention of `case` in fp32 on its (bf16) inputs ("exact"), and with each bug of BF16_MUTATIONS: the
    oldest `drop_oldest` of each sequence's context dropped, the scale multiplied by `scale_mult`, or each query's
    own (newest) key masked."""
    qkv, hq, hkv, d = case.qkv.float(), case.hq, case.hkv, case.d
    t = qkv.shape[0]
    cos, sin = case.cos[case.positions], case.sin[case.positions]
    q = apply_rotary(qkv[:, :hq * d].reshape(t, hq, d), cos, sin)
    k, v = case.k_cache.float(), case.v_cache.float()
    valid = case.slot_mapping >= 0  # this step's tokens: rotated K and V into the (fp32 copy of the) cache
    k.view(-1, hkv, d)[case.slot_mapping[valid]] = apply_rotary(
        qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d), cos, sin)[valid]
    v.view(-1, hkv, d)[case.slot_mapping[valid]] = qkv[:, (hq + hkv) * d:].reshape(t, hkv, d)[valid]
    variants = dict(exact={}, **BF16_MUTATIONS)
    outs = {name: torch.zeros(t, hq, d, device=qkv.device) for name in variants}
    starts = case.query_start.tolist()
    for b, ctx in enumerate(case.seq_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        if ctx == 0 or q1 == q0:
            continue
        kb, vb = _gather(k, case.block_tables[b], ctx), _gather(v, case.block_tables[b], ctx)
        for c0 in range(q0, q1, 512):  # query chunks: a bounded score matrix
            c1 = min(q1, c0 + 512)
            q_pos = torch.arange(ctx - (q1 - c0), ctx - (q1 - c1), device=qkv.device)
            for name, kw in variants.items():
                n0 = int(kw.get("drop_oldest", 0.0) * ctx)
                outs[name][c0:c1] = _causal_attention(q[c0:c1], kb[n0:], vb[n0:],
                                                      case.scale * kw.get("scale_mult", 1.0),
                                                      q_pos - n0 - int(kw.get("skip_newest", False)))
    return {name: out.reshape(t, hq * d) for name, out in outs.items()}


def bf16_decode_case(hq, hkv, d, batch, context, device=DEVICE) -> Case:
    case = Case([context - 1 - 7 * b for b in range(batch)], [1] * batch, hq, hkv, d, torch.bfloat16,
                block_size=16, seed=batch, device=device)
    case.qkv[:, (hq + hkv) * d:] *= 8  # the new token's V
    return case


def bf16_prefill_case(hq, hkv, d, device=DEVICE) -> Case:
    return Case([0, 300], [2048, 700], hq, hkv, d, torch.bfloat16, block_size=16, seed=3, device=device)


def check_bf16(case: Case, out, k, v):
    reference = fp32_attention(case)
    exact = reference.pop("exact")
    assert_bf16_close(out, exact, BF16_ATTN_TOL)
    assert_tight(exact, reference, BF16_ATTN_TOL)
    _, ref_k, ref_v = case.reference()  # the cache rows written: rotated K as the bf16 reference rounds it, V exact
    torch.testing.assert_close(k, ref_k, equal_nan=True, **ATTN_TOL[torch.bfloat16])
    torch.testing.assert_close(v, ref_v, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("hq, hkv, d", GPU_LAYOUTS)
@pytest.mark.parametrize("batch, context", DECODE_SHAPES)
def test_bf16_decode_tolerance_is_tight(hq, hkv, d, batch, context):
    """On the CPU, no kernel: on the decode GPU tests' data, every mutation exceeds their tolerance (the closest one,
    the newest token, is the one at stake), and the bf16 reference (rounding q, k and the output where the kernels
    do) stays well inside it. (In prefill every mutation is 10x farther: the GPU test checks it.)"""
    case = bf16_decode_case(hq, hkv, d, batch, context, "cpu")
    reference = fp32_attention(case)
    exact = reference.pop("exact")
    assert_tight(exact, reference, BF16_ATTN_TOL)
    assert rel_err(case.reference()[0], exact) < BF16_ATTN_TOL / 2


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", GPU_LAYOUTS)
@pytest.mark.parametrize("batch, context", DECODE_SHAPES)
def test_decode_qwen2_shapes_bf16_gpu(hq, hkv, d, batch, context):
    case = bf16_decode_case(hq, hkv, d, batch, context, "cuda")
    for splits in (None, 1):  # the launcher's split count, and one split (no reduction)
        check_bf16(case, *run_decode(case, num_splits=splits))


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", GPU_LAYOUTS)
def test_prefill_qwen2_shapes_bf16_gpu(hq, hkv, d):
    case = bf16_prefill_case(hq, hkv, d, "cuda")
    check_bf16(case, *run_prefill(case))
