"""Shared benchmark helpers: timing, hardware ceilings, environment record, result rows.

On CUDA, times are `triton.testing.do_bench` medians (with 20% / 80% quantiles); on CPU a plain wall-clock median
(for smoke runs only: CPU numbers are not performance claims).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_default() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_ms(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100, graph: bool = True) -> dict:
    """-> {"ms": median, "ms_p20": ..., "ms_p80": ..., "method": ...}. On CUDA, with graph=True, back-to-back calls
    captured in one CUDA graph and replayed (`triton.testing.do_bench_cudagraph`): the kernels' device time, without
    the host's launch path, which at decode sizes is larger than the kernel itself (20-100 us per call seen from
    Python on an H200). Where capture fails (a function that synchronises), or with graph=False, `do_bench`:
    events around eager calls."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            try:  # its warm-up call compiles outside the capture
                p50, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
                return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "method": "cuda_graph"}
            except Exception as e:  # noqa: BLE001 - fall back, and say so in the row
                method = f"do_bench (graph capture failed: {type(e).__name__})"
                torch.cuda.synchronize()
        else:
            method = "do_bench"
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "method": method}
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3], "method": "wall clock (CPU)"}


def measure_ceilings(device: torch.device, small: bool = False) -> dict:
    """Device copy bandwidth (GB/s, read + write bytes) and bf16 GEMM rate (TFLOP/s) measured now."""
    n = (1 << 22) if small or device.type != "cuda" else (1 << 28)  # 1 GiB of bf16 on a GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy = bench_ms(lambda: dst.copy_(src), device, graph=False)
    size = 256 if small or device.type != "cuda" else 8192
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, dtype=gemm_dtype, device=device)
    b = torch.randn(size, size, dtype=gemm_dtype, device=device)
    gemm = bench_ms(lambda: a @ b, device, graph=False)
    read = bench_ms(lambda: src.sum(), device, graph=False)  # read-only: a decode step mostly reads (weights, KV)
    return {
        "copy_GBps": 2 * src.numel() * src.element_size() / copy["ms"] / 1e6,
        "read_GBps": src.numel() * src.element_size() / read["ms"] / 1e6,
        "bf16_gemm_TFLOPs": 2 * size ** 3 / gemm["ms"] / 1e9,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment() -> dict:
    """GPU, library versions, commit (QWEN2RT_COMMIT if set: the GPU machine gets a copy without .git), date."""
    commit = os.environ.get("QWEN2RT_COMMIT") or None
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                          capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        pass
    return {
        "gpu": (torch.cuda.get_device_name() if torch.cuda.is_available()
                else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": sys.version.split()[0],
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def kernel_row(kernel: str, shape: str, impl: str, timing: dict, bytes_moved: float | None = None,
               flops: float | None = None, ceilings: dict | None = None) -> dict:
    ms = timing["ms"]
    row = {"kernel": kernel, "shape": shape, "impl": impl, "ms": ms, "ms_p20": timing.get("ms_p20"),
           "ms_p80": timing.get("ms_p80"), "timing": timing.get("method"),
           "GBps": bytes_moved / ms / 1e6 if bytes_moved else None,
           "TFLOPs": flops / ms / 1e9 if flops else None}
    if ceilings and row["GBps"] is not None:
        row["pct_copy_bw"] = 100 * row["GBps"] / ceilings["copy_GBps"]
    if ceilings and row["TFLOPs"] is not None:
        row["pct_gemm_rate"] = 100 * row["TFLOPs"] / ceilings["bf16_gemm_TFLOPs"]
    return row


def free_device_memory() -> None:
    """Between models: drop what the last one left, so the next one starts from the same free memory."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def maybe_compile(fn, device: torch.device):
    """torch.compile(fn, dynamic=False) where it works here; None where it does not (the row is then skipped).
    Static shapes: each benchmark shape gets its own specialised compile (with the default dynamic=None, dim 0
    would turn symbolic after the first shape, a weaker baseline). The recompile limits are raised so that no
    shape silently falls back to eager."""
    try:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        return torch.compile(fn, dynamic=False)
    except Exception:
        return None


def write_json(path: str | None, payload: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def print_rows(rows: list[dict], keys: list[str]) -> None:
    widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


KERNEL_COLUMNS = ["kernel", "shape", "impl", "ms", "GBps", "pct_copy_bw", "TFLOPs", "pct_gemm_rate"]


def kernel_bench_main(doc: str, argv, run, smoke_kwargs: dict, compile_flag: bool = False) -> list[dict]:
    """The command line shared by the kernel benchmarks: --smoke (tiny shapes, CPU interpreter), --no-compile,
    --out FILE.json; prints the rows and writes {"ceilings", "kernels"}."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter): checks the script runs")
    if compile_flag:
        ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = device_default()
    ceilings = measure_ceilings(device, small=args.smoke)
    kwargs = dict(smoke_kwargs) if args.smoke else {}
    if compile_flag:
        kwargs["compile_baseline"] = not args.no_compile
    rows = run(device, ceilings, **kwargs)
    print_rows(rows, KERNEL_COLUMNS)
    write_json(args.out, {"ceilings": ceilings, "kernels": rows})
    return rows
