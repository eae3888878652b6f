"""Fused RoPE-attention over a paged KV cache: prefill (variable-length sequences, causal, on top of any cached
prefix) and decode (one new token per sequence, split-KV "flash-decoding").

Inputs shared by both:
    qkv          [T, (Hq + 2 Hkv) D]  the packed q/k/v projection output (before RoPE)
    k_cache, v_cache  [num_blocks, block_size, Hkv, D]  of qkv's dtype, one shape and strides
    cos, sin     [max_positions, D/2] float32, contiguous (qwen2rt.models.rope.RotaryTables)
    positions    [T] int64   rotary position of each new token
    slot_mapping [T] int64   cache slot (block * block_size + row) for each new token's k/v; -1 writes nothing
    block_tables [B, max_blocks] int32;  seq_lens [B] int32, the context after this step (0 = padding row)
The index tensors (positions, slot_mapping, block_tables, seq_lens, prefill's query_start) may be int32 or int64
and must have unit stride along their last dimension: the kernels index them without a stride. The launchers check
shapes, dtypes, strides and devices only, never values (they run inside CUDA graphs).
RoPE is the "rotate half" form: for x = [x1 | x2], x' = [x1 cos - x2 sin | x2 cos + x1 sin]. q is rotated inside
the attention kernels and never written back; k is rotated on its way into the cache.

Prefill is two launches: (1) rotate k and write k, v of the new tokens into the cache (the pass the cache write
needs anyway), (2) causal flash attention, q rotated as it is loaded, K/V read from the cache so that a cached
prefix (chunked prefill, a reused prompt) and the new tokens are one loop. Decode is one attention launch plus a
small reduction: program (b, kv head, split) holds all query heads of its KV head (K and V read once) and covers
one fixed-size chunk of the context (KV_CHUNK); the split that owns the newest position attends to the new token
from registers and appends its k, v to the cache. The grid is sized for the longest context the block tables hold,
each sequence uses only the splits its own length needs (read on the device; the others exit at once), and the
reduction reads only those: capturable in a CUDA graph, work proportional to the real context, and a sequence's
output bitwise independent of the rest of the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ---- reference --------------------------------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D/2] float32 -> rotated x in x's dtype (computed in fp32)."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def _causal_attention(q, k, v, scale, q_pos):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D]; key j visible to query i when j <= q_pos[i]. fp32 -> q's dtype."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    qf = q.float().reshape(tq, hkv, hq // hkv, d)
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hgqk,khd->qhgd", probs, v.float()).reshape(tq, hq, d).to(q.dtype)


def paged_attention_ref(qkv, k_cache, v_cache, cos, sin, positions, slot_mapping, block_tables, seq_lens,
                        query_start, num_heads: int, num_kv_heads: int, scale: float,
                        max_score_elements: int = 1 << 26) -> torch.Tensor:
    """Reference for both kernels (decode is query_start = arange(B + 1)). Writes the rotated k and v of the new
    tokens to the cache, then for each sequence attends its query rows causally over its first seq_lens[b] cached
    rows. Rows of padding sequences (seq_lens 0) are 0. Queries go in chunks so the fp32 score matrix stays below
    max_score_elements. -> [T, Hq D]"""
    hq, hkv = num_heads, num_kv_heads
    d = k_cache.shape[-1]
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    c, s = cos[positions], sin[positions]
    q = apply_rotary(q.reshape(t, hq, d), c, s)
    k = apply_rotary(k.reshape(t, hkv, d), c, s)
    v = v.reshape(t, hkv, d)
    valid = slot_mapping >= 0
    k_cache.view(-1, hkv, d)[slot_mapping[valid]] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, hkv, d)[slot_mapping[valid]] = v[valid].to(v_cache.dtype)
    out = torch.zeros_like(q)
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for b, ctx in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        if ctx == 0 or q1 == q0:
            continue
        kb, vb = _gather(k_cache, block_tables[b], ctx), _gather(v_cache, block_tables[b], ctx)
        chunk = max(1, max_score_elements // (hq * ctx))
        for c0 in range(q0, q1, chunk):
            c1 = min(q1, c0 + chunk)
            q_pos = torch.arange(ctx - (q1 - c0), ctx - (q1 - c1), device=q.device)
            out[c0:c1] = _causal_attention(q[c0:c1], kb, vb, scale, q_pos)
    return out.reshape(t, hq * d)


# ---- kernels ----------------------------------------------------------------------------------------------------

@triton.jit
def _rope_cache_write_kernel(
    # pointers
    p_qkv, p_cos, p_sin, p_pos, p_slot, p_k_cache, p_v_cache,
    # sizes
    block_size,
    # strides
    s_qkv, s_cache_blk, s_cache_row, s_cache_head,
    # meta-parameters
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    slot = tl.load(p_slot + i_t)
    if slot < 0:
        return
    pos = tl.load(p_pos + i_t)
    o_half = tl.arange(0, HALF)
    p_k = p_qkv + i_t * s_qkv + (NUM_HEADS + i_h) * HEAD_DIM
    b_k1 = tl.load(p_k + o_half).to(tl.float32)
    b_k2 = tl.load(p_k + HALF + o_half).to(tl.float32)
    b_cos = tl.load(p_cos + pos * HALF + o_half)
    b_sin = tl.load(p_sin + pos * HALF + o_half)
    dst = (slot // block_size) * s_cache_blk + (slot % block_size) * s_cache_row + i_h * s_cache_head
    dt = p_k_cache.dtype.element_ty
    tl.store(p_k_cache + dst + o_half, (b_k1 * b_cos - b_k2 * b_sin).to(dt))
    tl.store(p_k_cache + dst + HALF + o_half, (b_k2 * b_cos + b_k1 * b_sin).to(dt))
    o_d = tl.arange(0, HEAD_DIM)
    b_v = tl.load(p_qkv + i_t * s_qkv + (NUM_HEADS + NUM_KV_HEADS + i_h) * HEAD_DIM + o_d)
    tl.store(p_v_cache + dst + o_d, b_v.to(p_v_cache.dtype.element_ty))


@triton.jit
def _attend_tile(
    b_qr1, b_qr2, b_m, b_l, b_acc, visible,
    # the tile: cached rows o_n (valid where m_n) of sequence i_b, KV head i_kvh
    o_n, m_n, i_b, i_kvh, p_block_tables, p_k_cache, p_v_cache,
    block_size, s_bt, s_cache_blk, s_cache_row, s_cache_head,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True,
):
    """One BLOCK_N tile of cached keys for a block of rotated, pre-scaled queries (rows of b_qr1 | b_qr2): scores,
    masking by `visible` [rows, BN] (MASKED; else every row sees every key of the tile),
    online-softmax update in base 2. -> (b_m, b_l, b_acc)"""
    HALF: tl.constexpr = HEAD_DIM // 2
    o_half = tl.arange(0, HALF)
    o_d = tl.arange(0, HEAD_DIM)
    blk = tl.load(p_block_tables + i_b * s_bt + o_n // block_size, mask=m_n, other=0).to(tl.int64)
    kv_off = blk * s_cache_blk + (o_n % block_size) * s_cache_row + i_kvh * s_cache_head
    b_k1 = tl.load(p_k_cache + kv_off[:, None] + o_half[None, :], mask=m_n[:, None], other=0.0)
    b_k2 = tl.load(p_k_cache + kv_off[:, None] + HALF + o_half[None, :], mask=m_n[:, None], other=0.0)
    # [rows, HALF] @ [HALF, BN] x 2 -> [rows, BN]
    b_s = tl.dot(b_qr1, tl.trans(b_k1), input_precision=DOT_PRECISION)
    b_s += tl.dot(b_qr2, tl.trans(b_k2), input_precision=DOT_PRECISION)
    if MASKED:
        b_s = tl.where(visible, b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(b_m - m_safe)
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_v = tl.load(p_v_cache + kv_off[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0)
    # [rows, BN] @ [BN, D] -> [rows, D]
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return m_new, b_l, b_acc


@triton.jit
def _prefill_attention_kernel(
    # pointers
    p_qkv, p_cos, p_sin, p_pos, p_k_cache, p_v_cache, p_block_tables, p_seq_lens, p_query_start, p_out,
    # sizes
    block_size, qk_scale,
    # strides
    s_qkv, s_cache_blk, s_cache_row, s_cache_head, s_bt, s_out,
    # meta-parameters
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    GROUP: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    i_m = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(p_query_start + i_b)
    q_len = tl.load(p_query_start + i_b + 1) - q_start
    if i_m * BLOCK_M >= q_len:
        return
    ctx = tl.load(p_seq_lens + i_b)
    prefix = ctx - q_len
    i_kvh = i_h // GROUP

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < q_len
    rows = (q_start + o_m).to(tl.int64)
    o_half = tl.arange(0, HALF)
    o_d = tl.arange(0, HEAD_DIM)
    # q rotated as it is loaded, softmax scale and log2(e) folded in: [BM, HALF] x 2
    pos = tl.load(p_pos + rows, mask=m_m, other=0)
    p_q = p_qkv + rows[:, None] * s_qkv + i_h * HEAD_DIM + o_half[None, :]
    b_q1 = tl.load(p_q, mask=m_m[:, None], other=0.0).to(tl.float32)
    b_q2 = tl.load(p_q + HALF, mask=m_m[:, None], other=0.0).to(tl.float32)
    b_cos = tl.load(p_cos + pos[:, None] * HALF + o_half[None, :], mask=m_m[:, None], other=0.0)
    b_sin = tl.load(p_sin + pos[:, None] * HALF + o_half[None, :], mask=m_m[:, None], other=0.0)
    dt = p_k_cache.dtype.element_ty
    b_qr1 = ((b_q1 * b_cos - b_q2 * b_sin) * qk_scale).to(dt)
    b_qr2 = ((b_q2 * b_cos + b_q1 * b_sin) * qk_scale).to(dt)

    q_cache_pos = prefix + o_m  # query i sees cached rows 0 ..= prefix + i
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(ctx, prefix + (i_m + 1) * BLOCK_M)
    # whole tiles every query row sees (below the block's first row's diagonal) without a mask, then the rest
    unmasked_end = (prefix + i_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end  # all true: the loads keep the one form of _attend_tile
        b_m, b_l, b_acc = _attend_tile(b_qr1, b_qr2, b_m, b_l, b_acc, None, o_n, m_n, i_b, i_kvh, p_block_tables,
                                       p_k_cache, p_v_cache, block_size, s_bt, s_cache_blk, s_cache_row,
                                       s_cache_head, HEAD_DIM, DOT_PRECISION, False)
    for n0 in range(unmasked_end, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        visible = (o_n[None, :] <= q_cache_pos[:, None]) & m_n[None, :]
        b_m, b_l, b_acc = _attend_tile(b_qr1, b_qr2, b_m, b_l, b_acc, visible, o_n, m_n, i_b, i_kvh, p_block_tables,
                                       p_k_cache, p_v_cache, block_size, s_bt, s_cache_blk, s_cache_row,
                                       s_cache_head, HEAD_DIM, DOT_PRECISION)
    b_out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    tl.store(p_out + rows[:, None] * s_out + i_h * HEAD_DIM + o_d[None, :], b_out.to(p_out.dtype.element_ty),
             mask=m_m[:, None])


@triton.jit
def _split_span(ctx, num_splits, CHUNK: tl.constexpr):
    """Tokens per split of a sequence of ctx positions: one CHUNK while ceil(ctx / CHUNK) chunks fit in num_splits
    splits, else the fewest whole chunks per split that do. A function of the sequence's own length only (and of
    num_splits, fixed by the block-table width): the decode kernel and the reduction agree on it."""
    return ((ctx + CHUNK - 1) // CHUNK + num_splits - 1) // num_splits * CHUNK


@triton.jit
def _decode_attention_kernel(
    # pointers
    p_qkv, p_cos, p_sin, p_pos, p_slot, p_k_cache, p_v_cache, p_block_tables, p_seq_lens, p_part, p_lse,
    # sizes
    block_size, qk_scale, num_splits,
    # strides
    s_qkv, s_cache_blk, s_cache_row, s_cache_head, s_bt,
    # meta-parameters
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    GROUP: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    i_b = tl.program_id(0).to(tl.int64)
    i_kvh = tl.program_id(1)
    i_s = tl.program_id(2)
    ctx = tl.load(p_seq_lens + i_b)
    # this split's slice of the context; a split past the sequence (or any split of a padding row, ctx 0) exits
    # before loading anything and writes nothing: the reduction reads only the live splits. A split is at least
    # one chunk: most dead splits exit on the first test, without the divisions.
    if i_s * CHUNK >= ctx:
        return
    span = _split_span(ctx, num_splits, CHUNK)
    start = i_s * span
    if start >= ctx:
        return
    end = tl.minimum(start + span, ctx)
    pos = tl.load(p_pos + i_b)
    o_g = tl.arange(0, BLOCK_G)
    m_g = o_g < GROUP
    heads = i_kvh * GROUP + o_g
    o_half = tl.arange(0, HALF)
    o_d = tl.arange(0, HEAD_DIM)
    dt = p_k_cache.dtype.element_ty

    # all query heads of this KV head, rotated, scaled: [BLOCK_G, HALF] x 2 (each K/V tile is loaded once for all)
    p_q = p_qkv + i_b * s_qkv + heads[:, None] * HEAD_DIM + o_half[None, :]
    b_q1 = tl.load(p_q, mask=m_g[:, None], other=0.0).to(tl.float32)
    b_q2 = tl.load(p_q + HALF, mask=m_g[:, None], other=0.0).to(tl.float32)
    b_cos = tl.load(p_cos + pos * HALF + o_half)
    b_sin = tl.load(p_sin + pos * HALF + o_half)
    b_qr1 = ((b_q1 * b_cos[None, :] - b_q2 * b_sin[None, :]) * qk_scale).to(dt)
    b_qr2 = ((b_q2 * b_cos[None, :] + b_q1 * b_sin[None, :]) * qk_scale).to(dt)

    cached_end = tl.minimum(end, ctx - 1)  # the newest position is not in the cache yet
    b_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, cached_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < cached_end
        b_m, b_l, b_acc = _attend_tile(b_qr1, b_qr2, b_m, b_l, b_acc, m_n[None, :], o_n, m_n, i_b, i_kvh,
                                       p_block_tables, p_k_cache, p_v_cache, block_size, s_bt, s_cache_blk,
                                       s_cache_row, s_cache_head, HEAD_DIM, DOT_PRECISION)

    if end == ctx:
        # the last live split owns the new token (and is the only one that writes the cache): rotate its k, append
        # k and v to the cache, attend to it from registers (values rounded to the cache dtype first, so it scores
        # exactly as a cached key would)
        p_k = p_qkv + i_b * s_qkv + (NUM_HEADS + i_kvh) * HEAD_DIM
        b_k1 = tl.load(p_k + o_half).to(tl.float32)
        b_k2 = tl.load(p_k + HALF + o_half).to(tl.float32)
        b_kr1 = (b_k1 * b_cos - b_k2 * b_sin).to(dt)
        b_kr2 = (b_k2 * b_cos + b_k1 * b_sin).to(dt)
        b_v = tl.load(p_qkv + i_b * s_qkv + (NUM_HEADS + NUM_KV_HEADS + i_kvh) * HEAD_DIM + o_d).to(dt)
        slot = tl.load(p_slot + i_b)
        if slot >= 0:
            dst = (slot // block_size) * s_cache_blk + (slot % block_size) * s_cache_row + i_kvh * s_cache_head
            tl.store(p_k_cache + dst + o_half, b_kr1)
            tl.store(p_k_cache + dst + HALF + o_half, b_kr2)
            tl.store(p_v_cache + dst + o_d, b_v.to(p_v_cache.dtype.element_ty))
        b_s_new = tl.sum(b_qr1.to(tl.float32) * b_kr1.to(tl.float32)[None, :], axis=1)
        b_s_new += tl.sum(b_qr2.to(tl.float32) * b_kr2.to(tl.float32)[None, :], axis=1)
        m_new = tl.maximum(b_m, b_s_new)
        b_p_new = tl.exp2(b_s_new - m_new)
        alpha = tl.exp2(b_m - m_new)
        b_l = b_l * alpha + b_p_new
        b_acc = b_acc * alpha[:, None] + b_p_new[:, None] * b_v.to(tl.float32)[None, :]
        b_m = m_new

    # partial result of this split: normalised output and log2-sum-exp (a live split holds >= 1 key: l > 0)
    row = (i_b * NUM_HEADS + heads) * num_splits + i_s  # [BLOCK_G]
    b_out = b_acc / b_l[:, None]
    tl.store(p_part + row[:, None] * HEAD_DIM + o_d[None, :], b_out, mask=m_g[:, None])
    tl.store(p_lse + row, b_m + tl.log2(b_l), mask=m_g)


@triton.jit
def _decode_reduce_kernel(
    # pointers
    p_part, p_lse, p_seq_lens, p_out,
    # sizes
    num_splits,
    # strides
    s_out,
    # meta-parameters
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_d = tl.arange(0, HEAD_DIM)
    p_o = p_out + i_b * s_out + i_h * HEAD_DIM + o_d
    ctx = tl.load(p_seq_lens + i_b)
    if ctx == 0:
        tl.store(p_o, tl.zeros([HEAD_DIM], tl.float32).to(p_out.dtype.element_ty))
        return
    # the live splits only, BLOCK_S at a time, always in the same order: a row's sum does not depend on the grid
    span = _split_span(ctx, num_splits, CHUNK)
    live = (ctx + span - 1) // span
    row0 = (i_b * NUM_HEADS + i_h) * num_splits
    o_s = tl.arange(0, BLOCK_S)
    b_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, live, BLOCK_S):
        b_max = tl.maximum(b_max, tl.load(p_lse + row0 + s0 + o_s, mask=s0 + o_s < live, other=float("-inf")))
    lse_max = tl.max(b_max, axis=0)  # finite: every live split holds a key
    b_w_sum = tl.zeros([BLOCK_S], tl.float32)
    b_acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, live, BLOCK_S):
        m_s = s0 + o_s < live
        b_w = tl.exp2(tl.load(p_lse + row0 + s0 + o_s, mask=m_s, other=float("-inf")) - lse_max)  # [BLOCK_S]
        b_part = tl.load(p_part + (row0 + s0 + o_s)[:, None] * HEAD_DIM + o_d[None, :], mask=m_s[:, None],
                         other=0.0)  # [BLOCK_S, D]
        b_acc += tl.sum(b_w[:, None] * b_part, axis=0)
        b_w_sum += b_w
    tl.store(p_o, (b_acc / tl.sum(b_w_sum, axis=0)).to(p_out.dtype.element_ty))


# ---- launchers --------------------------------------------------------------------------------------------------

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_index(name: str, t: torch.Tensor, shape: tuple) -> None:
    """An index tensor the kernels read at base + i (no stride): `shape`, int32 or int64, unit stride along its last
    dimension. Shapes, dtypes and strides only (no value is read: the launchers run inside CUDA graphs)."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {list(t.stride())}")


def _check_inputs(qkv, k_cache, v_cache, cos, sin, positions, slot_mapping, block_tables, seq_lens, num_heads,
                  num_kv_heads):
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(f"v_cache must match k_cache ({k_cache.dtype} on {k_cache.device}), got {v_cache.dtype} on "
                         f"{v_cache.device}")
    _, _, hkv, d = k_cache.shape
    if hkv != num_kv_heads or num_heads % num_kv_heads:
        raise ValueError(f"cache has {hkv} KV heads; expected num_kv_heads={num_kv_heads} dividing "
                         f"num_heads={num_heads}")
    if d < 32 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 32, got {d}")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides, with a contiguous last dimension")
    if qkv.ndim != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {(num_heads + 2 * num_kv_heads) * d}] with contiguous rows, got "
                         f"{list(qkv.shape)}")
    if qkv.dtype != k_cache.dtype or qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"qkv ({qkv.dtype}) and the cache ({k_cache.dtype}) must share a float dtype")
    # the kernels read cos[p, i] at p * D/2 + i: a whole contiguous [max_positions, D/2] table
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32 or table.ndim != 2 or table.shape[1] != d // 2 or \
                not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [max_positions, {d // 2}] table, got "
                             f"{table.dtype} {list(table.shape)} with strides {list(table.stride())}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {list(cos.shape)} and sin {list(sin.shape)} must have the same shape")
    t = qkv.shape[0]
    _check_index("positions", positions, (t,))
    _check_index("slot_mapping", slot_mapping, (t,))
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [B, max_blocks], got {list(block_tables.shape)}")
    _check_index("block_tables", block_tables, tuple(block_tables.shape))
    _check_index("seq_lens", seq_lens, (block_tables.shape[0],))
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos), ("sin", sin),
                         ("positions", positions), ("slot_mapping", slot_mapping), ("block_tables", block_tables),
                         ("seq_lens", seq_lens)):
        if tensor.device != qkv.device:
            raise ValueError(f"{name} is on {tensor.device}, qkv on {qkv.device}")


def _output(out, rows: int, width: int, like: torch.Tensor, reads: dict) -> torch.Tensor:
    """A fresh [rows, width] buffer, or the caller's `out`, which must not overlap what the kernels read (`reads`:
    qkv, the caches, the rotary tables): programs write their rows while others still read theirs."""
    if out is None:
        return torch.empty((rows, width), device=like.device, dtype=like.dtype)
    if out.shape != (rows, width) or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor [{rows}, {width}] on {like.device}")
    from .gemv import check_out

    check_out(out, reads)
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is the default and only applies to fp32 inputs


def prefill_config(head_dim: int) -> dict:
    """The prefill kernel's tile and launch for a head size: BLOCK_M queries x BLOCK_N keys per step (the Hopper MMA
    takes 64 rows per warpgroup). Not yet tuned on a GPU: bench_attention times PREFILL_CANDIDATES beside it."""
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# timed by bench_attention (and compiled by tests/aot_sm90.py) beside prefill_config, to choose from on a GPU
PREFILL_CANDIDATES = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                      dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                      dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)]


def prefill_attention(qkv, k_cache, v_cache, cos, sin, positions, slot_mapping, block_tables, seq_lens,
                      query_start, max_query_len: int, num_heads: int, num_kv_heads: int,
                      scale: float, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Causal attention of B variable-length sequences whose new tokens are rows query_start[b]:query_start[b+1]
    of qkv, on top of whatever each sequence already has cached (seq_lens[b] - its new-token count rows). Writes
    the new tokens' rotated k and v to the cache. max_query_len: host int, the longest new-token count (sizes the
    grid). config: BLOCK_M, BLOCK_N, num_warps, num_stages (default prefill_config). -> [T, Hq D] in qkv's dtype
    (into `out` if given)."""
    _check_inputs(qkv, k_cache, v_cache, cos, sin, positions, slot_mapping, block_tables, seq_lens, num_heads,
                  num_kv_heads)
    _check_index("query_start", query_start, (seq_lens.shape[0] + 1,))
    if query_start.device != qkv.device:
        raise ValueError(f"query_start is on {query_start.device}, qkv on {qkv.device}")
    t = qkv.shape[0]
    if t and max_query_len < 1:  # a host int: the grid would be empty and `out` left unwritten
        raise ValueError(f"max_query_len must be >= 1 for {t} new tokens, got {max_query_len}")
    _, block_size, _, d = k_cache.shape
    out = _output(out, t, num_heads * d, qkv, dict(qkv=qkv, k_cache=k_cache, v_cache=v_cache, cos=cos, sin=sin))
    if t == 0:
        return out
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    _rope_cache_write_kernel[(t, num_kv_heads)](
        qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, block_size, qkv.stride(0), *strides,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=d, num_warps=1)
    cfg = config or prefill_config(d)
    if set(cfg) != {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}:
        raise ValueError(f"config must give BLOCK_M, BLOCK_N, num_warps and num_stages, got {sorted(cfg)}")
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), num_heads, seq_lens.shape[0])
    _prefill_attention_kernel[grid](
        qkv, cos, sin, positions, k_cache, v_cache, block_tables, seq_lens, query_start, out,
        block_size, scale * LOG2E, qkv.stride(0), *strides, block_tables.stride(0), out.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=d, DOT_PRECISION=_dot_precision(qkv.dtype), **cfg)
    return out


# Decode splits the context into KV_CHUNK-token chunks, one program per (sequence, KV head, chunk), the count chosen
# on the device from each sequence's own length. 256 tokens (4 BLOCK_N tiles): a split's fixed cost is its fp32
# partial for G query heads, written and read back by the reduction (8 G D bytes), against 4 * 256 D bytes of bf16 K
# and V: G / 128, ~5% at Qwen2-7B's G = 7; 4 tiles also give the loads something to pipeline. 128 would double that
# overhead; 512 would halve the programs a short context gets (1K tokens at batch 1 on Qwen2-7B: 4 chunks x 4 KV
# heads = 16 programs on 132 SMs).
KV_CHUNK = 256
# At most MAX_SPLITS splits per sequence: past MAX_SPLITS * KV_CHUNK = 32K tokens a split takes several whole chunks
# (64K: 2, 128K: 4), so the grid and the fp32 partials stay bounded whatever max_seq_len is, and contexts up to 32K
# keep the fine chunks. The partials are [B, Hq, splits, D] fp32: at batch 32 on Qwen2-7B (Hq 28, D 128) with
# max_seq_len 131072, 32 x 28 x 128 x 128 x 4 B = 56 MiB (+ 0.4 MiB of lse), 1.75 MiB per row. 256 splits would
# double that, for a 128K context at batch 1 that already has 128 x 4 = 512 programs (about two waves of the 264 that
# fit on 132 SMs at the kernel's ~220 registers). Neither number depends on the batch: a sequence's splits, their
# order in the reduction, the tiles and the warps are the same in any batch, so its output is bitwise the same alone
# or beside any other rows (batch invariance).
MAX_SPLITS = 128
DECODE_BLOCK_N = 64
REDUCE_BLOCK_S = 32


def decode_splits(max_context: int, chunk: int = KV_CHUNK, max_splits: int = MAX_SPLITS) -> int:
    """The decode grid's splits per (sequence, KV head) for block tables covering max_context positions: enough
    chunks for the longest context, at most max_splits. Shapes only: capturable in a CUDA graph."""
    return max(1, min(max_splits, triton.cdiv(max_context, chunk)))


def _reduce_warps(block_s: int, head_dim: int) -> int:
    """About 32 elements of the fp32 [BLOCK_S, D] tile per thread, 1 to 8 warps: one warp holding all 64 x 128 of
    them (256 per thread) spills on sm_90."""
    return min(8, triton.next_power_of_2(max(1, block_s * head_dim // 1024)))


def decode_attention(qkv, k_cache, v_cache, cos, sin, positions, slot_mapping, block_tables, seq_lens,
                     num_heads: int, num_kv_heads: int, scale: float, chunk_size: int | None = None,
                     max_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence (row b of qkv): rotate q and k, append k and v at slot_mapping[b], attend over
    the seq_lens[b] positions of the sequence. Rows with seq_lens 0 are padding: they write nothing and return 0.
    Split-KV: sequence b uses ceil(seq_lens[b] / chunk_size) splits of chunk_size tokens, or, when that is more than
    max_splits, at most max_splits splits of several whole chunks (defaults KV_CHUNK and MAX_SPLITS; the overrides
    are for tests). The grid is sized for the block tables' capacity and fixed by the shapes, nothing waits on the
    host: capturable in a CUDA graph. A sequence's output does not depend on the other rows or the batch size.
    -> [B, Hq D]"""
    _check_inputs(qkv, k_cache, v_cache, cos, sin, positions, slot_mapping, block_tables, seq_lens, num_heads,
                  num_kv_heads)
    bsz = qkv.shape[0]
    if seq_lens.shape[0] != bsz:
        raise ValueError(f"decode takes one token per sequence: qkv has {bsz} rows, seq_lens {seq_lens.shape[0]}")
    chunk = KV_CHUNK if chunk_size is None else chunk_size
    if chunk < DECODE_BLOCK_N or chunk % DECODE_BLOCK_N:
        raise ValueError(f"chunk_size must be a positive multiple of {DECODE_BLOCK_N}, got {chunk}")
    if max_splits is not None and max_splits < 1:
        raise ValueError(f"max_splits must be >= 1, got {max_splits}")
    _, block_size, _, d = k_cache.shape
    out = _output(out, bsz, num_heads * d, qkv, dict(qkv=qkv, k_cache=k_cache, v_cache=v_cache, cos=cos, sin=sin))
    if bsz == 0:
        return out
    splits = decode_splits(block_tables.shape[1] * block_size, chunk, MAX_SPLITS if max_splits is None else max_splits)
    part = torch.empty((bsz, num_heads, splits, d), device=qkv.device, dtype=torch.float32)
    lse = torch.empty((bsz, num_heads, splits), device=qkv.device, dtype=torch.float32)
    block_g = max(16, triton.next_power_of_2(num_heads // num_kv_heads))
    _decode_attention_kernel[(bsz, num_kv_heads, splits)](
        qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, block_tables, seq_lens, part, lse,
        block_size, scale * LOG2E, splits, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=d, CHUNK=chunk, BLOCK_G=block_g,
        BLOCK_N=DECODE_BLOCK_N, DOT_PRECISION=_dot_precision(qkv.dtype), num_warps=4)
    _decode_reduce_kernel[(bsz, num_heads)](
        part, lse, seq_lens, out, splits, out.stride(0),
        NUM_HEADS=num_heads, HEAD_DIM=d, CHUNK=chunk, BLOCK_S=REDUCE_BLOCK_S,
        num_warps=_reduce_warps(REDUCE_BLOCK_S, d))
    return out
