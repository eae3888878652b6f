"""The sampler on the device: logit bias and min_tokens' held-back stop tokens, repetition / presence / frequency
penalties, temperature, top-k, top-p, min-p and the seeded exponential-race draw over float logits [B, V], in two or
three launches and with no sort of the vocabulary. The same tokens as the PyTorch sampler (qwen2rt.sampling, the
CPU path and this file's reference) whenever no probability sits within float rounding of a top-p or min-p boundary.

Candidates are strictly ordered as qwen2rt.sampling.ordered_candidates orders them: penalised logit descending, then
token id ascending. Both live in one int64 key, (order-preserving int32 of the float) << 32 | (V - 1 - id), so a
plain integer max / top-k honours the tie rule exactly.

    greedy  1. per vocabulary chunk, the largest key of the raw logits        grid (chunks, B)
            2. the largest of the chunks' keys; record the token               grid (B,)
    topk    1. per chunk: bias, holds and penalties, then the NUM_CANDIDATES
               largest keys                                                    grid (chunks, B)
            2. merge them into the row's NUM_CANDIDATES largest, then
               temperature, top-k, top-p, min-p and the race among them;
               record the token                                                grid (B,)
    full    1. as topk, also writing the penalised logits and each chunk's
               softmax max / sum (the normaliser of the whole row)
            2. as topk; a row is finished there when its kept set provably
               ends inside the candidates (top_k <= NUM_CANDIDATES, or a
               top-p / min-p cut among them); other rows are flagged
            3. flagged rows only (one program per row, the others return):
               the top-k and top-p cuts by bisection over the float keys,
               then the race over the whole row                                grid (B,)

The "topk" form clamps top_k to NUM_CANDIDATES (0 = NUM_CANDIDATES) exactly as the PyTorch "topk" form does; both
are exact for rows with 1 <= top_k <= NUM_CANDIDATES (qwen2rt.sampling.sampler_variant). Step 3 costs up to ~70
passes over a row (two 32-step bisections): it runs only for flat distributions whose top-p set outgrows the
candidates, or NUM_CANDIDATES < top_k < V.

The uniforms of the race are qwen2rt.sampling.hash_uniform recomputed in-kernel with the same integer hash in uint32
arithmetic (wrap-around keeps the low 32 bits the int64 torch version keeps): bit-exact, so a seeded request draws
the same token in any batch. Everything has static shapes and no host synchronisation: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_CANDIDATES = 256  # = qwen2rt.sampling.TOPK_CANDIDATES: the candidates every row's draw sees in steps 1-2
FORMS = ("greedy", "topk", "full")  # = qwen2rt.sampling.VARIANTS
NONE_KEY: tl.constexpr = tl.constexpr(-(2 ** 63))  # below every real key: padding lanes past the vocabulary
NONE_KEY32: tl.constexpr = tl.constexpr(-(2 ** 31))  # the same for the int32 float keys (a NaN bit pattern)


# ---- shared device functions --------------------------------------------------------------------------------------

@triton.jit
def _mix32(x):
    """qwen2rt.sampling._mix32 on uint32: products wrap mod 2^32, the low 32 bits the int64 version keeps."""
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit
def _hash_uniform(seed, step, ids):
    """qwen2rt.sampling.hash_uniform: int64 scalars seed (>= 0) and step, int64 token ids -> float32 in (0, 1)."""
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s = _mix32(seed_lo ^ _mix32(seed_hi))
    s = _mix32(s ^ ((step & 0x7FFFFFFF).to(tl.uint32) * 0x9E3779B1))
    x = _mix32(s ^ (ids.to(tl.uint32) * 0x85EBCA6B))
    return ((x >> 9).to(tl.float32) + 0.5) * (1.0 / (1 << 23))


@triton.jit
def _float_key(z):
    """float32 -> int32 in the same order (negative floats have their magnitude bits flipped); an involution on the
    bit pattern, so _float_key(_float_key(z)) read back as float gives z."""
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_float(key32):
    return _float_key(key32.to(tl.int32).to(tl.float32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _index_bit(n: tl.constexpr, j: tl.constexpr):
    """Bit j of the flat index of each element of a [2] * n hypercube, shaped [1, .., 2, .., 1] to broadcast."""
    return tl.reshape(tl.arange(0, 2), [1] * (n - j - 1) + [2] + [1] * j)


@triton.jit
def _bitonic_merge(h, n: tl.constexpr, s: tl.constexpr, ALL_DESCENDING: tl.constexpr):
    """Bitonic blocks of 2^s elements of the [2] * n hypercube h -> sorted blocks: all descending, or alternating
    by bit s of the index (descending where it is 0). Each step pairs the elements whose indices differ in bit j; the
    partner is the pair's sum minus oneself (an exact add in wrap-around integer arithmetic), a plain sum that the
    interpreter runs as one numpy call."""
    if ALL_DESCENDING:
        ascending = False
    else:
        ascending = _index_bit(n, s) != 0
    for i in tl.static_range(s):
        h = _compare_swap(h, ascending, n, s - 1 - i)
    return h


@triton.jit
def _compare_swap(h, ascending, n: tl.constexpr, j: tl.constexpr):
    partner = tl.sum(h, axis=n - 1 - j, keep_dims=True) - h
    take_max = (_index_bit(n, j) != 0) == ascending  # the left of a descending pair takes the larger
    return tl.where(take_max, tl.maximum(h, partner), tl.minimum(h, partner))


@triton.jit
def _halve(h, n: tl.constexpr, LOG_K: tl.constexpr):
    """[2] * n -> [2] * (n - 1): the larger of the two blocks of 2^LOG_K that differ in bit LOG_K (one sorted
    descending, one ascending: their elementwise max holds the top 2^LOG_K of both, bitonic), merged again."""
    h = tl.max(h, axis=n - 1 - LOG_K)
    return _bitonic_merge(h, n - 1, LOG_K, n - 1 == LOG_K)


@triton.jit
def _top_keys(x, LOG_N: tl.constexpr, LOG_K: tl.constexpr, SORTED: tl.constexpr):
    """The 2^LOG_K largest of the 2^LOG_N int64 keys x, in descending order (a bitonic top-k: sort blocks of 2^LOG_K,
    then halve the array by taking the larger of each pair of opposite-order blocks and merge again). SORTED: x's
    blocks of 2^LOG_K are sorted already, descending and ascending in turn (block 0 descending), so the sort is
    skipped. For the step-2 merge of the chunks' sorted candidates that is most of the work; for sm_90 it halves
    the compile time and takes the registers from ~190 to ~106."""
    if LOG_K == 0:
        top = tl.max(x, 0, keep_dims=True)
    else:
        h = tl.reshape(x, [2] * LOG_N)
        if not SORTED:
            for s in tl.static_range(1, LOG_K + 1):
                h = _bitonic_merge(h, LOG_N, s, s == LOG_N)
        for r in tl.static_range(LOG_N - LOG_K):
            h = _halve(h, LOG_N - r, LOG_K)
        top = tl.reshape(h, [1 << LOG_K])
    return top


@triton.jit
def _record(counts_ptr, seen_ptr, slot, token, stride_state, m_write):
    """counts[slot, token] += 1, seen[slot, token] = True. Padding rows share the last slot: an atomic add."""
    p_state = slot * stride_state + token
    tl.atomic_add(counts_ptr + p_state, 1, mask=m_write)
    tl.store(seen_ptr + p_state, 1, mask=m_write)


# ---- step 1: per-chunk candidates ---------------------------------------------------------------------------------

@triton.jit
def _candidates_kernel(
    # pointers
    logits_ptr, counts_ptr, seen_ptr, slot_ptr, temperature_ptr, repetition_ptr, presence_ptr, frequency_ptr,
    bias_ptr, held_ptr, use_bias_ptr, min_tokens_ptr, step_ptr,
    keys_ptr, stats_ptr, z_ptr,
    # sizes
    vocab, num_chunks,
    # strides
    stride_logits, stride_state,
    # meta-parameters
    LOG_CHUNK: tl.constexpr, LOG_CAND: tl.constexpr, PENALTIES: tl.constexpr, STATS: tl.constexpr,
    STORE_Z: tl.constexpr, BIAS_HOLDS: tl.constexpr,
):
    CHUNK: tl.constexpr = 1 << LOG_CHUNK
    NUM_CAND: tl.constexpr = 1 << LOG_CAND
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_v = i_c * CHUNK + tl.arange(0, CHUNK)
    m_v = o_v < vocab
    b_z = tl.load(logits_ptr + i_b * stride_logits + o_v, mask=m_v, other=0.0).to(tl.float32)
    if PENALTIES:
        slot = tl.load(slot_ptr + i_b)
        p_state = slot * stride_state + o_v
        if BIAS_HOLDS:  # qwen2rt.sampling.apply_bias_and_holds; rows without them load nothing (bound 0)
            m_bias = o_v < tl.where(tl.load(use_bias_ptr + i_b) != 0, vocab, 0)
            b_z = tl.where(m_bias, b_z + tl.load(bias_ptr + p_state, mask=m_bias, other=0.0), b_z)
            m_holding = o_v < tl.where(tl.load(step_ptr + i_b) < tl.load(min_tokens_ptr + i_b), vocab, 0)
            b_held = tl.load(held_ptr + p_state, mask=m_holding, other=0) != 0
            b_z = tl.where(b_held, float("-inf"), b_z)
        # qwen2rt.sampling.apply_penalties rounding for rounding (the launch disables FMA contraction):
        # where(seen, l > 0 ? l / rep : l * rep, l) - frequency * count - presence * (count > 0)
        b_seen = tl.load(seen_ptr + p_state, mask=m_v, other=0) != 0
        b_count = tl.load(counts_ptr + p_state, mask=m_v, other=0).to(tl.float32)
        repetition = tl.load(repetition_ptr + i_b)
        b_rep = tl.where(b_z > 0, tl.math.div_rn(b_z, repetition), b_z * repetition)
        b_z = tl.where(b_seen, b_rep, b_z)
        b_z = b_z - tl.load(frequency_ptr + i_b) * b_count
        b_z = b_z - tl.load(presence_ptr + i_b) * (b_count > 0).to(tl.float32)
    b_key = (_float_key(b_z).to(tl.int64) << 32) | (vocab - 1 - o_v)
    b_key = tl.where(m_v, b_key, NONE_KEY)
    b_top = _top_keys(b_key, LOG_CHUNK, LOG_CAND, False)  # [CHUNK] -> [NUM_CAND], descending
    tl.store(keys_ptr + (i_b * num_chunks + i_c) * NUM_CAND + tl.arange(0, NUM_CAND), b_top)
    if STATS:  # this chunk's softmax max and sum at the row's temperature (greedy rows: 1)
        temperature = tl.load(temperature_ptr + i_b)
        temperature = tl.where(temperature > 0, temperature, 1.0)
        b_zt = tl.where(m_v, tl.math.div_rn(b_z, temperature), float("-inf"))
        chunk_max = tl.max(b_zt, 0)
        # a chunk whose every token is held back (-inf) adds nothing (not exp(-inf - -inf) = NaN)
        chunk_sum = tl.where(chunk_max > float("-inf"), tl.sum(tl.exp(b_zt - chunk_max), 0), 0.0)
        tl.store(stats_ptr + (i_b * num_chunks + i_c) * 2, chunk_max)
        tl.store(stats_ptr + (i_b * num_chunks + i_c) * 2 + 1, chunk_sum)
    if STORE_Z:
        tl.store(z_ptr + i_b * vocab + o_v, b_z, mask=m_v)


# ---- step 2: merge, filter and draw among the candidates ----------------------------------------------------------

@triton.jit
def _draw_kernel(
    # pointers
    keys_ptr, stats_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, slot_ptr,
    counts_ptr, seen_ptr, tokens_ptr, fallback_ptr,
    # sizes
    vocab, num_chunks,
    # strides
    stride_state,
    # meta-parameters
    LOG_CAND: tl.constexpr, LOG_CHUNKS_PAD: tl.constexpr, GREEDY: tl.constexpr, FULL: tl.constexpr,
):
    NUM_CAND: tl.constexpr = 1 << LOG_CAND
    CHUNKS_PAD: tl.constexpr = 1 << LOG_CHUNKS_PAD
    i_b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + i_b)
    o_c = tl.arange(0, CHUNKS_PAD)
    o_n = tl.arange(0, NUM_CAND)
    # [CHUNKS_PAD, NUM_CAND] -> [CHUNKS_PAD * NUM_CAND] -> the row's NUM_CAND largest keys, descending. Each chunk's
    # keys are stored descending; odd chunks are read back to front, so the blocks alternate as _top_keys wants.
    o_read = tl.where((o_c % 2 == 0)[:, None], o_n[None, :], NUM_CAND - 1 - o_n[None, :])
    p_keys = keys_ptr + (i_b * num_chunks + o_c[:, None]) * NUM_CAND + o_read
    b_keys = tl.load(p_keys, mask=(o_c < num_chunks)[:, None], other=NONE_KEY)
    b_top = _top_keys(tl.reshape(b_keys, [CHUNKS_PAD * NUM_CAND]), LOG_CHUNKS_PAD + LOG_CAND, LOG_CAND, True)
    b_id = vocab - 1 - (b_top & 0xFFFFFFFF)
    top_id = tl.max(tl.where(o_n == 0, b_id, -1), 0)  # argmax, ties toward the lower id
    if GREEDY:
        tl.store(tokens_ptr + i_b, top_id)
        _record(counts_ptr, seen_ptr, slot, top_id, stride_state, top_id >= 0)
    else:
        m_valid = b_top != NONE_KEY  # fewer than NUM_CAND tokens in the vocabulary
        temperature = tl.load(temperature_ptr + i_b)
        hot = temperature > 0
        temperature = tl.where(hot, temperature, 1.0)
        b_zt = tl.math.div_rn(_key_float(b_top >> 32), temperature)
        top_zt = tl.max(tl.where(m_valid, b_zt, float("-inf")), 0)
        b_e = tl.where(m_valid, tl.exp(b_zt - top_zt), 0.0)  # exp of logit - max: probability * normaliser
        top_k = tl.load(top_k_ptr + i_b)
        if FULL:
            k = tl.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        else:  # the PyTorch "topk" form's rule: top_k among the NUM_CAND candidates (0 = all of them)
            n = tl.minimum(vocab, NUM_CAND)
            k = tl.where(top_k > 0, tl.minimum(top_k, n), n)
        m_topk = (o_n < k) & m_valid
        norm = tl.sum(tl.where(m_topk, b_e, 0.0), 0)
        if FULL:  # no top-k: the normaliser of the whole row, from the chunks' max / sum
            o_s = stats_ptr + (i_b * num_chunks + o_c) * 2
            b_chunk_max = tl.load(o_s, mask=o_c < num_chunks, other=float("-inf"))
            b_chunk_sum = tl.load(o_s + 1, mask=o_c < num_chunks, other=0.0)
            row_norm = tl.sum(b_chunk_sum * tl.exp(b_chunk_max - top_zt), 0)
            norm = tl.where(k >= vocab, row_norm, norm)
        b_p = b_e / norm
        # top-p: drop a token once the mass before it reaches top_p; min-p: below min_p x the top probability
        top_p = tl.load(top_p_ptr + i_b)
        top_p = tl.where(top_p < 1.0, top_p, float("inf"))  # top_p = 1 keeps all, whatever the rounding of the sum
        m_cut = (tl.cumsum(b_p, 0) - b_p >= top_p) | (b_p < tl.load(min_p_ptr + i_b) * (1.0 / norm))
        m_keep = m_topk & ~(m_cut & (o_n > 0))
        # the race: argmax p / E, E = -log U ~ Exp(1); ties toward the earlier candidate, as torch.argmax
        b_noise = -tl.log(_hash_uniform(tl.load(seed_ptr + i_b), tl.load(step_ptr + i_b), b_id))
        b_score = tl.where(m_keep, b_p / b_noise, -1.0)
        winner = tl.argmax(b_score, 0)
        token = tl.where(hot, tl.max(tl.where(o_n == winner, b_id, -1), 0), top_id)
        if FULL:  # finished here when the kept set provably ends among the candidates
            cut_inside = tl.sum((m_cut & m_valid & (o_n > 0)).to(tl.int32), 0) > 0
            done = (~hot) | (k <= NUM_CAND) | ((k >= vocab) & cut_inside)
        else:
            done = token >= 0  # always
        tl.store(tokens_ptr + i_b, token)
        tl.store(fallback_ptr + i_b, tl.where(done, 0, 1).to(tl.int32))
        _record(counts_ptr, seen_ptr, slot, token, stride_state, done)


# ---- step 3: rows whose kept set outgrows the candidates ----------------------------------------------------------

@triton.jit
def _row_block(z_ptr, o_v, vocab):
    """(penalised logits, their int32 keys, mask) of one block of a row; keys past the vocabulary are NONE_KEY32."""
    m_v = o_v < vocab
    b_z = tl.load(z_ptr + o_v, mask=m_v, other=float("-inf"))
    return b_z, tl.where(m_v, _float_key(b_z), NONE_KEY32), m_v


@triton.jit
def _count_at_least(z_ptr, vocab, threshold, BLOCK: tl.constexpr):
    """How many tokens of the row have key >= threshold (int64)."""
    b_count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        _, b_key, m_v = _row_block(z_ptr, start + tl.arange(0, BLOCK), vocab)
        b_count += (m_v & (b_key >= threshold)).to(tl.int32)
    return tl.sum(b_count, 0)


@triton.jit
def _mass_above(z_ptr, vocab, threshold, temperature, top_zt, BLOCK: tl.constexpr):
    """sum of exp(z / T - max) over the tokens with key > threshold (int64)."""
    b_mass = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        b_z, b_key, m_v = _row_block(z_ptr, start + tl.arange(0, BLOCK), vocab)
        b_e = tl.exp(tl.math.div_rn(b_z, temperature) - top_zt)
        b_mass += tl.where(m_v & (b_key > threshold), b_e, 0.0)
    return tl.sum(b_mass, 0)


@triton.jit
def _fallback_kernel(
    # pointers
    z_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, slot_ptr, counts_ptr, seen_ptr,
    tokens_ptr, fallback_ptr,
    # sizes
    vocab,
    # strides
    stride_state,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    if tl.load(fallback_ptr + i_b) != 0:
        p_z = z_ptr + i_b * vocab
        temperature = tl.load(temperature_ptr + i_b)
        temperature = tl.where(temperature > 0, temperature, 1.0)
        b_top = tl.full([BLOCK], NONE_KEY32, dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            _, b_key, _ = _row_block(p_z, start + tl.arange(0, BLOCK), vocab)
            b_top = tl.maximum(b_top, b_key)
        top_key = tl.max(b_top, 0).to(tl.int64)
        top_zt = tl.math.div_rn(_key_float(top_key), temperature)

        # top-k: cut_k = the largest key value with at least k tokens at or above it; of the tokens equal to it,
        # the r_k lowest ids stay. No top-k: everything stays (cut_k below every real key).
        top_k = tl.load(top_k_ptr + i_b)
        has_top_k = (top_k > 0) & (top_k < vocab)
        lo = tl.full([], NONE_KEY32, dtype=tl.int64)  # at least k at or above: invariant
        hi = top_key + 1  # fewer than k at or above: invariant
        if has_top_k:
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                enough = _count_at_least(p_z, vocab, mid, BLOCK) >= top_k
                lo = tl.where(enough, mid, lo)
                hi = tl.where(enough, hi, mid)
        cut_k = lo
        r_k = tl.where(has_top_k, top_k - _count_at_least(p_z, vocab, cut_k + 1, BLOCK), vocab)
        e_k = tl.exp(tl.math.div_rn(_key_float(cut_k), temperature) - top_zt)
        norm = _mass_above(p_z, vocab, cut_k, temperature, top_zt, BLOCK)
        norm += tl.where(has_top_k, r_k.to(tl.float32) * e_k, 0.0)

        # top-p: cut_p = the smallest key value (>= cut_k) with mass strictly above it < top_p; of the tokens
        # equal to it, those with mass before them < top_p stay.
        top_p = tl.load(top_p_ptr + i_b)
        has_top_p = top_p < 1.0
        lo = cut_k - 1  # mass above >= top_p
        hi = top_key  # mass above < top_p
        mass_hi = 0.0
        if has_top_p:
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                mass = _mass_above(p_z, vocab, mid, temperature, top_zt, BLOCK)
                below = mass / norm < top_p
                lo = tl.where(below, lo, mid)
                hi = tl.where(below, mid, hi)
                mass_hi = tl.where(below, mass, mass_hi)
        cut_p = tl.where(has_top_p, hi, cut_k - 1)  # no top-p: every key the top-k keeps is above cut_p
        e_p = tl.exp(tl.math.div_rn(_key_float(cut_p), temperature) - top_zt)

        # the race over the row; the ranks among equal keys count lower ids first
        min_p = tl.load(min_p_ptr + i_b)
        seed = tl.load(seed_ptr + i_b)
        step = tl.load(step_ptr + i_b)
        seen_k = 0
        seen_p = 0
        best_score = -1.0
        best_id = top_key * 0
        for start in range(0, vocab, BLOCK):
            o_v = start + tl.arange(0, BLOCK)
            b_z, b_key, m_v = _row_block(p_z, o_v, vocab)
            b_p = tl.exp(tl.math.div_rn(b_z, temperature) - top_zt) / norm
            m_eq_k = (m_v & (b_key == cut_k)).to(tl.int32)
            m_eq_p = (m_v & (b_key == cut_p)).to(tl.int32)
            b_rank_k = seen_k + tl.cumsum(m_eq_k, 0) - m_eq_k
            b_rank_p = seen_p + tl.cumsum(m_eq_p, 0) - m_eq_p
            seen_k += tl.sum(m_eq_k, 0)
            seen_p += tl.sum(m_eq_p, 0)
            m_keep = m_v & ((b_key > cut_k) | ((m_eq_k != 0) & (b_rank_k < r_k)))
            m_keep_p = (b_key > cut_p) | ((m_eq_p != 0) & ((mass_hi + b_rank_p.to(tl.float32) * e_p) / norm < top_p))
            m_keep = m_keep & m_keep_p & ~(b_p < min_p * (1.0 / norm))
            b_noise = -tl.log(_hash_uniform(seed, step, o_v))
            b_score = tl.where(m_keep, b_p / b_noise, -1.0)
            block_best = tl.max(b_score, 0)
            block_id = start + tl.argmax(b_score, 0)
            better = block_best > best_score  # strict: an earlier block (lower ids) keeps a tie
            best_id = tl.where(better, block_id, best_id)
            best_score = tl.where(better, block_best, best_score)
        tl.store(tokens_ptr + i_b, best_id)
        _record(counts_ptr, seen_ptr, tl.load(slot_ptr + i_b), best_id, stride_state, best_id >= 0)


# ---- a test hook: the in-kernel hash --------------------------------------------------------------------------------

@triton.jit
def _hash_uniform_kernel(
    # pointers
    seed_ptr, step_ptr, ids_ptr, out_ptr,
    # sizes
    n,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n
    b_ids = tl.load(ids_ptr + o_n, mask=m_n, other=0)
    u = _hash_uniform(tl.load(seed_ptr + i_b), tl.load(step_ptr + i_b), b_ids)
    tl.store(out_ptr + i_b * n + o_n, u, mask=m_n)


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The sampler's in-kernel uniforms: [B] int64 seeds and steps, [N] int64 token ids -> [B, N] float32 (for
    testing them against qwen2rt.sampling.hash_uniform)."""
    b, n = seed.shape[0], token_ids.shape[0]
    out = torch.empty(b, n, dtype=torch.float32, device=seed.device)
    block = 1024
    _hash_uniform_kernel[(b, triton.cdiv(n, block))](seed, step, token_ids, out, n, BLOCK=block)
    return out


# ---- launcher -----------------------------------------------------------------------------------------------------

def chunk_size(vocab: int, num_cand: int) -> int:
    """Tokens per step-1 program: at most ~32 chunks per row (step 2 merges chunks x num_cand keys in one program),
    at least num_cand, and 1024 unless the vocabulary is smaller."""
    return max(num_cand, min(1024, triton.next_power_of_2(vocab)), triton.next_power_of_2(triton.cdiv(vocab, 32)))


def _warps(elements: int) -> int:
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16


ROW_FIELDS = {"temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float32, "min_p": torch.float32,
              "repetition": torch.float32, "presence": torch.float32, "frequency": torch.float32,
              "seed": torch.int64, "step": torch.int64, "slot": torch.int64, "min_tokens": torch.int64,
              "bias": torch.int64}


def sample(logits: torch.Tensor, rows, counts: torch.Tensor, seen: torch.Tensor, form: str = "full", *,
           chunk: int | None = None, bias: torch.Tensor | None = None,
           held: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B] int64 from logits [B, V] (float32, bfloat16 or float16; rows may be strided), and records each
    token: counts[rows.slot, token] += 1, seen[rows.slot, token] = True.

    rows: per-row parameters, [B] tensors with the fields of qwen2rt.sampling.SamplingRows (ROW_FIELDS' dtypes);
    counts [S, V] int32 and seen [S, V] bool: the penalties' state, row rows.slot of each. bias [S, V] float32 and
    held [S, V] bool, both or neither: the rows' logit bias (added where rows.bias = 1) and the tokens held back
    while rows.step < rows.min_tokens (qwen2rt.sampling.apply_bias_and_holds); neither compiles them out. form:
    "greedy" (argmax of the raw logits: rows must ask for no bias or hold), "topk" (exact for rows with
    1 <= top_k <= NUM_CANDIDATES, as the PyTorch form) or "full". chunk: tokens per step-1 program (a power of two
    >= the candidates; default chunk_size)."""
    if form not in FORMS:
        raise ValueError(f"sampler form must be one of {FORMS}, got {form!r}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with unit stride along V, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError(f"logits must hold at least one token (V >= 1), got shape {tuple(logits.shape)}")
    if vocab >= 2 ** 31:
        raise ValueError(f"vocabulary of {vocab} tokens: token ids must fit in 31 bits")
    if (bias is None) != (held is None):
        raise ValueError("bias and held go together: pass both (SamplerState.bias, .held) or neither")
    state = [("counts", counts, torch.int32), ("seen", seen, torch.bool)]
    if bias is not None:
        state += [("bias", bias, torch.float32), ("held", held, torch.bool)]
    for name, t, dtype in state:
        if t.dim() != 2 or t.shape[1] != vocab or t.dtype != dtype or not t.is_contiguous() \
                or t.device != logits.device:
            raise ValueError(f"{name} must be a contiguous [S, {vocab}] {dtype} tensor on {logits.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
        if t.shape != counts.shape:
            raise ValueError(f"counts {tuple(counts.shape)} and {name} {tuple(t.shape)} must have the same shape")
    for name, dtype in ROW_FIELDS.items():
        t = getattr(rows, name)
        if t.shape != (batch,) or t.dtype != dtype or t.device != logits.device or not t.is_contiguous():
            raise ValueError(f"rows.{name} must be a contiguous [{batch}] {dtype} tensor on {logits.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return tokens
    greedy, full = form == "greedy", form == "full"
    num_cand = 1 if greedy else NUM_CANDIDATES
    chunk = chunk or chunk_size(vocab, num_cand)
    if chunk < num_cand or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= {num_cand}, got {chunk}")
    num_chunks = triton.cdiv(vocab, chunk)
    dev = logits.device
    keys = torch.empty(batch, num_chunks, num_cand, dtype=torch.int64, device=dev)
    stats = torch.empty(batch, num_chunks, 2, dtype=torch.float32, device=dev) if full else keys
    z = torch.empty(batch, vocab, dtype=torch.float32, device=dev) if full else keys
    fallback = torch.empty(batch, dtype=torch.int32, device=dev)
    seen_bytes = seen.view(torch.uint8)
    r = rows
    holds = bias is not None and not greedy
    _candidates_kernel[(num_chunks, batch)](
        logits, counts, seen_bytes, r.slot, r.temperature, r.repetition, r.presence, r.frequency,
        bias if holds else counts, held.view(torch.uint8) if holds else seen_bytes, r.bias, r.min_tokens, r.step,
        keys, stats, z,
        vocab, num_chunks,
        logits.stride(0), counts.stride(0),
        LOG_CHUNK=chunk.bit_length() - 1, LOG_CAND=num_cand.bit_length() - 1, PENALTIES=not greedy, STATS=full,
        STORE_Z=full, BIAS_HOLDS=holds,
        num_warps=_warps(chunk), enable_fp_fusion=False)
    chunks_pad = triton.next_power_of_2(num_chunks)
    _draw_kernel[(batch,)](
        keys, stats, r.temperature, r.top_k, r.top_p, r.min_p, r.seed, r.step, r.slot, counts, seen_bytes, tokens,
        fallback,
        vocab, num_chunks,
        counts.stride(0),
        LOG_CAND=num_cand.bit_length() - 1, LOG_CHUNKS_PAD=chunks_pad.bit_length() - 1, GREEDY=greedy, FULL=full,
        num_warps=min(8, _warps(chunks_pad * num_cand)))  # 16 warps cap registers at 128: spills
    if full:
        block = min(2048, triton.next_power_of_2(vocab))
        _fallback_kernel[(batch,)](
            z, r.temperature, r.top_k, r.top_p, r.min_p, r.seed, r.step, r.slot, counts, seen_bytes, tokens,
            fallback,
            vocab,
            counts.stride(0),
            BLOCK=block, num_warps=_warps(block))
    return tokens


def sample_ref(logits: torch.Tensor, rows, counts: torch.Tensor, seen: torch.Tensor, form: str = "full", *,
               bias: torch.Tensor | None = None, held: torch.Tensor | None = None):
    """The PyTorch reference (qwen2rt.sampling's torch sampler, also the CPU path): same arguments as `sample`."""
    from qwen2rt.sampling import sample_tokens_ref

    return sample_tokens_ref(logits, rows, counts, seen, form, bias=bias, held=held)
