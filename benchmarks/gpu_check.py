"""The one-call GPU check: GPU tests, ceilings, kernel benchmarks, end-to-end benchmarks, one JSON record and a
markdown summary (<date>-<gpu>-<commit>.json and .md, ready to copy into benchmarks/results/). Each part runs in
its own try block (the end-to-end benchmarks one part per model), and the record is rewritten after each part, so
a failure or a kill keeps the results of the parts before it; parts that would start after the time budget is
spent are recorded as skipped. The MoE block sizes tuned during the run are copied beside the record
(<record>-moe-configs.json).

    python -m benchmarks.gpu_check --out DIR [--parts tests decode kernels prefill] [--quick] [--budget-s 330]

Run it through benchmarks/gpu_check.sh on the lent GPU machine; copy DIR/<record>.json and .md into
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback

import torch

from benchmarks import bench_attention, bench_decode, bench_moe, bench_prefill, bench_rmsnorm, bench_swiglu
from benchmarks.common import ROOT, device_default, environment, measure_ceilings
from qwen2rt.kernels.moe import cache_path as moe_cache_path

PARTS = ["tests", "decode", "kernels", "prefill"]  # the order they run in; later ones may meet the time budget
QUICK_MODELS = ["qwen2-0.5b", "qwen2-7b", "qwen1.5-moe-a2.7b"]


def run_gpu_tests(timeout_s: int = 200) -> dict:
    """pytest -m gpu in a subprocess, one line per test (-v), so that a timeout still says which tests ran."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfE", "--tb=line"]
    env = dict(os.environ, QWEN2RT_MOE_TUNE="0")  # correctness only here: no MoE autotuning inside the tests
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
        stdout, returncode = r.stdout, r.returncode
    except subprocess.TimeoutExpired as e:
        stdout, returncode = e.stdout or "", None
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    outcomes = {k: sum(f" {k}" in ln for ln in lines if "::" in ln) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    if returncode is None:
        failed += [ln.split(" ")[0] + " (unfinished: timed out)" for ln in lines[-1:] if "::" in ln]
    summary = lines[-1] if lines and returncode is not None else f"timed out after {timeout_s} s: {outcomes}"
    return {"returncode": returncode, "summary": summary, "outcomes": outcomes, "failed": failed[:50]}


def record_name(env: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    return f"{env['date']}-{gpu}-{env['commit'] or 'nocommit'}.json"


def summary_markdown(rec: dict) -> str:
    out = [f"# qwen2rt GPU check — {rec['gpu']}, {rec['date']}, commit {rec['commit']}", "",
           f"torch {rec['torch']}, triton {rec['triton']}, transformers {rec['transformers']}", ""]
    c = rec.get("ceilings") or {}
    if c:
        out += [f"Ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s, bf16 GEMM "
                f"{c['bf16_gemm_TFLOPs']:.0f} TFLOP/s.", ""]
    t = rec.get("gpu_tests")
    if t:
        out += [f"GPU tests: {t.get('summary')}", ""]
    if rec.get("decode"):
        out += ["## Decode (ms/token)", "", "| model | batch | impl | ms/token | floor ms | % of floor | notes |",
                "|---|---|---|---|---|---|---|"]
        for r in rec["decode"]:
            out.append(f"| {r['model']} | {r.get('batch')} | {r['impl']} | {_f(r.get('ms_per_token'))} | "
                       f"{_f(r.get('floor_ms'))} | {_f(r.get('pct_of_floor'))} | {_decode_notes(r)} |")
        out.append("")
    if rec.get("prefill"):
        out += ["## Prefill (time to first token, ms)", "", "| model | tokens | impl | ms | floor ms | % of floor |",
                "|---|---|---|---|---|---|"]
        for r in rec["prefill"]:
            out.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | {_f(r.get('ms'))} | {_f(r.get('floor_ms'))} "
                       f"| {_f(r.get('pct_of_floor'))} |" + (f" error: {r['error']}" if r.get("error") else ""))
        out.append("")
    if rec.get("kernels"):
        out += ["## Kernels", "", "| kernel | shape | impl | ms | GB/s | % copy | TFLOP/s | % GEMM |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rec["kernels"]:
            out.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {_f(r.get('ms'))} | {_f(r.get('GBps'))} | "
                       f"{_f(r.get('pct_copy_bw'))} | {_f(r.get('TFLOPs'))} | {_f(r.get('pct_gemm_rate'))} |"
                       + (f" error: {r['error']}" if r.get("error") else "")
                       + (f" skipped: {r['skipped']}" if r.get("skipped") else ""))
        out.append("")
    if rec.get("errors"):
        out += ["## Errors", ""] + [f"- {e['part']}: {e['error']}" for e in rec["errors"]] + [""]
    return "\n".join(out)


def _decode_notes(r: dict) -> str:
    notes = []
    if r.get("error"):
        notes.append(f"error: {r['error']}")
    if r.get("graph_capture_s") is not None and r["impl"] == "qwen2rt":
        notes.append(f"graphs captured in {r['graph_capture_s']:.2f} s, {_f(r.get('graph_mib'))} MiB")
    if r.get("kernel_ms_per_step"):
        notes.append(f"kernels {r['kernel_ms_per_step']:.3g} ms/step")
    if r.get("graph_over_kernels"):
        notes.append(f"graph / kernels {r['graph_over_kernels']:.2f}")
    if r.get("load_s") is not None and r["impl"].startswith("qwen2rt"):
        notes.append(f"load {r['load_s']:.1f} s, first request {_f(r.get('first_request_s'))} s")
    if r.get("compile_s") is not None:
        notes.append(f"compile {r['compile_s']:.1f} s")
    return "; ".join(notes)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def short_table(rec: dict) -> str:
    lines = ["model                 impl         b  ms/token  %floor"]
    for r in rec.get("decode", []):
        if r.get("batch") == 1 and r.get("ms_per_token"):
            lines.append(f"{r['model']:<21} {r['impl']:<12} 1  {r['ms_per_token']:8.3f}  {r['pct_of_floor']:5.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON record and its markdown summary")
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    ap.add_argument("--quick", action="store_true", help=f"end-to-end on {QUICK_MODELS} only")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--budget-s", type=float, default=330, help="skip parts that would start after this")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the driver end to end")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    device = device_default()
    env = environment()
    rec = dict(env, ceilings=None, decode=[], prefill=[], kernels=[], graph_capture_s=None, gpu_tests=None,
               errors=[], parts={})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, record_name(env))

    def save():
        with open(path, "w") as f:
            json.dump(rec, f, indent=2)
        with open(path[:-len(".json")] + ".md", "w") as f:
            f.write(summary_markdown(rec))

    def part(name, fn):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            rec["parts"][name] = f"skipped: time budget spent ({elapsed:.0f} s)"
            return
        t0 = time.perf_counter()
        try:
            fn()
            rec["parts"][name] = f"ok in {time.perf_counter() - t0:.1f} s"
        except Exception as e:
            rec["parts"][name] = f"failed after {time.perf_counter() - t0:.1f} s"
            rec["errors"].append({"part": name, "error": repr(e)[:500], "trace": traceback.format_exc()[-2000:]})
        print(f"[gpu_check] {name}: {rec['parts'][name]}", flush=True)
        save()

    part("ceilings", lambda: rec.update(ceilings=measure_ceilings(device, small=args.smoke)))
    if rec["ceilings"] is None:  # everything below needs them
        rec["ceilings"] = {"copy_GBps": float("nan"), "bf16_gemm_TFLOPs": float("nan")}
    ceilings = rec["ceilings"]
    models = args.models or (QUICK_MODELS if args.quick else bench_decode.MODELS)
    smoke = args.smoke
    if "tests" in args.parts and not smoke:
        part("gpu_tests", lambda: rec.update(gpu_tests=run_gpu_tests()))
    if "decode" in args.parts:  # one part per model: each is saved as soon as it is done
        for name in ["tiny"] if smoke else models:
            if smoke:
                part(f"bench_decode {name}", lambda name=name: rec["decode"].extend(bench_decode.run(
                    device, ceilings, models=[name], batches=[1], prompt_len=8, steps=4, dtype=torch.float32,
                    compiled_models=[], lazy_models=["tiny"], sampled_models=["tiny"])))
            else:
                part(f"bench_decode {name}",
                     lambda name=name: rec["decode"].extend(bench_decode.run(device, ceilings, models=[name])))
    if "kernels" in args.parts:
        if smoke:
            part("bench_rmsnorm", lambda: rec["kernels"].extend(bench_rmsnorm.run(
                device, ceilings, hidden=[100], tokens=[1], compile_baseline=False, dtype=torch.float32)))
            part("bench_attention", lambda: rec["kernels"].extend(bench_attention.run(device, ceilings, smoke=True)))
        else:
            part("bench_rmsnorm", lambda: rec["kernels"].extend(bench_rmsnorm.run(device, ceilings)))
            part("bench_swiglu", lambda: rec["kernels"].extend(bench_swiglu.run(device, ceilings)))
            part("bench_attention", lambda: rec["kernels"].extend(bench_attention.run(device, ceilings)))
            part("bench_moe", lambda: rec["kernels"].extend(bench_moe.run(device, ceilings)))
    if "prefill" in args.parts:
        for name in ["tiny"] if smoke else models:
            if smoke:
                part(f"bench_prefill {name}", lambda name=name: rec["prefill"].extend(bench_prefill.run(
                    device, ceilings, models=[name], tokens=[16], dtype=torch.float32)))
            else:
                part(f"bench_prefill {name}",
                     lambda name=name: rec["prefill"].extend(bench_prefill.run(device, ceilings, models=[name])))
    tuned = moe_cache_path()
    if os.path.isfile(tuned):  # the MoE configs tuned in this run, to keep beside the record
        shutil.copy(tuned, path[:-len(".json")] + "-moe-configs.json")
    captures = [r["graph_capture_s"] for r in rec["decode"] if r.get("graph_capture_s")]
    rec["graph_capture_s"] = max(captures) if captures else None
    rec["total_s"] = time.perf_counter() - start
    save()
    print(f"[gpu_check] record: {path}")
    print(short_table(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
