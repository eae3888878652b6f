"""Fused RoPE-attention kernels (prefill and decode over the paged KV cache) against the PyTorch reference.

Every cache row no sequence owns is NaN, and block-table entries past a sequence's blocks point at NaN blocks, so
a kernel that reads anything outside a sequence's context, or leaves an output element unwritten, fails."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math

import pytest
import torch

from kernel_utils import DEVICE, assert_bf16_close, assert_tight, poisoned, rel_err
from qwen2rt.kernels import decode_attention, paged_attention_ref, prefill_attention
from qwen2rt.kernels.rope_attention import PREFILL_CANDIDATES, _causal_attention, _gather, apply_rotary

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
            p = torch.arange(c)
            blk, row = torch.tensor(tables[b], dtype=torch.long)[p // block_size], p % block_size
            self.k_cache[blk, row] = torch.randn(c, hkv, d, generator=g).to(dtype)
            self.v_cache[blk, row] = torch.randn(c, hkv, d, generator=g).to(dtype)
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


def run_prefill(case: Case, config=None):
    k, v = case.k_cache.clone(), case.v_cache.clone()
    out = poisoned(case.qkv.shape[0], case.hq * case.d, dtype=case.dtype)
    prefill_attention(*case.args(k, v), case.query_start, case.max_query_len, case.hq, case.hkv, case.scale,
                      out=out, config=config)
    return out, k, v


CPU_DTYPES = [torch.float32, torch.float16]  # bf16 tl.dot is wrong in the interpreter (triton #11584): GPU only


# each pair of (head_dim, heads, dtype) once (an orthogonal array, not the full product: the interpreter is slow)
PREFILL_LAYOUTS = [(64, 4, 4, torch.float32), (64, 14, 2, torch.float16), (128, 4, 4, torch.float16),
                   (128, 14, 2, torch.float32)]


@pytest.mark.parametrize("d, hq, hkv, dtype", PREFILL_LAYOUTS)
@pytest.mark.parametrize("t", [1, 7, 63])
def test_prefill_single_sequence(t, d, hq, hkv, dtype):
    case = Case([0], [t], hq, hkv, d, dtype, seed=t + d)
    check(case, *run_prefill(case))


@pytest.mark.parametrize("hq, hkv, dtype", [(4, 4, torch.float32), (14, 2, torch.float16)])
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


@pytest.mark.parametrize("config", [None] + PREFILL_CANDIDATES, ids=lambda c: "default" if c is None else
                         "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**c))
def test_prefill_tiles_past_the_diagonal(config):
    """Every tile configuration bench_attention times, on query blocks past the first: the tiles below a block's
    diagonal skip the causal mask, the rest keep it. A 150-token prompt, and 90 new tokens on a 126-token prefix:
    the first query block's first row sits 2 before a tile boundary for every BLOCK_N, where one unmasked tile too
    many would show it the next token (tried: that off-by-one fails here)."""
    case = Case([0, 126], [150, 90], 4, 2, 64, torch.float32, seed=3)
    check(case, *run_prefill(case, config))


def decode_case(lengths, hq, hkv, d, dtype, seed=0, device=DEVICE) -> Case:
    """A decode step: sequence b has lengths[b] - 1 cached tokens and one new token; a length of 0 is a padding row
    (a random qkv row, position 0, slot -1)."""
    real = [b for b, n in enumerate(lengths) if n]
    case = Case([lengths[b] - 1 for b in real], [1] * len(real), hq, hkv, d, dtype, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    bsz, idx = len(lengths), torch.tensor(real, device=device)
    qkv = torch.randn(bsz, case.qkv.shape[1], generator=g).to(dtype).to(device)
    qkv[idx] = case.qkv
    positions = torch.zeros(bsz, dtype=torch.long, device=device)
    slots = torch.full((bsz,), -1, dtype=torch.long, device=device)
    positions[idx], slots[idx] = case.positions, case.slot_mapping
    tables = torch.full((bsz, case.block_tables.shape[1]), case.block_tables[0, -1].item(), dtype=torch.int32,
                        device=device)  # a padding row's table: an unowned (NaN) block
    tables[idx] = case.block_tables
    case.qkv, case.positions, case.slot_mapping, case.block_tables = qkv, positions, slots, tables
    case.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    case.query_start = torch.arange(bsz + 1, dtype=torch.int32, device=device)
    return case


@contextlib.contextmanager
def nan_workspace():
    """torch.empty hands out NaN-filled float tensors: the decode partials and log-sum-exps start poisoned, so a
    reduction that reads a split no program wrote (a dead split past a sequence's length) fails."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned_empty
    try:
        yield
    finally:
        torch.empty = empty


def run_decode(case: Case, **overrides):
    """overrides: decode_attention's chunk_size / max_splits."""
    k, v = case.k_cache.clone(), case.v_cache.clone()
    out = poisoned(case.qkv.shape[0], case.hq * case.d, dtype=case.dtype)
    with nan_workspace():
        decode_attention(*case.args(k, v), case.hq, case.hkv, case.scale, out=out, **overrides)
    return out, k, v


# GQA groups 1, 2 and 7, head_dim 64 and 128, each dtype twice (few heads: the interpreter's time is per program)
DECODE_LAYOUTS = [(2, 2, 128, torch.float32), (4, 2, 64, torch.float16), (7, 1, 64, torch.float32),
                  (14, 2, 128, torch.float16)]
# around a tile (64) and a 128-token chunk, several chunks, two padding rows (0)
ODD_LENGTHS = [1, 2, 63, 0, 64, 65, 127, 128, 129, 0, 401]
# chunk 128: 401 tokens in 4 splits; chunk 64 with at most 3 splits: 401 tokens = 7 chunks, 3 per split
SPLITTINGS = [dict(chunk_size=128), dict(chunk_size=64, max_splits=3)]


@pytest.mark.parametrize("hq, hkv, d, dtype", DECODE_LAYOUTS)
def test_decode_odd_lengths_with_padding(hq, hkv, d, dtype):
    case = decode_case(ODD_LENGTHS, hq, hkv, d, dtype, seed=d + hq)
    pad = [b for b, n in enumerate(ODD_LENGTHS) if n == 0]
    for overrides in SPLITTINGS:
        out, k, v = run_decode(case, **overrides)
        check(case, out, k, v)  # padding rows: 0 from the reference too, and no cache row written
        assert torch.equal(out[pad], torch.zeros_like(out[pad]))


def test_decode_default_chunk_and_context_past_max_splits():
    # the default chunk (256) around its edges; with 2 splits at most, 1100 tokens = 5 chunks, 3 per split
    lengths = [255, 256, 0, 257, 1100]
    case = decode_case(lengths, 4, 2, 128, torch.float32, seed=5)
    for overrides in (dict(), dict(max_splits=2)):
        check(case, *run_decode(case, **overrides))


def batch_views(case: Case, rows: list[int]) -> Case:
    """Rows `rows` of a decode case as a batch of their own (the same cache, block tables as wide)."""
    sub = copy.copy(case)
    idx = torch.tensor(rows, device=case.qkv.device)
    sub.qkv, sub.positions, sub.slot_mapping = case.qkv[idx], case.positions[idx], case.slot_mapping[idx]
    sub.block_tables, sub.seq_lens = case.block_tables[idx], case.seq_lens[idx]
    sub.query_start = torch.arange(len(rows) + 1, dtype=torch.int32, device=case.qkv.device)
    return sub


def assert_batch_invariant(case: Case, target: int, **overrides) -> tuple[Case, tuple]:
    """Row `target` of `case` alone (B=1), at row 5 among 7 others (B=8), at row 11 of 16 and at row 26 of 32:
    bitwise the same output and the same new cache row. -> the batch of 32 and its (out, k_cache, v_cache)"""
    others = [b for b in range(case.qkv.shape[0]) if b != target]
    batches = {1: [target], 8: others[:5] + [target] + others[5:7], 16: others[7:18] + [target] + others[18:22],
               32: others[:26] + [target] + others[26:31]}
    slot = case.slot_mapping[target]
    alone = None
    for bsz, rows in batches.items():
        sub = batch_views(case, rows)
        out, k, v = run_decode(sub, **overrides)
        row = (out[rows.index(target)], k.view(-1, case.hkv, case.d)[slot], v.view(-1, case.hkv, case.d)[slot])
        if alone is None:
            alone = row
        for name, a, b in zip(("output", "k cache row", "v cache row"), row, alone):
            assert torch.equal(a, b), f"the {name} differs between batch 1 and batch {bsz}"
    return sub, (out, k, v)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_batch_invariant(dtype):
    # 32 rows of mixed lengths, two of them padding; the target spans 6 chunks of 64, the others 1 or 2
    g = torch.Generator().manual_seed(11)
    lengths = [int(n) for n in torch.randint(1, 129, (32,), generator=g)]
    lengths[3] = lengths[17] = 0
    target = 9
    lengths[target] = 353
    case = decode_case(lengths, 2, 1, 64, dtype, seed=11)
    batch, result = assert_batch_invariant(case, target, chunk_size=64)
    check(batch, *result)  # the batch of 32 against the reference too


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
    # an output in the memory the kernels read: the caches (any layout), qkv, the rotary tables
    t = case.qkv.shape[0]
    in_cache = k.view(-1)[64:64 + t * 4 * 64].view(t, 4 * 64)
    with pytest.raises(ValueError, match="out must not overlap k_cache"):
        prefill_attention(*case.args(k, v), case.query_start, 2, 4, 2, case.scale, out=in_cache)
    k_buffer, v_buffer = torch.zeros(2 * k.shape[0], *k.shape[1:]), torch.zeros(2 * v.shape[0], *v.shape[1:])
    strided_k, strided_v = k_buffer[::2], v_buffer[::2]  # blocks with gaps between them
    strided_k.copy_(k)
    strided_v.copy_(v)
    with pytest.raises(ValueError, match="out must not overlap v_cache"):
        prefill_attention(*case.args(strided_k, strided_v), case.query_start, 2, 4, 2, case.scale,
                          out=v_buffer[-2].view(-1)[:t * 4 * 64].view(t, 4 * 64))  # in the last block
    buf = torch.zeros(t, case.qkv.shape[1] + 4 * 64)
    qkv = buf[:, :case.qkv.shape[1]]
    qkv.copy_(case.qkv)
    with pytest.raises(ValueError, match="out must not overlap qkv"):
        prefill_attention(qkv, *case.args(k, v)[1:], case.query_start, 2, 4, 2, case.scale,
                          out=buf.view(-1)[:t * 4 * 64].view(t, 4 * 64))
    for cache, before in ((k, case.k_cache), (v, case.v_cache)):  # refused before any write (NaN: unwritten slots)
        torch.testing.assert_close(cache, before, rtol=0, atol=0, equal_nan=True)
    one = decode_case([3], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="out must not overlap k_cache"):
        decode_attention(*one.args(one.k_cache, one.v_cache), 4, 2, one.scale,
                         out=one.k_cache.view(-1)[:4 * 64].view(1, 4 * 64))
    for overrides, message in ((dict(chunk_size=100), "chunk_size must be a positive multiple of 64"),
                               (dict(chunk_size=0), "chunk_size"), (dict(max_splits=0), "max_splits must be >= 1")):
        with pytest.raises(ValueError, match=message):
            decode_attention(*one.args(one.k_cache, one.v_cache), 4, 2, one.scale, **overrides)


def strided(t: torch.Tensor, fill) -> torch.Tensor:
    """t's values as every other element of a buffer twice as long (the gaps `fill`): equal values, stride 2."""
    buf = torch.full((2 * t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    buf[::2] = t
    return buf[::2]


def prefill_call(case: Case, **changes):
    """prefill_attention on the case with some of its arguments replaced (by name)."""
    a = dict(qkv=case.qkv, k_cache=case.k_cache.clone(), v_cache=case.v_cache.clone(), cos=case.cos, sin=case.sin,
             positions=case.positions, slot_mapping=case.slot_mapping, block_tables=case.block_tables,
             seq_lens=case.seq_lens, query_start=case.query_start, max_query_len=case.max_query_len)
    a.update(changes)
    return prefill_attention(a.pop("qkv"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cos"), a.pop("sin"),
                             a.pop("positions"), a.pop("slot_mapping"), a.pop("block_tables"), a.pop("seq_lens"),
                             a.pop("query_start"), a.pop("max_query_len"), case.hq, case.hkv, case.scale, **a)


def decode_call(case: Case, **changes):
    a = dict(qkv=case.qkv, k_cache=case.k_cache.clone(), v_cache=case.v_cache.clone(), cos=case.cos, sin=case.sin,
             positions=case.positions, slot_mapping=case.slot_mapping, block_tables=case.block_tables,
             seq_lens=case.seq_lens)
    a.update(changes)
    return decode_attention(*a.values(), case.hq, case.hkv, case.scale)


# the index tensors the kernels read at base + i, and the value a strided copy's gaps hold (a padding slot: -1)
INDEX_FILL = {"positions": 0, "slot_mapping": -1, "seq_lens": 0, "query_start": 0}


@pytest.mark.parametrize("kind, name", [("prefill", n) for n in INDEX_FILL] +
                         [("decode", n) for n in INDEX_FILL if n != "query_start"])
def test_index_tensors_must_be_unit_stride_integers(kind, name):
    """A strided index tensor read as contiguous gave wrong rows, NaN or out-of-bounds accesses; a float one failed
    deep inside Triton. Both are ValueErrors naming the tensor (shapes, dtypes and strides only: no value is read)."""
    case = Case([5, 0], [3, 4], 4, 2, 32, torch.float32, seed=21) if kind == "prefill" else \
        decode_case([3, 0, 7], 4, 2, 32, torch.float32, seed=21)
    call = prefill_call if kind == "prefill" else decode_call
    t = getattr(case, name)
    with pytest.raises(ValueError, match=f"{name} must have unit stride along its last dimension"):
        call(case, **{name: strided(t, INDEX_FILL[name])})
    for dtype in (torch.float32, torch.int16, torch.bool):
        with pytest.raises(ValueError, match=f"{name} must be int32 or int64, got {dtype}"):
            call(case, **{name: t.to(dtype)})
    with pytest.raises(ValueError, match=rf"{name} must be \[{t.shape[0]}\], got \[1, {t.shape[0]}\]"):
        call(case, **{name: t[None]})


def test_block_tables_must_be_unit_stride_integers():
    case = Case([5, 0], [3, 4], 4, 2, 32, torch.float32, seed=22)
    bt = case.block_tables
    with pytest.raises(ValueError, match="block_tables must be int32 or int64, got torch.float32"):
        prefill_call(case, block_tables=bt.float())
    with pytest.raises(ValueError, match="block_tables must have unit stride along its last dimension"):
        prefill_call(case, block_tables=bt.t().contiguous().t())  # column-major: entries of a row 2 apart
    with pytest.raises(ValueError, match=r"block_tables must be \[B, max_blocks\]"):
        decode_call(decode_case([3, 5], 4, 2, 32, torch.float32), block_tables=bt[0])


def test_other_integer_index_dtypes_and_strided_rows_are_accepted():
    """int32 where the engine passes int64 and the reverse, and block tables with a row pitch past their width: the
    same output and cache as the reference."""
    case = Case([5, 0, 20], [3, 4, 2], 4, 2, 32, torch.float32, seed=23)
    wide = torch.zeros(case.block_tables.shape[0], 2 * case.block_tables.shape[1], dtype=torch.int64,
                       device=DEVICE)
    wide[:, :case.block_tables.shape[1]] = case.block_tables
    k, v = case.k_cache.clone(), case.v_cache.clone()
    out = poisoned(case.qkv.shape[0], case.hq * case.d, dtype=case.dtype)
    prefill_attention(case.qkv, k, v, case.cos, case.sin, case.positions.int(), case.slot_mapping.int(),
                      wide[:, :case.block_tables.shape[1]], case.seq_lens.long(), case.query_start.long(),
                      case.max_query_len, case.hq, case.hkv, case.scale, out=out)
    check(case, out, k, v)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_v_cache_must_match_k_cache(kind):
    case = Case([5, 0], [3, 4], 4, 2, 32, torch.float16, seed=24) if kind == "prefill" else \
        decode_case([3, 0, 7], 4, 2, 32, torch.float16, seed=24)
    call = prefill_call if kind == "prefill" else decode_call
    for dtype in (torch.bfloat16, torch.float32, torch.int16):
        with pytest.raises(ValueError, match=f"v_cache must match k_cache \\(torch.float16 on .*\\), got {dtype}"):
            call(case, v_cache=case.v_cache.to(dtype))
    with pytest.raises(ValueError, match="k_cache and v_cache must both be"):
        call(case, v_cache=case.v_cache[:-1].clone())


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_rope_tables_must_be_contiguous_2d(kind):
    """A 1-D [D/2] table was read at position * D/2, past its end; a strided one at the wrong rows."""
    case = Case([5, 0], [3, 4], 4, 2, 32, torch.float32, seed=25) if kind == "prefill" else \
        decode_case([3, 0, 7], 4, 2, 32, torch.float32, seed=25)
    call = prefill_call if kind == "prefill" else decode_call
    for name in ("cos", "sin"):
        table = getattr(case, name)
        for bad in (table[0].contiguous(), strided(table, 0.0), table[:, None, :].contiguous(),
                    torch.cat([table, table], 1)[:, :table.shape[1]]):
            with pytest.raises(ValueError, match=rf"{name} must be a contiguous float32 \[max_positions, 16\] table"):
                call(case, **{name: bad})
        with pytest.raises(ValueError, match=rf"{name} must be a contiguous float32 \[max_positions, 16\] table"):
            call(case, **{name: torch.cat([table, table], 1).contiguous()})  # [P, D]
    with pytest.raises(ValueError, match="cos .* and sin .* must have the same shape"):
        call(case, sin=case.sin[:-1].contiguous())


def test_prefill_max_query_len_must_cover_a_token():
    # a grid of 0 query blocks would leave `out` unwritten
    case = Case([5, 0], [3, 4], 4, 2, 32, torch.float32, seed=26)
    with pytest.raises(ValueError, match="max_query_len must be >= 1 for 7 new tokens, got 0"):
        prefill_call(case, max_query_len=0)


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
    # the launcher's chunking; one split per sequence; at most 3 splits of several chunks each
    for overrides in (dict(), dict(max_splits=1), dict(max_splits=3)):
        check_bf16(case, *run_decode(case, **overrides))


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", GPU_LAYOUTS)
def test_prefill_qwen2_shapes_bf16_gpu(hq, hkv, d):
    """The launcher's tiles and every candidate bench_attention times (any of them may become the default)."""
    case = bf16_prefill_case(hq, hkv, d, "cuda")
    for config in [None] + PREFILL_CANDIDATES:
        check_bf16(case, *run_prefill(case, config))


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", GPU_LAYOUTS)
def test_decode_batch_invariant_bf16_gpu(hq, hkv, d):
    # the default 256-token chunk; the target (4000 tokens: 16 splits) beside rows of 1 to 20 chunks and padding
    g = torch.Generator().manual_seed(12)
    lengths = [int(n) for n in torch.randint(1, 5000, (32,), generator=g)]
    lengths[3] = lengths[17] = 0
    target = 9
    lengths[target] = 4000
    case = decode_case(lengths, hq, hkv, d, torch.bfloat16, seed=12, device="cuda")
    assert_batch_invariant(case, target)
