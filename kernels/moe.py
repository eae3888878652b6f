"""Mixture-of-experts block of Qwen2-MoE: routing, grouping and the two grouped expert GEMMs.

    logits  = x @ [router; g]^T                              [T, E (+1)]   (one GEMM; g: the shared expert's gate)
    route   : softmax (fp32) over the E experts -> top-k ids and weights (+ renormalisation)
    gemm 1  : h[p]   = silu(x[t] @ Wg[e]^T) * (x[t] @ Wu[e]^T)  for every (token t, expert e) pair p   [T k, I]
    gemm 2  : out[t] = sum_j w[t, j] * (h[t k + j] @ Wd[e_j]^T)                                         [T, H]
    shared  : out   += sigmoid(x @ g^T) * down_s(silu_and_mul(x @ gate_up_s^T))

Two regimes, one launcher:
- decode (T <= DECODE_MAX_TOKENS, every decode bucket): each expert sees a row or two, so gemm 1 is a batched GEMV
  with one program per (pair, N tile) and gemm 2 one program per (token, N tile) that loops over the token's k
  experts and sums them in registers (deterministic, no atomics), or, with the config's SPLIT_PAIRS = s > 1, one
  program per (token, chunk of its pairs, N tile) writing fp32 partial rows that are summed in a fixed order after
  (s times the programs, for batch 1, where H / BLOCK_N programs each streaming every selected expert in turn may
  not keep enough bytes in flight). No grouping pass and no routing launch: each program routes its token from the
  logits itself (a softmax and a rank over E numbers, next to streaming a [BLOCK_N, H] slice of an expert). With
  the norm in the router GEMV's and gate_up GEMV's prologues and the residual in the down GEMV's epilogue, the
  block is 3 launches. Padding rows (a CUDA graph's bucket filled up, marked by a negative KV slot: token_slots)
  read no expert: their programs' weight loops run no iteration. Bandwidth-bound; at 32 tokens most experts are
  selected by more than one token and read once per pair (from L2 when their programs run together; unmeasured:
  bench_moe times the grouped GEMMs beside).
- prefill: pairs are grouped by expert into BLOCK_M-row blocks (`moe_align`, torch ops on the device with static
  shapes); gemm 1 gathers token rows inside its loads and applies SwiGLU in the epilogue; gemm 2 scales by the
  routing weight and writes per-pair rows that are summed per token. The grid is a static upper bound on the
  block count; surplus programs exit early, so nothing depends on a host-side count. Padding tokens' pairs are
  grouped past the blocks in use: no block computes them.
Nothing reads a device value on the host: the whole block can be captured in a CUDA graph.

The shared expert (width Is, scaled by sigmoid(x @ g^T)) runs in one of two ways, chosen per token bucket by the
config (`FOLD_SHARED`):
- separate: a dense SwiGLU MLP after the routed experts, then its gate: at decode two fused GEMVs (SwiGLU in the
  first's epilogue; the router is a GEMV there too, so the block stays batch invariant), at prefill cuBLAS matmuls +
  the SwiGLU kernel;
- folded: when Is is a multiple of I (Qwen1.5-MoE-A2.7B: 5632 = 4 x 1408; Qwen2-57B-A14B: 20480 = 8 x 2560), the
  shared expert is S = Is / I extra experts E .. E+S-1 that every token selects, all with the weight
  sigmoid(x @ g^T). Chunk c is rows [c I, (c+1) I) of the shared gate and up projections and columns [c I, (c+1) I)
  of the shared down projection, read in place from the checkpoint layout ([2Is, H], [H, Is]): no second copy of
  the weights. The routing (in the GEMVs, or the routing kernel) adds the S extra (id, weight) pairs, and the same two
  GEMM launches do the rest, summing all k + S contributions of a token in fp32.
Which is faster depends on the GPU and the regime, so warm-up tuning times both (after choosing block sizes) and
caches the winner (kernels/moe_config.py: the buckets, default configs, tuning and its disk cache). Before any
measurement the defaults are: folded at decode (the layer is launch-bound there, and folding removes 7 of its ~10
launches), separate at prefill (the shared expert is then a large dense GEMM, which
cuBLAS runs at least as well as the grouped kernel). Unmeasured on a GPU as of this writing: see
benchmarks/bench_moe.py, which times both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv import check_operand, check_out, fused_linear
from .moe_config import (DECODE_MAX_TOKENS, DEFAULT_CONFIGS, GEMV_BUCKETS, INTERPRETER_GEMV_TILES,  # noqa: F401
                         TUNING_CANDIDATES, TUNING_TOKENS, cache_path, config_key, get_config, token_bucket, tune,
                         warmup)
from .quant import (MAGIC_VALUE, QuantizedWeight, _check_weight, _weights, dequant_block_k, dequant_tile, dequantize,
                    dequantize_weight, per_word, quant_linear, quant_linear_gemm)
from .rmsnorm import rms_norm, rms_norm_ref, rms_normed
from .swiglu import silu_and_mul, silu_and_mul_ref



# ---- reference --------------------------------------------------------------------------------------------------

def route_ref(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Hugging Face's router: softmax in fp32, top-k, optional renormalisation. -> (ids [T, k] int64,
    weights [T, k] fp32)"""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def fused_moe_ref(x, router, gate_up, down, top_k: int, renormalize: bool, shared_gate_up=None, shared_down=None,
                  shared_gate=None, norm_weight=None, eps: float = 1e-6, residual=None) -> torch.Tensor:
    """The MoE block looping over experts, as Hugging Face computes it. x [T, H] -> [T, H]. With norm_weight, the
    block runs on rms_norm(x, norm_weight) (the post-attention norm); residual [T, H] is added to the output.
    Quantized experts (QuantizedWeights gate_up [E 2I, H], down [E H, I], shared ones [2Is, H], [H, Is]): each
    projection is fp32 products of the exact dequantized weight, rounded once to x's dtype (fused_linear_ref's)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    num_experts = router.shape[0]
    ids, weights = route_ref(F.linear(x, router), top_k, renormalize)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    counts = torch.bincount(ids.flatten(), minlength=num_experts).tolist()
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        token, slot = torch.where(ids == e)
        h = silu_and_mul_ref(_linear_ref(x[token], _expert(gate_up, e, num_experts)))
        out.index_add_(0, token, _linear_ref(h, _expert(down, e, num_experts)) * weights[token, slot, None])
    if shared_gate_up is not None:
        shared = _linear_ref(silu_and_mul_ref(_linear_ref(x, shared_gate_up)), shared_down)
        out = out + torch.sigmoid(F.linear(x, shared_gate)) * shared
    return out if residual is None else out + residual


def _expert(w, e: int, num_experts: int):
    """Expert e's matrix of stacked float weights [E, N, K], or its rows of flattened quantized ones [E N, K]."""
    if isinstance(w, QuantizedWeight):
        n = w.shape[0] // num_experts
        return w.rows(e * n, (e + 1) * n)
    return w[e]


def _linear_ref(x, w):
    if isinstance(w, QuantizedWeight):  # fp32 products of the exact dequantized weight, rounded once
        return F.linear(x.float(), dequantize(w, torch.float32)).to(x.dtype)
    return F.linear(x, w)


# ---- the post-attention norm, inside the kernels that read its output ------------------------------------------

@triton.jit
def _row_rstd(p_row, hidden, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row, in fp32."""
    b_ss = tl.zeros([BLOCK], tl.float32)
    for h0 in range(0, hidden, BLOCK):
        o_h = h0 + tl.arange(0, BLOCK)
        b_x = tl.load(p_row + o_h, mask=o_h < hidden, other=0.0).to(tl.float32)
        b_ss += b_x * b_x
    return tl.rsqrt(tl.sum(b_ss, axis=0) / hidden + eps)


@triton.jit
def _normed(b_x, rstd, p_norm, o_h, m_h, HAS_NORM: tl.constexpr, dt: tl.constexpr):
    """The chunk b_x (fp32) of a row after RMSNorm (rmsnorm.rms_normed); unchanged without HAS_NORM."""
    if HAS_NORM:
        b_x = rms_normed(b_x, rstd, tl.load(p_norm + o_h, mask=m_h, other=0.0).to(tl.float32), dt)
    return b_x


# ---- routing ----------------------------------------------------------------------------------------------------
# The router's logits carry one more column when the layer has a shared expert: the shared expert's gate logit,
# computed by the same GEMV (router_with_shared_gate). A token's routing is a few reductions over E numbers, so the
# decode GEMVs redo it in every program instead of launching a routing kernel and reading its output back.

@triton.jit
def _route_ranks(p_row, num_experts, BLOCK_E: tl.constexpr):
    """One token's routing from its router logits: (fp32 softmax probabilities [BLOCK_E], 0 past num_experts;
    rank [BLOCK_E]). The expert of rank j is the token's j-th choice: ranked by probability, ties to the lower index;
    lanes past num_experts last. The ranks are always a permutation, so every choice is a real expert, even for a
    row of non-finite logits (all NaN probabilities): its choices are then the lowest ids, not an id past the end."""
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < num_experts
    b_logits = tl.load(p_row + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
    b_p = tl.exp(b_logits - tl.max(b_logits, axis=0))
    b_p = tl.where(m_e, b_p, 0.0)
    b_probs = b_p / tl.sum(b_p, axis=0)
    # Ranked on exp(logit - max), elementwise, not on the probabilities: the sum's rounding depends on each kernel's
    # reduction layout, and both decode GEMVs rank the same token, so they must agree exactly (the division keeps the
    # order but may round two values into a tie in one kernel only). Keys: >= 0 for experts, -0.5 for a NaN (after
    # every number, so that the order stays total), -1 for padding lanes.
    b_key = tl.where(m_e, tl.where(b_p == b_p, b_p, -0.5), -1.0)
    # expert f is ahead of expert e when its key is larger, or equal with a lower index: [E, E] -> [E]
    b_ke, b_kf = b_key[:, None], b_key[None, :]
    ahead = (b_kf > b_ke) | ((b_kf == b_ke) & (o_e[None, :] < o_e[:, None]))
    return b_probs, tl.sum(ahead.to(tl.int32), axis=1)


@triton.jit
def _route_choice(b_probs, b_rank, j, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert id, routing weight) of a token's j-th choice (j < TOP_K), from _route_ranks."""
    is_j = b_rank == j
    expert = tl.min(tl.where(is_j, tl.arange(0, BLOCK_E), BLOCK_E), axis=0)
    weight = tl.sum(tl.where(is_j, b_probs, 0.0), axis=0)  # the one selected lane
    if RENORMALIZE:
        weight = weight / tl.sum(tl.where(b_rank < TOP_K, b_probs, 0.0), axis=0)
    return expert, weight


@triton.jit
def _pair_expert(b_probs, b_rank, j, num_experts, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """(expert id, weight before the shared gate) of a token's pair j: a routed choice for j < TOP_K, else chunk
    j - TOP_K of the folded shared expert (id num_experts + j - TOP_K)."""
    expert, weight = _route_choice(b_probs, b_rank, j, TOP_K, RENORMALIZE, BLOCK_E)
    return tl.where(j < TOP_K, expert, num_experts + j - TOP_K), weight


@triton.jit
def _route_kernel(
    # pointers
    p_logits, p_ids, p_weights,
    # sizes
    num_experts,
    # strides
    s_logits,
    # meta-parameters
    TOP_K: tl.constexpr, SHARED_CHUNKS: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    p_row = p_logits + i_t * s_logits
    b_probs, b_rank = _route_ranks(p_row, num_experts, BLOCK_E)
    p_row_ids = p_ids + i_t * (TOP_K + SHARED_CHUNKS)
    p_row_w = p_weights + i_t * (TOP_K + SHARED_CHUNKS)
    for j in tl.static_range(TOP_K):
        expert, weight = _route_choice(b_probs, b_rank, j, TOP_K, RENORMALIZE, BLOCK_E)
        tl.store(p_row_ids + j, expert)
        tl.store(p_row_w + j, weight)
    if SHARED_CHUNKS > 0:
        # the folded shared expert: chunks E .. E+S-1, each weighted by sigmoid(gate logit), the column after E
        gate = tl.sigmoid(tl.load(p_row + num_experts).to(tl.float32))
        o_s = tl.arange(0, BLOCK_S)
        m_s = o_s < SHARED_CHUNKS
        tl.store(p_row_ids + TOP_K + o_s, num_experts + o_s, mask=m_s)
        tl.store(p_row_w + TOP_K + o_s, tl.zeros([BLOCK_S], tl.float32) + gate, mask=m_s)


def route(logits: torch.Tensor, num_experts: int, top_k: int, renormalize: bool, shared_chunks: int = 0):
    """Router logits [T, E], or [T, E + 1] with the shared expert's gate logit last -> (ids [T, k + S] int32,
    weights [T, k + S] fp32): softmax over the E experts, top-k, optional renormalisation, in one kernel. Ties go
    to the lowest expert index. With shared_chunks S > 0 (the folded shared expert; needs the gate column),
    columns k .. k+S-1 hold the ids E .. E+S-1 and the weight sigmoid(gate logit)."""
    t, columns = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if columns not in (num_experts, num_experts + 1) or (shared_chunks and columns != num_experts + 1):
        raise ValueError(f"logits must have {num_experts} columns, or {num_experts + 1} with the shared expert's "
                         f"gate (needed when shared_chunks > 0), got {columns}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    ids = torch.empty((t, top_k + shared_chunks), device=logits.device, dtype=torch.int32)
    weights = torch.empty((t, top_k + shared_chunks), device=logits.device, dtype=torch.float32)
    if t:
        _route_kernel[(t,)](logits, ids, weights, num_experts, logits.stride(0), TOP_K=top_k,
                            SHARED_CHUNKS=shared_chunks, RENORMALIZE=renormalize,
                            BLOCK_E=triton.next_power_of_2(num_experts),
                            BLOCK_S=max(2, triton.next_power_of_2(shared_chunks)), num_warps=1)
    return ids, weights


def router_with_shared_gate(router: torch.Tensor, shared_gate: torch.Tensor | None) -> torch.Tensor:
    """[E, H] router, or [E + 1, H]: the router's rows then the shared expert's gate row, so that one GEMM gives
    every gate logit. A view when the two are adjacent rows of one tensor (as the model allocates them), else a
    copy (one more launch)."""
    if shared_gate is None:
        return router
    e, h = router.shape
    if (router._base is not None and router._base is shared_gate._base and router.is_contiguous()
            and shared_gate.is_contiguous() and shared_gate.storage_offset() == router.storage_offset() + e * h):
        return router.as_strided((e + 1, h), (h, 1), router.storage_offset())
    return torch.cat([router, shared_gate])


# ---- grouping ---------------------------------------------------------------------------------------------------

def moe_align(ids: torch.Tensor, num_experts: int, block_m: int, live: torch.Tensor | None = None):
    """Group the T*k (token, expert) pairs by expert into blocks of block_m rows, each expert's rows padded to a
    whole number of blocks. Device ops with static shapes only (no host synchronisation). live [T] bool: the pairs
    of tokens not live (padding) are grouped after every expert's blocks, past num_rows: no block computes them.

    -> sorted_pairs [max_rows] int32: pair index t*k + j per row, num_pairs on padding rows;
       block_experts [max_blocks] int32: expert of each block, num_experts or more past the last used block;
       num_rows [1] int32: rows in use (a multiple of block_m).
    max_rows = T*k + E*(block_m - 1) rounded up to block_m (one bin more with live) is the static upper bound the grid
    is sized for."""
    flat = ids.flatten().long()
    bins = num_experts
    if live is not None:  # the padding tokens' pairs into bin num_experts, after every expert's
        flat = torch.where(live.view(-1, 1), ids.long(), num_experts).flatten()
        bins += 1
    num_pairs = flat.numel()
    max_rows = triton.cdiv(num_pairs + bins * (block_m - 1), block_m) * block_m
    dev = ids.device
    counts = torch.zeros(bins, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=dev) - (torch.cumsum(counts, 0) - counts)[experts_sorted]
    dest = (ends - padded)[experts_sorted] + rank
    sorted_pairs = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=dev)
    sorted_pairs[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=dev)
    block_experts = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_experts, ends[num_experts - 1:num_experts].to(torch.int32)


# ---- expert weights -----------------------------------------------------------------------------------------------
# Expert ids >= num_experts are chunks of the folded shared expert (HAS_SHARED): chunk c reads rows [c I, (c+1) I)
# of the shared gate and up projections ([2 Is, H], gate rows first) and columns [c I, (c+1) I) of the shared
# down projection ([H, Is]), in place.

@triton.jit
def _gate_up_rows(e, p_w, p_ws, num_experts, inter, shared_inter, s_we, s_wn, HAS_SHARED: tl.constexpr):
    """-> (pointer to expert e's first gate row, offset from there to its first up row)."""
    p_e = p_w + e * s_we
    up = inter * s_wn
    if HAS_SHARED:
        if e >= num_experts:
            p_e = p_ws + (e - num_experts) * inter * s_wn
            up = shared_inter * s_wn
    return p_e, up


@triton.jit
def _down_matrix(e, p_w, p_ws, num_experts, inter, shared_inter, s_we, s_wn, HAS_SHARED: tl.constexpr):
    """-> (pointer to expert e's down matrix [H, I], its row stride)."""
    p_e = p_w + e * s_we
    s_row = s_wn
    if HAS_SHARED:
        if e >= num_experts:
            p_e = p_ws + (e - num_experts) * inter
            s_row = shared_inter
    return p_e, s_row


# Quantized experts (kernels.quant's layout; QUANT): the routed experts are one QuantizedWeight each, the experts'
# rows flattened (gate_up [E 2I, H]: expert e's gate rows e 2I + n, up rows e 2I + I + n; down [E H, I]: expert e's
# rows e H + n), the shared expert's two QuantizedWeights keep the checkpoint layout. Folded chunk c reads shared
# gate_up rows c I + n (up: Is + c I + n) and the shared down's words [c I / PER_WORD, (c+1) I / PER_WORD) of every
# row, with the shared down's own groups (a group index from the word's position in the whole shared row, so the
# chunk width need not be a multiple of the group size: I a multiple of PER_WORD is enough, and words never straddle
# groups). Qweight, scales and zeros are contiguous: their row strides are words and groups per row.

@triton.jit
def _quant_gate_up_rows(e, num_experts, inter, shared_inter, HAS_SHARED: tl.constexpr):
    """-> (expert e's first gate row, rows from there to its first up row, whether it is a shared chunk)."""
    first = e * 2 * inter
    up = inter
    is_shared = e < 0  # False, as a tensor
    if HAS_SHARED:
        is_shared = e >= num_experts
        if is_shared:
            first = (e - num_experts) * inter
            up = shared_inter
    return first, up, is_shared


@triton.jit
def _quant_down_rows(e, num_experts, hidden, inter, PER_WORD: tl.constexpr, HAS_SHARED: tl.constexpr):
    """-> (expert e's first row, its first word in each row, whether it is a shared chunk)."""
    first = e * hidden
    word = e * 0
    is_shared = e < 0
    if HAS_SHARED:
        is_shared = e >= num_experts
        if is_shared:
            first = e * 0
            word = (e - num_experts) * (inter // PER_WORD)
    return first, word, is_shared


@triton.jit
def _quant_tile(p_q, p_s, p_z, o_row, o_w, o_g, m_nw, s_q, s_g, IS_FP8: tl.constexpr):
    """The [BN, BKW] words of rows o_row at words o_w, with each word's scale and 2^23 + zero (fp32)."""
    b_q = tl.load(p_q + o_row[:, None] * s_q + o_w[None, :], mask=m_nw, other=0.0)
    o_sg = o_row[:, None] * s_g + o_g[None, :]
    b_s = tl.load(p_s + o_sg, mask=m_nw, other=0.0).to(tl.float32)
    b_zb = tl.zeros_like(b_s) + MAGIC_VALUE
    if not IS_FP8:
        b_zb += tl.load(p_z + o_sg, mask=m_nw, other=0.0).to(tl.float32)
    return b_q, b_s, b_zb


# ---- decode: batched GEMV -----------------------------------------------------------------------------------------

@triton.jit
def _gemv_gate_up_kernel(
    # pointers (QUANT: p_w and p_ws are the routed and shared qweights, with their scales and zeros)
    p_x, p_logits, p_w, p_ws, p_scales, p_zeros, p_shared_scales, p_shared_zeros, p_norm, p_slots, p_out,
    # sizes (QUANT: words and groups per weight row, hidden / PER_WORD and hidden / group size)
    hidden, inter, num_experts, shared_inter, words, groups, eps,
    # strides
    s_x, s_logits, s_we, s_wn, s_out,
    # meta-parameters
    TOP_K: tl.constexpr, PAIRS: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_SLOTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, IS_FP8: tl.constexpr, GROUP_WORDS: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    # program (pair, N tile): pair j of token t is its j-th routed expert, or a chunk of the folded shared expert,
    # routed here from the token's logits. HAS_NORM: x is the residual stream, normalised here (each program
    # recomputes its token's norm: x is a few KB). HAS_SLOTS: a token whose slot is negative is padding: its
    # programs read no expert weight (an empty K loop; an early exit spilled in the loop under Triton 3.6)
    i_pair = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    i_t = i_pair // PAIRS
    num_k = hidden  # the columns read: none for a padding token, whose h is then silu(0) * 0 = 0
    if HAS_SLOTS:
        num_k = tl.where(tl.load(p_slots + i_t) < 0, 0, hidden)
    b_probs, b_rank = _route_ranks(p_logits + i_t * s_logits, num_experts, BLOCK_E)
    e, _ = _pair_expert(b_probs, b_rank, i_pair % PAIRS, num_experts, TOP_K, False, BLOCK_E)
    e = e.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < inter
    rstd = 1.0
    if HAS_NORM:
        rstd = _row_rstd(p_x + i_t * s_x, hidden, eps, BLOCK_K)
    if QUANT:
        # words as in kernels.quant's GEMV: position j of each word is stored column word * PER_WORD + j, x read at
        # those columns; [BN, BKW] fp32 sums (one entry per word) reduced once at the end
        PER_WORD: tl.constexpr = 1 if IS_FP8 else 32 // BITS
        first, up, is_shared = _quant_gate_up_rows(e, num_experts, inter, shared_inter, HAS_SHARED)
        p_q, p_s, p_z = p_w, p_scales, p_zeros
        if is_shared:
            p_q, p_s, p_z = p_ws, p_shared_scales, p_shared_zeros
        o_rg = first + o_n  # [BN] gate rows
        o_ru = o_rg + up
        b_accg = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_accu = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        for w0 in range(0, num_k // PER_WORD, BLOCK_KW):
            o_w = w0 + tl.arange(0, BLOCK_KW)
            m_w = o_w < words
            m_nw = m_n[:, None] & m_w[None, :]
            b_qg, b_sg, b_zg = _quant_tile(p_q, p_s, p_z, o_rg, o_w, o_w // GROUP_WORDS, m_nw, words, groups, IS_FP8)
            b_qu, b_su, b_zu = _quant_tile(p_q, p_s, p_z, o_ru, o_w, o_w // GROUP_WORDS, m_nw, words, groups, IS_FP8)
            for j in tl.static_range(PER_WORD):
                o_k = o_w * PER_WORD + j  # [BKW] columns
                b_x = tl.load(p_x + i_t * s_x + o_k, mask=m_w, other=0.0).to(tl.float32)
                b_x = _normed(b_x, rstd, p_norm, o_k, m_w, HAS_NORM, p_x.dtype.element_ty)
                # [BN, BKW] * [1, BKW]
                b_accg += _weights(b_qg, b_zg, b_sg, j, BITS, IS_FP8, True) * b_x[None, :]
                b_accu += _weights(b_qu, b_zu, b_su, j, BITS, IS_FP8, True) * b_x[None, :]
        b_g = tl.sum(b_accg, axis=1)
        b_u = tl.sum(b_accu, axis=1)
    else:
        p_e, up = _gate_up_rows(e, p_w, p_ws, num_experts, inter, shared_inter, s_we, s_wn, HAS_SHARED)
        p_wg = p_e + o_n[:, None] * s_wn
        p_wu = p_wg + up
        b_g = tl.zeros([BLOCK_N], tl.float32)
        b_u = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, num_k, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < hidden
            b_x = tl.load(p_x + i_t * s_x + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            b_x = _normed(b_x, rstd, p_norm, o_k, m_k, HAS_NORM, p_x.dtype.element_ty)
            m_w = m_n[:, None] & m_k[None, :]
            # [BN, BK] * [1, BK] -> sum over K -> [BN]
            b_g += tl.sum(tl.load(p_wg + o_k[None, :], mask=m_w, other=0.0).to(tl.float32) * b_x[None, :], axis=1)
            b_u += tl.sum(tl.load(p_wu + o_k[None, :], mask=m_w, other=0.0).to(tl.float32) * b_x[None, :], axis=1)
    b_h = b_g * tl.sigmoid(b_g) * b_u
    tl.store(p_out + i_pair * s_out + o_n, b_h.to(p_out.dtype.element_ty), mask=m_n)


@triton.jit
def _gemv_down_kernel(
    # pointers (QUANT: p_w and p_ws are the routed and shared qweights, with their scales and zeros)
    p_h, p_logits, p_w, p_ws, p_scales, p_zeros, p_shared_scales, p_shared_zeros, p_res, p_slots, p_out,
    # sizes (QUANT: words and groups per row of the routed down, then of the shared down)
    hidden, inter, num_experts, shared_inter, words, groups, shared_words, shared_groups,
    # strides
    s_h, s_logits, s_we, s_wn, s_res, s_out,
    # meta-parameters
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, PAIRS: tl.constexpr, HAS_SHARED: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_PAIRS: tl.constexpr,
    PAIRS_PER_PROGRAM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SLOTS: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, IS_FP8: tl.constexpr, GROUP_WORDS: tl.constexpr,
    SHARED_GROUP_WORDS: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    # HAS_RESIDUAL (only with SPLIT_PAIRS == 1): the layer's output rounded, plus the residual, rounded again
    # program (token t, chunk c): the pairs c * PAIRS_PER_PROGRAM ... of token t, summed in a fixed order into row
    # t * SPLIT_PAIRS + c of the output (the layer's output itself when SPLIT_PAIRS == 1, else fp32 partial sums);
    # each pair's expert and weight routed here from the token's logits, as the gate_up GEMV did. HAS_SLOTS: a
    # padding token (negative slot) sums none of its pairs: its row is 0 (the residual with HAS_RESIDUAL)
    PER_WORD: tl.constexpr = 1 if IS_FP8 else 32 // BITS  # QUANT: weights per stored word
    i_row = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    i_t = i_row // SPLIT_PAIRS
    first = (i_row % SPLIT_PAIRS) * PAIRS_PER_PROGRAM
    p_row = p_logits + i_t * s_logits
    b_probs, b_rank = _route_ranks(p_row, num_experts, BLOCK_E)
    shared_weight = 0.0
    if HAS_SHARED:
        shared_weight = tl.sigmoid(tl.load(p_row + num_experts).to(tl.float32))
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < hidden
    b_out = tl.zeros([BLOCK_N], tl.float32)
    num_summed = PAIRS_PER_PROGRAM
    if HAS_SLOTS:
        num_summed = tl.where(tl.load(p_slots + i_t) < 0, 0, PAIRS_PER_PROGRAM)
    # a loop, not unrolled: unrolled (up to 16 pairs), ptxas kept several pairs' state live across the weight loops
    # and spilled 8-56 bytes per thread in 14 quantized tuning candidates under Triton 3.9 (0 as a loop, and 22
    # fewer registers on average under 3.6: tests/aot_sm90.py); the pairs are still summed in the same fixed order
    for j in range(num_summed):
        i_pair = i_t * PAIRS + first + j
        e, weight = _pair_expert(b_probs, b_rank, first + j, num_experts, TOP_K, RENORMALIZE, BLOCK_E)
        weight = tl.where(first + j < TOP_K, weight, shared_weight)
        e = e.to(tl.int64)
        if QUANT:
            first_row, first_word, is_shared = _quant_down_rows(e, num_experts, hidden, inter, PER_WORD, HAS_SHARED)
            p_q, p_s, p_z, s_q, s_g = p_w, p_scales, p_zeros, words, groups
            if is_shared:
                p_q, p_s, p_z, s_q, s_g = p_ws, p_shared_scales, p_shared_zeros, shared_words, shared_groups
            o_row = first_row + o_n  # [BN]
            b_acc = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
            for w0 in range(0, inter // PER_WORD, BLOCK_KW):
                o_w = w0 + tl.arange(0, BLOCK_KW)  # [BKW] words of the expert (the chunk)
                m_w = o_w < inter // PER_WORD
                o_wr = first_word + o_w  # words of the stored row
                o_g = tl.where(is_shared, o_wr // SHARED_GROUP_WORDS, o_wr // GROUP_WORDS)
                b_q, b_s, b_zb = _quant_tile(p_q, p_s, p_z, o_row, o_wr, o_g, m_n[:, None] & m_w[None, :], s_q,
                                             s_g, IS_FP8)
                for jw in tl.static_range(PER_WORD):
                    b_h = tl.load(p_h + i_pair * s_h + o_w * PER_WORD + jw, mask=m_w, other=0.0).to(tl.float32)
                    b_acc += _weights(b_q, b_zb, b_s, jw, BITS, IS_FP8, True) * b_h[None, :]  # [BN, BKW]
            b_part = tl.sum(b_acc, axis=1)
        else:
            p_e, s_row = _down_matrix(e, p_w, p_ws, num_experts, inter, shared_inter, s_we, s_wn, HAS_SHARED)
            b_part = tl.zeros([BLOCK_N], tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < inter
                b_h = tl.load(p_h + i_pair * s_h + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
                b_w = tl.load(p_e + o_n[:, None] * s_row + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                              other=0.0).to(tl.float32)  # [BN, BK]
                b_part += tl.sum(b_w * b_h[None, :], axis=1)
        b_out += weight * b_part
    if HAS_RESIDUAL:
        b_res = tl.load(p_res + i_row * s_res + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_out = b_out.to(p_out.dtype.element_ty).to(tl.float32) + b_res
    tl.store(p_out + i_row * s_out + o_n, b_out.to(p_out.dtype.element_ty), mask=m_n)


# ---- prefill: grouped GEMMs on tensor cores -----------------------------------------------------------------------

@triton.jit
def _grouped_gate_up_kernel(
    # pointers (QUANT: p_w is the flattened experts' words, p_qs / p_qz their scales / zeros)
    p_x, p_sorted, p_block_experts, p_num_rows, p_w, p_ws, p_qs, p_qz, p_out,
    # sizes
    num_pairs, hidden, inter, num_experts, shared_inter,
    # strides (QUANT: s_wn is the words per row, s_qs / s_qz the groups per row)
    s_x, s_we, s_wn, s_qs, s_qz, s_out,
    # meta-parameters
    PAIRS: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr,
    IS_FP8: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_STEPS: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_n = tl.program_id(1)
    if i_b * BLOCK_M >= tl.load(p_num_rows):
        return  # past the last used block: the grid is a static upper bound
    e = tl.load(p_block_experts + i_b).to(tl.int64)
    p_e, up = _gate_up_rows(e, p_w, p_ws, num_experts, inter, shared_inter, s_we, s_wn, HAS_SHARED)
    dt = p_x.dtype.element_ty
    o_m = i_b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(p_sorted + o_m).to(tl.int64)
    m_m = pair < num_pairs
    token = pair // PAIRS
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < inter
    b_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    b_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < hidden
        # token rows gathered in the load: [BM, BK]
        b_x = tl.load(p_x + token[:, None] * s_x + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        if QUANT:  # expert e's gate rows e 2I + n and up rows e 2I + I + n, unpacked and dequantized: [BK, BN]
            i_k = k0 // BLOCK_K
            o_r = e * 2 * inter + o_n
            b_wg = dequant_tile(p_w, p_qs, p_qz, o_r, m_n, i_k, hidden, s_wn, s_qs, s_qz, dt, BITS, IS_FP8,
                                PER_CHANNEL, GROUP_STEPS, BLOCK_K, BLOCK_N)
            b_wu = dequant_tile(p_w, p_qs, p_qz, o_r + inter, m_n, i_k, hidden, s_wn, s_qs, s_qz, dt, BITS, IS_FP8,
                                PER_CHANNEL, GROUP_STEPS, BLOCK_K, BLOCK_N)
        else:
            m_w = m_k[:, None] & m_n[None, :]
            b_wg = tl.load(p_e + o_n[None, :] * s_wn + o_k[:, None], mask=m_w, other=0.0)  # [BK, BN]
            b_wu = tl.load(p_e + up + o_n[None, :] * s_wn + o_k[:, None], mask=m_w, other=0.0)
        # [BM, BK] @ [BK, BN] -> [BM, BN]
        b_g = tl.dot(b_x, b_wg, b_g, input_precision=DOT_PRECISION)
        b_u = tl.dot(b_x, b_wu, b_u, input_precision=DOT_PRECISION)
    b_h = b_g * tl.sigmoid(b_g) * b_u
    tl.store(p_out + pair[:, None] * s_out + o_n[None, :], b_h.to(p_out.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _grouped_down_kernel(
    # pointers (QUANT: as in _grouped_gate_up_kernel)
    p_h, p_sorted, p_block_experts, p_num_rows, p_weights, p_w, p_ws, p_qs, p_qz, p_out,
    # sizes
    num_pairs, hidden, inter, num_experts, shared_inter,
    # strides
    s_h, s_we, s_wn, s_qs, s_qz, s_out,
    # meta-parameters
    HAS_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr, IS_FP8: tl.constexpr,
    PER_CHANNEL: tl.constexpr, GROUP_STEPS: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_n = tl.program_id(1)
    if i_b * BLOCK_M >= tl.load(p_num_rows):
        return
    e = tl.load(p_block_experts + i_b).to(tl.int64)
    p_e, s_row = _down_matrix(e, p_w, p_ws, num_experts, inter, shared_inter, s_we, s_wn, HAS_SHARED)
    o_m = i_b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(p_sorted + o_m).to(tl.int64)
    m_m = pair < num_pairs
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < hidden
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < inter
        b_h = tl.load(p_h + pair[:, None] * s_h + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        if QUANT:  # expert e's rows e H + n
            b_w = dequant_tile(p_w, p_qs, p_qz, e * hidden + o_n, m_n, k0 // BLOCK_K, inter, s_wn, s_qs, s_qz,
                               p_h.dtype.element_ty, BITS, IS_FP8, PER_CHANNEL, GROUP_STEPS, BLOCK_K, BLOCK_N)
        else:
            b_w = tl.load(p_e + o_n[None, :] * s_row + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0)
        # [BM, BK] @ [BK, BN] -> [BM, BN]
        b_acc = tl.dot(b_h, b_w, b_acc, input_precision=DOT_PRECISION)
    b_acc *= tl.load(p_weights + pair, mask=m_m, other=0.0)[:, None]
    tl.store(p_out + pair[:, None] * s_out + o_n[None, :], b_acc.to(p_out.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


# ---- launcher ---------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def fused_moe(x: torch.Tensor, router: torch.Tensor, gate_up, down, top_k: int, renormalize: bool,
              shared_gate_up=None, shared_down=None, shared_gate: torch.Tensor | None = None,
              config: dict | None = None, regime: str | None = None, out: torch.Tensor | None = None,
              fold_shared: bool | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
              residual: torch.Tensor | None = None, token_slots: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE block. x [T, H]; router [E, H]; gate_up [E, 2I, H] (rows [gate | up]); down [E, H, I]; optional
    shared expert gate_up [2Is, H] (rows [gate | up]), down [H, Is] and sigmoid gate [1, H]. -> [T, H] in x's dtype
    (written into `out` when given). `config` overrides the block sizes (see get_config / tune); `regime`
    ("decode" or "prefill") overrides the choice made from T; `fold_shared` overrides the config's FOLD_SHARED
    (True needs Is to be a multiple of I).
    norm_weight [H]: the block runs on rms_norm(x, norm_weight, eps) (the layer's post-attention norm); residual
    [T, H]: added to the output. On the GEMV path with the shared expert folded (or absent) both are fused: the
    router GEMV (router and shared gate rows) and the gate_up GEMV normalise x as they read it, the down GEMV adds
    the residual (unless SPLIT_PAIRS > 1): the block is 3 launches when the shared gate is the row after the
    router's in memory (router_with_shared_gate), 4 otherwise. Elsewhere the norm is one kernel before and the
    residual one add after.
    token_slots [T] int32 / int64 (the KV-cache slot of each token, AttentionMetadata.slot_mapping): a token whose
    slot is negative is padding (a CUDA graph's bucket filled up). Its routed experts and folded shared chunks are
    skipped (the decode GEMVs run empty weight loops for it; the grouped GEMMs get its pairs in no block, where
    they would add blocks to the experts all padding tokens select: one token, one choice), so that padding rows
    cost no expert weight reads or FLOPs: its output is the residual (0 without one), plus the shared expert's
    part when the shared expert runs separately (a dense GEMM / GEMV over every row, whose weight the real rows
    read anyway).

    Quantized experts (kernels.quant.QuantizedWeight, one kind for all four; router and shared gate stay in x's
    dtype): gate_up is one QuantizedWeight [E 2I, H] (expert e's rows [e 2I, (e+1) 2I), gate then up), down one
    [E H, I] (expert e's rows [e H, (e+1) H)), the shared expert's [2Is, H] and [H, Is]; no act-order perm. Numerics:
    fused_moe_ref's on the same weights. Decode: the two GEMVs unpack the words in registers (the QUANT path),
    folded shared chunks included (they need the shared gate_up's group size to equal gate_up's), 3 launches as with
    float weights. Prefill, with the shared expert separate (FOLD_SHARED False, the prefill default): the grouped
    GEMMs unpack and dequantize each expert tile in their K loops (kernels.quant.dequant_tile, BLOCK_K narrowed to
    divide the group size), and the shared expert is quant_linear_gemm. With the shared expert folded in, or groups
    no BLOCK_K of at least 16 divides: the layer's experts are dequantized by kernels.quant.dequantize_weight into
    scratch buffers in x's dtype ([E, 2I, H] and [E, H, I]: ~3.5 GB for one Qwen2-57B-A14B layer in bf16, reused
    layer after layer by the caching allocator) and the float grouped GEMMs run on them. Which is faster at which
    prompt length is for the tuner to find (it times FOLD_SHARED both ways)."""
    if x.ndim != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor [T, H], got {x.dtype} {list(x.shape)}")
    t, hidden = x.shape
    quantized = isinstance(gate_up, QuantizedWeight)
    num_experts, inter = router.shape[0], moe_sizes(router, gate_up)[1]
    shared_inter = shared_width(shared_gate_up)
    if quantized:
        _check_quantized(x, router, gate_up, down, shared_gate_up, shared_down)
    else:
        if (router.shape != (num_experts, hidden) or gate_up.shape[::2] != (num_experts, hidden)
                or down.shape != (num_experts, hidden, inter)):
            raise ValueError(f"MoE shapes disagree: x {list(x.shape)}, router {list(router.shape)}, gate_up "
                             f"{list(gate_up.shape)}, down {list(down.shape)}")
        if not (gate_up.dtype == down.dtype == x.dtype):
            raise ValueError(f"x, gate_up and down must share a dtype, got {x.dtype}, {gate_up.dtype}, {down.dtype}")
        if gate_up.stride(2) != 1 or down.stride(2) != 1 or gate_up.stride(1) != hidden or down.stride(1) != inter:
            raise ValueError("expert weights must be contiguous [E, 2I, H] and [E, H, I]")
    if shared_gate_up is not None:
        if (shared_down is None or shared_gate is None or tuple(shared_gate_up.shape) != (2 * shared_inter, hidden)
                or tuple(shared_down.shape) != (hidden, shared_inter) or shared_gate.shape != (1, hidden)):
            raise ValueError(f"shared expert shapes disagree with H={hidden}: gate_up "
                             f"{_shape(shared_gate_up)}, down {_shape(shared_down)}, gate {_shape(shared_gate)}")
        floats = (shared_gate,) if quantized else (shared_gate, shared_gate_up, shared_down)
        if any(w.dtype != x.dtype for w in floats):
            raise ValueError("the shared expert's weights must have x's dtype")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if regime not in (None, "decode", "prefill"):
        raise ValueError(f"regime must be 'decode' or 'prefill', got {regime!r}")
    chunks = shared_chunks(inter, shared_gate_up)
    if fold_shared and not chunks:
        raise ValueError(f"fold_shared=True needs a shared expert whose width is a multiple of the expert width "
                         f"{inter}, got {shared_inter or 'none'}")
    if chunks and not _foldable(gate_up, shared_gate_up, shared_down):
        if fold_shared:  # the folded chunks are read in place with the contiguous strides
            raise ValueError("fold_shared=True needs contiguous shared expert weights [2Is, H] and [H, Is] (quantized: "
                             "the shared gate_up's group size equal to gate_up's)")
        chunks = 0
    check_operand("norm_weight", norm_weight, (hidden,), x.dtype, x.device)
    check_operand("residual", residual, tuple(x.shape), x.dtype, x.device)
    if token_slots is not None and (token_slots.shape != (t,) or token_slots.dtype not in (torch.int32, torch.int64)
                                    or token_slots.device != x.device or (t and token_slots.stride(0) != 1)):
        raise ValueError(f"token_slots must be an int32 or int64 tensor [{t}] with stride 1 on {x.device}, got "
                         f"{token_slots.dtype} {list(token_slots.shape)} on {token_slots.device}")
    x = x if x.stride(1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor {list(x.shape)} on {x.device}")
    else:  # out is written before x is last read (the separate shared expert) and the residual added
        check_out(out, {"x": x, "residual": residual})
    if t == 0:
        return out
    bucket = token_bucket(t)
    if regime == "decode" and bucket not in GEMV_BUCKETS:
        bucket = "decode-wide"
    elif regime == "prefill" and bucket in GEMV_BUCKETS:
        bucket = "prefill-small"
    cfg = config or get_config(config_key(hidden, inter, num_experts, top_k, shared_inter, x.dtype, bucket, x.device,
                                          weight_tag(gate_up)), bucket)
    fold = cfg.get("FOLD_SHARED", DEFAULT_CONFIGS[bucket]["FOLD_SHARED"]) if fold_shared is None else fold_shared
    chunks = chunks if fold else 0
    # the GEMV path with no separate shared expert takes the norm in its prologues and the residual in the down
    # GEMV's epilogue; elsewhere x is normalised once, before everything that reads it
    fuses = bucket in GEMV_BUCKETS and (chunks > 0 or shared_gate_up is None)
    if norm_weight is not None and not fuses:
        x, norm_weight = rms_norm(x, norm_weight, eps), None
    # every gate logit in one GEMM: the router's E columns, then the shared expert's gate when there is one
    gates = router_with_shared_gate(router, shared_gate)
    if bucket in GEMV_BUCKETS:  # a GEMV, batch invariant (cuBLAS picks its kernel by the row count), with the norm
        gates = gates if gates.stride(-1) == 1 else gates.contiguous()  # in its prologue when not applied yet
        logits = fused_linear(x, gates, norm_weight=norm_weight, eps=eps)
    else:
        logits = F.linear(x, gates)
    pairs = top_k + chunks  # (token, expert) pairs per token, shared chunks included
    num_pairs = t * pairs
    h = torch.empty((num_pairs, inter), device=x.device, dtype=x.dtype)
    sizes = (hidden, inter, num_experts, shared_inter)
    residual_added = False
    if bucket in GEMV_BUCKETS:  # both GEMVs route each token from its logits: no routing launch
        bn, bk, warps = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
        block_e = triton.next_power_of_2(num_experts)
        gate_up_args, down_args = _gemv_weight_args(gate_up, down, shared_gate_up if chunks else None,
                                                    shared_down if chunks else None, x, cfg)
        slots = dict(HAS_SLOTS=token_slots is not None)
        p_slots = token_slots if token_slots is not None else logits  # unread without slots
        _gemv_gate_up_kernel[(num_pairs, triton.cdiv(inter, bn))](
            x, logits, *gate_up_args["pointers"], norm_weight if norm_weight is not None else x, p_slots, h, *sizes,
            *gate_up_args["sizes"], eps, x.stride(0), logits.stride(0), *gate_up_args["strides"], h.stride(0),
            TOP_K=top_k, PAIRS=pairs, HAS_SHARED=chunks > 0, HAS_NORM=norm_weight is not None, BLOCK_E=block_e,
            BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **slots, **gate_up_args["meta"])
        # SPLIT_PAIRS > 1: each token's pairs in that many programs (more programs, more bytes in flight when a
        # token's k + S experts would leave few (token, N tile) programs), fp32 partial rows summed after
        split = math.gcd(cfg.get("SPLIT_PAIRS", 1), pairs)
        target = out if split == 1 else torch.empty((t * split, hidden), device=x.device, dtype=torch.float32)
        residual_added = residual is not None and split == 1 and fuses
        _gemv_down_kernel[(t * split, triton.cdiv(hidden, bn))](
            h, logits, *down_args["pointers"], residual if residual_added else target, p_slots, target, *sizes,
            *down_args["sizes"], h.stride(0), logits.stride(0), *down_args["strides"],
            residual.stride(0) if residual_added else 0, target.stride(0), TOP_K=top_k, RENORMALIZE=renormalize,
            PAIRS=pairs, HAS_SHARED=chunks > 0, BLOCK_E=block_e, BLOCK_N=bn, BLOCK_K=bk, SPLIT_PAIRS=split,
            PAIRS_PER_PROGRAM=pairs // split, HAS_RESIDUAL=residual_added, num_warps=warps, **slots,
            **down_args["meta"])
        if split > 1:
            out.copy_(target.view(t, split, hidden).sum(dim=1))  # fixed order: deterministic, batch-invariant
    else:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        p_shared_gate_up, p_shared_down = shared_gate_up, shared_down
        # quantized experts: unpacked and dequantized tile by tile in the grouped GEMMs' K loops, unless the shared
        # expert is folded in (its own weights and groups) or no BLOCK_K fits the group sizes: then the layer's
        # experts are dequantized into scratch buffers first and the float kernels run
        in_loop = quantized and not chunks and all(dequant_block_k(bk, w.kind, w.group_size, w.shape[1])
                                                   for w in (gate_up, down))
        if quantized and not in_loop:
            gate_up = dequantize_weight(gate_up, x.dtype).view(num_experts, 2 * inter, hidden)
            down = dequantize_weight(down, x.dtype).view(num_experts, hidden, inter)
            if chunks:
                p_shared_gate_up = dequantize_weight(shared_gate_up, x.dtype)
                p_shared_down = dequantize_weight(shared_down, x.dtype)
        if not chunks:  # the folded shared expert's weights: unused, any pointer of the right dtype
            p_shared_gate_up, p_shared_down = gate_up, down
        gate_up_args, down_args = (_grouped_weight_args(w, p_shared, bk)
                                   for w, p_shared in ((gate_up, p_shared_gate_up), (down, p_shared_down)))
        launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ids, weights = route(logits, num_experts, top_k, renormalize, chunks)
        live = None if token_slots is None else token_slots >= 0
        sorted_pairs, block_experts, num_rows = moe_align(ids, num_experts + chunks, bm, live)
        num_blocks = sorted_pairs.numel() // bm
        precision = _dot_precision(x.dtype)
        _grouped_gate_up_kernel[(num_blocks, triton.cdiv(inter, bn))](
            x, sorted_pairs, block_experts, num_rows, *gate_up_args["pointers"], h, num_pairs, *sizes, x.stride(0),
            *gate_up_args["strides"], h.stride(0), PAIRS=pairs, HAS_SHARED=chunks > 0, BLOCK_M=bm,
            BLOCK_N=bn, DOT_PRECISION=precision, **gate_up_args["meta"], **launch)
        per_pair = torch.empty((num_pairs, hidden), device=x.device, dtype=torch.float32)
        _grouped_down_kernel[(num_blocks, triton.cdiv(hidden, bn))](
            h, sorted_pairs, block_experts, num_rows, weights, *down_args["pointers"], per_pair, num_pairs, *sizes,
            h.stride(0), *down_args["strides"], per_pair.stride(0), HAS_SHARED=chunks > 0, BLOCK_M=bm,
            BLOCK_N=bn, DOT_PRECISION=precision, **down_args["meta"], **launch)
        summed = per_pair.view(t, pairs, hidden).sum(dim=1)  # fp32 sum of each token's rows
        if live is not None:  # a padding token's pairs are in no block: its rows were never written
            summed = torch.where(live[:, None], summed, 0.0)
        out.copy_(summed)
    if shared_gate_up is not None and not chunks:
        shared = _shared_expert(x, shared_gate_up, shared_down, gemv=bucket in GEMV_BUCKETS)
        out.add_(torch.sigmoid(logits[:, num_experts:]) * shared)  # x was normalised first: the gate logit fits
    if residual is not None and not residual_added:
        out.add_(residual)
    return out


def shared_width(shared_gate_up: torch.Tensor | None) -> int:
    """Is, the shared expert's width (0 when the layer has none)."""
    return 0 if shared_gate_up is None else shared_gate_up.shape[0] // 2


def shared_chunks(inter: int, shared_gate_up: torch.Tensor | None) -> int:
    """How many expert-wide chunks a folded shared expert makes: Is / I, or 0 when it cannot fold (no shared expert,
    or Is not a multiple of I)."""
    shared_inter = shared_width(shared_gate_up)
    return shared_inter // inter if shared_inter % inter == 0 else 0


def moe_sizes(router: torch.Tensor, gate_up) -> tuple[int, int, int]:
    """(H, I, E) of a MoE layer from its router and gate_up (float [E, 2I, H] or quantized [E 2I, H])."""
    num_experts, hidden = router.shape
    rows = gate_up.shape[0] // num_experts if isinstance(gate_up, QuantizedWeight) else gate_up.shape[1]
    return hidden, rows // 2, num_experts


def weight_tag(gate_up) -> str:
    """The expert weights' form in a config key: "" for float weights, e.g. "int4g128" for quantized ones."""
    return f"{gate_up.kind}g{gate_up.group_size}" if isinstance(gate_up, QuantizedWeight) else ""


def _check_quantized(x, router, gate_up, down, shared_gate_up, shared_down) -> None:
    """Quantized experts: the layout fused_moe's docstring gives, one kind throughout, no act-order."""
    hidden, inter, num_experts = moe_sizes(router, gate_up)
    if router.shape != (num_experts, x.shape[1]) or router.dtype != x.dtype:
        raise ValueError(f"router must be a {x.dtype} tensor [E, {x.shape[1]}], got {router.dtype} "
                         f"{list(router.shape)}")
    expected = [("gate_up", gate_up, (num_experts * 2 * inter, hidden)), ("down", down, (num_experts * hidden, inter))]
    if shared_gate_up is not None:
        s = shared_width(shared_gate_up)
        expected += [("shared_gate_up", shared_gate_up, (2 * s, hidden)), ("shared_down", shared_down, (hidden, s))]
    for name, w, shape in expected:
        if not isinstance(w, QuantizedWeight):
            raise ValueError(f"{name}: quantized experts need every expert weight quantized (the shared expert's "
                             f"too), got {type(w).__name__}")
        _check_weight(w, x.device)
        if w.kind != gate_up.kind or w.perm is not None:
            raise ValueError(f"{name}: every expert weight must be {gate_up.kind} without act-order, got {w.kind}"
                             f"{' with a perm' if w.perm is not None else ''}")
        if tuple(w.shape) != shape:
            raise ValueError(f"{name}: expected a quantized [{shape[0]}, {shape[1]}] weight (experts flattened into "
                             f"rows), got {list(w.shape)}")
        if not all(t is None or t.is_contiguous() for t in (w.qweight, w.scales, w.zeros)):
            raise ValueError(f"{name}: qweight, scales and zeros must be contiguous")
        if w.dtype != gate_up.dtype:
            raise ValueError(f"{name}: scales must be {gate_up.dtype} like gate_up's, got {w.dtype}")


def _foldable(gate_up, shared_gate_up, shared_down) -> bool:
    """Whether the shared expert's chunks can be read in place by the expert kernels."""
    if isinstance(gate_up, QuantizedWeight):  # one group size for the two gate_up weights (one GROUP_WORDS)
        return shared_gate_up.group_size == gate_up.group_size
    return shared_gate_up.is_contiguous() and shared_down.is_contiguous()


def _gemv_weight_args(gate_up, down, shared_gate_up, shared_down, x, cfg) -> tuple[dict, dict]:
    """The expert weights' arguments of the two decode GEMVs (pointers, sizes, strides, meta-parameters): float
    weights, or the QUANT path's words, scales and zeros (the folded shared expert's beside; the routed ones
    again, unused, when there is none)."""
    if not isinstance(gate_up, QuantizedWeight):
        shared_gate_up = gate_up if shared_gate_up is None else shared_gate_up
        shared_down = down if shared_down is None else shared_down
        meta = dict(QUANT=False, BITS=8, IS_FP8=False, GROUP_WORDS=1, BLOCK_KW=16)
        return (dict(pointers=(gate_up, shared_gate_up, x, x, x, x), sizes=(0, 0),
                     strides=(gate_up.stride(0), gate_up.stride(1)), meta=meta),
                dict(pointers=(down, shared_down, x, x, x, x), sizes=(0, 0, 0, 0),
                     strides=(down.stride(0), down.stride(1)), meta=dict(meta, SHARED_GROUP_WORDS=1)))
    shared_gate_up = gate_up if shared_gate_up is None else shared_gate_up
    shared_down = down if shared_down is None else shared_down
    pw = per_word(gate_up)
    # words per iteration: BLOCK_K columns (int8 BLOCK_K / 4 words, int4 BLOCK_K / 8), fp8 bytes BLOCK_K / 2. Each
    # word carries its own scale and zero ([BN, BKW] fp32 tiles beside the words): wider tiles spill on sm_90 (int4
    # at BLOCK_K / 4 words: 80 bytes in the gate_up GEMV with the norm under Triton 3.6). Packed words: at most 8
    # per thread in a tile (int8 at BLOCK_N x BLOCK_K / 4 = 16 per thread, tuning candidates (16, 256, 2 warps) and
    # (32, 256, 4 warps): 112-488 bytes spilled inside the gate_up GEMV's loop under Triton 3.9, tests/aot_sm90.py)
    block_kw = cfg.get("BLOCK_KW")
    if block_kw is None:
        block_kw = max(16, cfg["BLOCK_K"] // {"fp8": 2, "int8": 4}.get(gate_up.kind, 8))
        if gate_up.kind != "fp8":
            block_kw = min(block_kw, max(16, 8 * 32 * cfg["num_warps"] // cfg["BLOCK_N"]))

    def parts(w, shared):
        return (w.qweight, shared.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, shared.scales,
                shared.zeros if shared.zeros is not None else shared.scales)

    meta = dict(QUANT=True, BITS=gate_up.bits, IS_FP8=gate_up.kind == "fp8")
    hidden_words, inter_words = gate_up.qweight.shape[1], down.qweight.shape[1]
    return (dict(pointers=parts(gate_up, shared_gate_up), sizes=(hidden_words, gate_up.scales.shape[1]),
                 strides=(0, hidden_words),
                 meta=dict(meta, GROUP_WORDS=gate_up.group_size // pw,
                           BLOCK_KW=min(block_kw, triton.next_power_of_2(hidden_words)))),
            dict(pointers=parts(down, shared_down),
                 sizes=(inter_words, down.scales.shape[1], shared_down.qweight.shape[1], shared_down.scales.shape[1]),
                 strides=(0, inter_words),
                 meta=dict(meta, GROUP_WORDS=down.group_size // pw, SHARED_GROUP_WORDS=shared_down.group_size // pw,
                           BLOCK_KW=min(block_kw, triton.next_power_of_2(inter_words)))))


def _grouped_weight_args(w, p_shared, block_k: int) -> dict:
    """A grouped GEMM's expert-weight arguments (pointers: weight, shared weight, scales, zeros; strides: expert,
    row, scales row, zeros row; meta-parameters): float [E, N, K] weights, or a flattened QuantizedWeight [E N, K]
    read by dequant_tile (its BLOCK_K fitted to the group size)."""
    if not isinstance(w, QuantizedWeight):
        return dict(pointers=(w, p_shared, w, w), strides=(w.stride(0), w.stride(1), 0, 0),
                    meta=dict(QUANT=False, BITS=8, IS_FP8=False, PER_CHANNEL=True, GROUP_STEPS=1, BLOCK_K=block_k))
    block_k = dequant_block_k(block_k, w.kind, w.group_size, w.shape[1])
    zeros = w.zeros if w.zeros is not None else w.scales
    per_channel = w.scales.shape[1] == 1
    return dict(pointers=(w.qweight, w.qweight, w.scales, zeros),
                strides=(0, w.qweight.stride(0), w.scales.stride(0), zeros.stride(0)),
                meta=dict(QUANT=True, BITS=w.bits, IS_FP8=w.kind == "fp8", PER_CHANNEL=per_channel,
                          GROUP_STEPS=1 if per_channel else w.group_size // block_k, BLOCK_K=block_k))


def _shared_expert(x: torch.Tensor, gate_up, down, gemv: bool) -> torch.Tensor:
    """The shared expert run on its own (before its sigmoid gate). At decode sizes (`gemv`: the GEMV buckets) two
    fused GEMVs, SwiGLU in the first's epilogue: batch invariant like the rest of the decode path (cuBLAS is not:
    it picks its kernel by the row count); float weights with a strided last dimension, which the GEMVs do not
    take, and larger batches: cuBLAS + SwiGLU. Quantized: the fused GEMVs up to DECODE_MAX_TOKENS rows, else
    quant_linear_gemm (which dequantizes tile by tile) + SwiGLU."""
    if not isinstance(gate_up, QuantizedWeight):
        if gemv and gate_up.stride(-1) == 1 and down.stride(-1) == 1:
            return fused_linear(fused_linear(x, gate_up, swiglu=True), down)
        return F.linear(silu_and_mul(F.linear(x, gate_up)), down)
    if gemv or x.shape[0] <= DECODE_MAX_TOKENS:
        return quant_linear(quant_linear(x, gate_up, swiglu=True), down)
    return quant_linear_gemm(silu_and_mul(quant_linear_gemm(x, gate_up)), down)


def _shape(t: torch.Tensor | None):
    return None if t is None else list(t.shape)
