"""Fused RoPE-attention kernels (prefill and decode over the paged KV cache) against the PyTorch reference.

Every cache row no sequence owns is NaN, and block-table entries past a sequence's blocks point at NaN blocks, so
a kernel that reads anything outside a sequence's context, or leaves an output element unwritten, fails."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kernel_utils import DEVICE, poisoned
from qwen2rt.kernels import decode_attention, paged_attention_ref, prefill_attention

ATTN_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=5e-3, atol=5e-3),
            torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def rope_tables(head_dim: int, max_pos: int, theta: float = 1e6):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


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
        self.cos, self.sin = rope_tables(d, max(ctx) + 8)
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

@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(14, 2, 64), (28, 4, 128)])
@pytest.mark.parametrize("batch, context", [(1, 512), (1, 4096), (16, 512), (4, 2000)])
def test_decode_qwen2_shapes_bf16_gpu(hq, hkv, d, batch, context):
    case = Case([context - 1 - 7 * b for b in range(batch)], [1] * batch, hq, hkv, d, torch.bfloat16,
                block_size=16, seed=batch)
    check(case, *run_decode(case))


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(14, 2, 64), (28, 4, 128)])
def test_prefill_qwen2_shapes_bf16_gpu(hq, hkv, d):
    case = Case([0, 300], [2048, 700], hq, hkv, d, torch.bfloat16, block_size=16, seed=3)
    check(case, *run_prefill(case))
