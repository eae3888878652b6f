"""RMSNorm and fused add + RMSNorm: qwen2rt's Triton kernel vs torch eager vs torch.compile, GB/s and % of the
measured copy bandwidth, at Qwen2 hidden sizes.

    python -m benchmarks.bench_rmsnorm [--smoke] [--no-compile] [--out FILE.json]
"""

from __future__ import annotations

import torch

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row, maybe_compile
from qwen2rt.kernels import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref

HIDDEN = [896, 1536, 3584, 8192]
TOKENS = [1, 16, 2048]


def run(device, ceilings, hidden=HIDDEN, tokens=TOKENS, compile_baseline=True, dtype=torch.bfloat16):
    rows = []
    eps = 1e-6
    compiled_norm = maybe_compile(rms_norm_ref, device) if compile_baseline else None
    compiled_add = maybe_compile(add_rms_norm_ref, device) if compile_baseline else None
    for h in hidden:
        for t in tokens:
            x = torch.randn(t, h, device=device, dtype=dtype)
            res = torch.randn(t, h, device=device, dtype=dtype)
            w = torch.randn(h, device=device, dtype=dtype)
            elem = x.element_size()
            shape = f"T={t} H={h} {str(dtype).replace('torch.', '')}"
            cases = [
                ("rmsnorm", (2 * t * h + h) * elem, {
                    "qwen2rt": lambda: rms_norm(x, w, eps),
                    "torch_eager": lambda: rms_norm_ref(x, w, eps),
                    "torch_compile": (lambda: compiled_norm(x, w, eps)) if compiled_norm else None}),
                ("add_rmsnorm", (4 * t * h + h) * elem, {
                    "qwen2rt": lambda: add_rms_norm(x, res, w, eps),
                    "torch_eager": lambda: add_rms_norm_ref(x, res, w, eps),
                    "torch_compile": (lambda: compiled_add(x, res, w, eps)) if compiled_add else None}),
            ]
            for kernel, nbytes, impls in cases:
                for impl, fn in impls.items():
                    if fn is None:
                        continue
                    try:
                        rows.append(kernel_row(kernel, shape, impl, bench_ms(fn, device), nbytes, None, ceilings))
                    except Exception as e:  # e.g. torch.compile unavailable: record why, keep going
                        rows.append({"kernel": kernel, "shape": shape, "impl": impl, "error": repr(e)[:200]})
    return rows


def main(argv=None):
    smoke = dict(hidden=[100], tokens=[1, 3], dtype=torch.float32)
    return kernel_bench_main(__doc__, argv, run, smoke, compile_flag=True)


if __name__ == "__main__":
    main()
