"""Fused RoPE-attention: qwen2rt's paged decode and prefill kernels vs `F.scaled_dot_product_attention` on a
contiguous cache (the best torch has; it does no RoPE and no cache append, so the comparison favours it).

Decode: Qwen2-7B layout (28:4 heads, D 128) at batch 1, contexts 1K / 4K / 16K / 32K, with block tables for the
engine's default max_seq_len (131072) as the engine allocates them, and again with tables just as long as the context
(qwen2rt_tables_at_ctx: the split count depends only on each sequence's own length, so the two should match); batch
16 at 4K; Qwen2-0.5B (14:2, D 64) at batch 1. GB/s on the KV bytes read and % of the measured copy bandwidth.
Each timed call reads another copy of the cache (enough copies to overflow L2, as bench_gemv rotates weights): in a
real decode step a layer's K/V comes from HBM, between the weights of the other layers; most of these caches
(2-34 MB) would otherwise be served from a 50 MB L2.
Prefill: 2048 tokens (and 8192 on the 7B layout), causal; TFLOP/s; the launcher's default tiles (qwen2rt) and
each of kernels.rope_attention.PREFILL_CANDIDATES beside it (qwen2rt_m<BLOCK_M>n<BLOCK_N>w<warps>s<stages>), to
choose the default from.

    python -m benchmarks.bench_attention [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks.bench_gemv import L2_BYTES
from benchmarks.common import bench_ms, kernel_bench_main, kernel_row
from qwen2rt.kernels import decode_attention, prefill_attention
from qwen2rt.kernels.rope_attention import PREFILL_CANDIDATES

LAYOUTS = {"qwen2-0.5b": (14, 2, 64), "qwen2-7b": (28, 4, 128)}
BLOCK_SIZE = 16
MAX_SEQ_LEN = 131072  # the engine's default: what sizes the decode grid
# (layout, batch, contexts): batch 1 at long contexts is where the split-KV grid matters
DECODE_SHAPES = [("qwen2-7b", 1, [1024, 4096, 16384, 32768]), ("qwen2-7b", 16, [4096]),
                 ("qwen2-0.5b", 1, [4096, 32768])]


def _rope(d, max_pos, device):
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    f = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv[None]
    return f.cos().contiguous(), f.sin().contiguous()


def _paged(batch, ctx, hkv, d, device, dtype, max_seq_len=None):
    """A cache with the blocks of `batch` sequences of ctx tokens in random order, and block tables max_seq_len wide
    (entries past a sequence's blocks are 0: never read)."""
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    k = torch.randn(batch * blocks_per_seq, BLOCK_SIZE, hkv, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    width = max(blocks_per_seq, -(-(max_seq_len or 0) // BLOCK_SIZE))
    tables = torch.zeros(batch, width, dtype=torch.int32, device=device)
    tables[:, :blocks_per_seq] = torch.randperm(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    return k, v, tables


def decode_rows(device, ceilings, shapes, dtype, max_seq_len=MAX_SEQ_LEN):
    rows = []
    for name, b, contexts in shapes:
        hq, hkv, d = LAYOUTS[name]
        cos, sin = _rope(d, max(max_seq_len, *contexts) + 1, device)
        for ctx in contexts:
            qkv = torch.randn(b, (hq + 2 * hkv) * d, device=device, dtype=dtype)
            pos = torch.full((b,), ctx - 1, dtype=torch.long, device=device)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
            kv_bytes = 2 * b * ctx * hkv * d * qkv.element_size()
            shape = f"{name} B={b} ctx={ctx} max={max_seq_len}"
            # the engine's tables (max_seq_len wide), and at batch 1 tables just as long as the context
            widths = {"qwen2rt": max_seq_len}
            if b == 1:
                widths["qwen2rt_tables_at_ctx"] = None
            copies = max(1, -(-L2_BYTES // kv_bytes)) if device.type == "cuda" else 1
            for impl, width in widths.items():
                caches = []
                for _ in range(copies):
                    k, v, tables = _paged(b, ctx, hkv, d, device, dtype, width)
                    slots = tables[:, (ctx - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE
                    caches.append((k, v, slots, tables))
                cycle = itertools.cycle(caches)  # advanced per call as the calls are captured: one copy each

                def ours_call():
                    k, v, slots, tables = next(cycle)
                    return decode_attention(qkv, k, v, cos, sin, pos, slots, tables, lens, hq, hkv, d ** -0.5)
                ours = bench_ms(ours_call, device)
                rows.append(kernel_row("attention_decode", shape, impl, ours, kv_bytes, None, ceilings))
                caches = cycle = None  # freed before the next copies are made
            q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
            contiguous = [(torch.randn(b, hkv, ctx, d, device=device, dtype=dtype),
                           torch.randn(b, hkv, ctx, d, device=device, dtype=dtype)) for _ in range(copies)]
            cycle = itertools.cycle(contiguous)
            sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, *next(cycle), enable_gqa=True), device)
            rows.append(kernel_row("attention_decode", shape, "torch_sdpa", sdpa, kv_bytes, None, ceilings))
            contiguous = cycle = None
    return rows


def config_label(cfg: dict) -> str:
    return f"qwen2rt_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"


def prefill_rows(device, ceilings, layouts, tokens, dtype, candidates=PREFILL_CANDIDATES):
    rows = []
    for name, (hq, hkv, d) in layouts.items():
        cos, sin = _rope(d, tokens + 1, device)
        k, v, tables = _paged(1, tokens, hkv, d, device, dtype)
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=device, dtype=dtype)
        pos = torch.arange(tokens, device=device)
        slots = tables[0].long().repeat_interleave(BLOCK_SIZE)[:tokens] * BLOCK_SIZE + pos % BLOCK_SIZE
        lens = torch.tensor([tokens], dtype=torch.int32, device=device)
        starts = torch.tensor([0, tokens], dtype=torch.int32, device=device)
        flops = 4 * hq * d * tokens * tokens / 2  # causal: half of QK^T and PV
        shape = f"{name} T={tokens}"
        for impl, cfg in [("qwen2rt", None)] + [(config_label(c), c) for c in candidates]:
            ours = bench_ms(lambda: prefill_attention(qkv, k, v, cos, sin, pos, slots, tables, lens, starts, tokens,
                                                      hq, hkv, d ** -0.5, config=cfg), device)
            rows.append(kernel_row("attention_prefill", shape, impl, ours, None, flops, ceilings))
        q = torch.randn(1, hq, tokens, d, device=device, dtype=dtype)
        kc = torch.randn(1, hkv, tokens, d, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, is_causal=True, enable_gqa=True), device)
        rows.append(kernel_row("attention_prefill", shape, "torch_sdpa", sdpa, None, flops, ceilings))
    return rows


def run(device, ceilings, smoke=False):
    if smoke:  # the interpreter: tiny contexts, fp32, a max context of a few chunks
        layouts = {"qwen2-0.5b": LAYOUTS["qwen2-0.5b"]}
        return (decode_rows(device, ceilings, [("qwen2-0.5b", 1, [40]), ("qwen2-0.5b", 2, [40])], torch.float32,
                            max_seq_len=600)
                + prefill_rows(device, ceilings, layouts, 24, torch.float32, PREFILL_CANDIDATES[-1:]))
    return (decode_rows(device, ceilings, DECODE_SHAPES, torch.bfloat16)
            + prefill_rows(device, ceilings, LAYOUTS, 2048, torch.bfloat16)
            + prefill_rows(device, ceilings, {"qwen2-7b": LAYOUTS["qwen2-7b"]}, 8192, torch.bfloat16))


def main(argv=None):
    return kernel_bench_main(__doc__, argv, run, dict(smoke=True))


if __name__ == "__main__":
    main()
