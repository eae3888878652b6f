"""Fused RoPE-attention: qwen2rt's paged decode and prefill kernels vs `F.scaled_dot_product_attention` on a
contiguous cache (the best torch has; it does no RoPE and no cache append, so the comparison favours it).

Decode: batch 1 and 16, context 512 / 4K / 32K, Qwen2-0.5B (14:2 heads, D 64) and Qwen2-7B (28:4, D 128) layouts;
GB/s on the KV bytes read and % of the measured copy bandwidth. Prefill: 2048 tokens, causal; TFLOP/s.

    python -m benchmarks.bench_attention [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row
from qwen2rt.kernels import decode_attention, prefill_attention

LAYOUTS = {"qwen2-0.5b": (14, 2, 64), "qwen2-7b": (28, 4, 128)}
BLOCK_SIZE = 16


def _rope(d, max_pos, device):
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    f = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv[None]
    return f.cos().contiguous(), f.sin().contiguous()


def _paged(batch, ctx, hkv, d, device, dtype):
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    k = torch.randn(batch * blocks_per_seq, BLOCK_SIZE, hkv, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq).to(torch.int32)
    return k, v, tables


def decode_rows(device, ceilings, layouts, batches, contexts, dtype):
    rows = []
    for name, (hq, hkv, d) in layouts.items():
        cos, sin = _rope(d, max(contexts) + 1, device)
        for b in batches:
            for ctx in contexts:
                k, v, tables = _paged(b, ctx, hkv, d, device, dtype)
                qkv = torch.randn(b, (hq + 2 * hkv) * d, device=device, dtype=dtype)
                pos = torch.full((b,), ctx - 1, dtype=torch.long, device=device)
                slots = (tables[:, (ctx - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
                kv_bytes = 2 * b * ctx * hkv * d * k.element_size()
                shape = f"{name} B={b} ctx={ctx}"
                ours = bench_ms(lambda: decode_attention(qkv, k, v, cos, sin, pos, slots, tables, lens, hq, hkv,
                                                         d ** -0.5), device)
                rows.append(kernel_row("attention_decode", shape, "qwen2rt", ours, kv_bytes, None, ceilings))
                q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
                kc = torch.randn(b, hkv, ctx, d, device=device, dtype=dtype)
                vc = torch.randn_like(kc)
                sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), device)
                rows.append(kernel_row("attention_decode", shape, "torch_sdpa", sdpa, kv_bytes, None, ceilings))
    return rows


def prefill_rows(device, ceilings, layouts, tokens, dtype):
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
        ours = bench_ms(lambda: prefill_attention(qkv, k, v, cos, sin, pos, slots, tables, lens, starts, tokens,
                                                  hq, hkv, d ** -0.5), device)
        rows.append(kernel_row("attention_prefill", shape, "qwen2rt", ours, None, flops, ceilings))
        q = torch.randn(1, hq, tokens, d, device=device, dtype=dtype)
        kc = torch.randn(1, hkv, tokens, d, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, is_causal=True, enable_gqa=True), device)
        rows.append(kernel_row("attention_prefill", shape, "torch_sdpa", sdpa, None, flops, ceilings))
    return rows


def run(device, ceilings, smoke=False):
    if smoke:  # the interpreter: tiny contexts, fp32
        layouts = {"qwen2-0.5b": LAYOUTS["qwen2-0.5b"]}
        return (decode_rows(device, ceilings, layouts, [1, 2], [40], torch.float32)
                + prefill_rows(device, ceilings, layouts, 24, torch.float32))
    return (decode_rows(device, ceilings, LAYOUTS, [1, 16], [512, 4096, 32768], torch.bfloat16)
            + prefill_rows(device, ceilings, LAYOUTS, 2048, torch.bfloat16))


def main(argv=None):
    return kernel_bench_main(__doc__, argv, run, dict(smoke=True))


if __name__ == "__main__":
    main()
