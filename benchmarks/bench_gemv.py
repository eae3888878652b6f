"""Decode projections: qwen2rt's fused GEMV (with its norm / bias / SwiGLU / residual fused in, as the model runs it)
and the same GEMV without fusions vs cuBLAS (`F.linear`, the projection alone) at M = 1..32 rows, on every
projection of Qwen2-0.5B / 1.5B / 7B / 72B and lm_head; GB/s and % of the measured copy bandwidth. Each call reads a
different copy of the weights (enough copies to overflow L2), so no timing is served from cache.

    python -m benchmarks.bench_gemv [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row
from qwen2rt.kernels import fused_linear
from qwen2rt.models.config import builtin_config

MODELS = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b"]
ROWS = [1, 2, 4, 8, 16, 32]
L2_BYTES = 128 << 20  # more than any current GPU's L2 (H100 50 MB, H200 60 MB)


def projections(config) -> list[tuple[str, int, int, dict]]:
    """(name, N rows of the weight, K, fusion keywords) of each decode projection, as the model calls them."""
    c = config
    return [("norm+qkv", c.qkv_size, c.hidden_size, dict(norm=True, bias=c.qkv_bias)),
            ("o+residual", c.hidden_size, c.num_attention_heads * c.head_dim, dict(residual=True)),
            ("norm+gate_up+swiglu", 2 * c.intermediate_size, c.hidden_size, dict(norm=True, swiglu=True)),
            ("down+residual", c.hidden_size, c.intermediate_size, dict(residual=True)),
            ("norm+lm_head", c.vocab_size, c.hidden_size, dict(norm=True, logits=True))]


def run(device, ceilings, models=MODELS, rows=ROWS, dtype=torch.bfloat16, configs=None, rep_ms=60):
    out = []
    for name in models:
        config = (configs or {}).get(name) or builtin_config(name)
        for proj, n, k, fusion in projections(config):
            weight_bytes = n * k * torch.finfo(dtype).bits // 8
            copies = max(1, -(-L2_BYTES // weight_bytes)) if device.type == "cuda" else 1
            weights = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for _ in range(copies)]
            cycle = itertools.cycle(weights)
            width = n // 2 if fusion.get("swiglu") else n
            for m in rows:
                x = torch.randn(m, k, device=device, dtype=dtype)
                kw = dict(swiglu=fusion.get("swiglu", False),
                          out_dtype=torch.float32 if fusion.get("logits") else None)
                if fusion.get("norm"):
                    kw["norm_weight"] = torch.randn(k, device=device, dtype=dtype)
                if fusion.get("bias"):
                    kw["bias"] = torch.randn(n, device=device, dtype=dtype)
                if fusion.get("residual"):
                    kw["residual"] = torch.randn(m, width, device=device, dtype=dtype)
                out_bytes = m * width * (4 if fusion.get("logits") else torch.finfo(dtype).bits // 8)
                nbytes = weight_bytes + x.numel() * x.element_size() + out_bytes
                shape = f"{name} {proj} M={m} N={n} K={k}"
                impls = {"qwen2rt": lambda: fused_linear(x, next(cycle), **kw),
                         "qwen2rt_unfused": lambda: fused_linear(x, next(cycle)),
                         "cublas_linear": lambda: F.linear(x, next(cycle))}
                for impl, fn in impls.items():
                    try:
                        out.append(kernel_row("gemv", shape, impl, bench_ms(fn, device, rep_ms=rep_ms), nbytes, None,
                                              ceilings))
                    except Exception as e:  # noqa: BLE001 - record why, keep going
                        out.append({"kernel": "gemv", "shape": shape, "impl": impl, "error": repr(e)[:200]})
            weights = cycle = None  # free this projection's copies before the next one allocates
    return out


def main(argv=None):
    smoke = dict(models=["tiny"], rows=[1, 3], dtype=torch.float32)
    return kernel_bench_main(__doc__, argv, run, smoke)


if __name__ == "__main__":
    main()
