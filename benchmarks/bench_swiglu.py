"""SwiGLU (silu_and_mul of the packed gate_up): qwen2rt's Triton kernel vs torch eager vs torch.compile, GB/s and %
of the measured copy bandwidth, at the Qwen2 intermediate sizes of hidden 896, 1536, 3584 and 8192.

    python -m benchmarks.bench_swiglu [--smoke] [--no-compile] [--out FILE.json]
"""

from __future__ import annotations

import torch

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row, maybe_compile
from qwen2rt.kernels import silu_and_mul, silu_and_mul_ref

INTERMEDIATE = {896: 4864, 1536: 8960, 3584: 18944, 8192: 29568}
TOKENS = [1, 16, 2048]


def run(device, ceilings, intermediate=tuple(INTERMEDIATE.values()), tokens=TOKENS, compile_baseline=True,
        dtype=torch.bfloat16):
    rows = []
    compiled = maybe_compile(silu_and_mul_ref, device) if compile_baseline else None
    for inter in intermediate:
        for t in tokens:
            x = torch.randn(t, 2 * inter, device=device, dtype=dtype)
            nbytes = 3 * t * inter * x.element_size()  # read [gate | up], write the product
            shape = f"T={t} I={inter} {str(dtype).replace('torch.', '')}"
            impls = {"qwen2rt": lambda: silu_and_mul(x), "torch_eager": lambda: silu_and_mul_ref(x),
                     "torch_compile": (lambda: compiled(x)) if compiled else None}
            for impl, fn in impls.items():
                if fn is None:
                    continue
                try:
                    rows.append(kernel_row("swiglu", shape, impl, bench_ms(fn, device), nbytes, None, ceilings))
                except Exception as e:
                    rows.append({"kernel": "swiglu", "shape": shape, "impl": impl, "error": repr(e)[:200]})
    return rows


def main(argv=None):
    smoke = dict(intermediate=[37], tokens=[1, 3], dtype=torch.float32)
    return kernel_bench_main(__doc__, argv, run, smoke, compile_flag=True)


if __name__ == "__main__":
    main()
