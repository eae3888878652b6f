"""The one-call GPU check: ceilings, Triton's cache warmed in parallel (tests/aot_sm90.py --warm), a gate of GPU
tests (one per kernel family, model parity, graphs), end-to-end decode at batch 1, the kernel benchmarks, prefill,
larger batches, the rest of the GPU tests, then the quantized and serving parts; one JSON record and a markdown
summary (<date>-<gpu>-<commit>.json and .md, ready to copy into
benchmarks/results/). The parts run in the order of what a decision needs first; each has an estimated cost and is
skipped (and recorded as skipped) when it would end past the time budget. Each part runs in its own try block (the
end-to-end benchmarks one part per model), and the record is rewritten after each part, so a failure or a kill
keeps the results of the parts before it; each part's time is recorded, and the Triton cache entries it added
(the kernels it still had to compile). A part that leaves the CUDA context unusable (an illegal address, a
device-side assert: every later part would fail) is recorded as failed and the check goes on in a fresh process
(itself with --resume, at most MAX_RESTARTS times, until the same deadline), which runs none of the parts this call
already ran, failed ones included (a later call, --resume on a fresh machine, runs the failed ones again). The MoE
block sizes tuned during the run are copied beside the record (<record>-moe-configs.json).

    python -m benchmarks.gpu_check --out DIR [--parts tests decode kernels host prefill batches quantized serving
                                   big] [--quick] [--budget-s 420] [--resume [RECORD.json]]

A second call with --resume (on the GPU machine, whose $OUT starts empty: --resume benchmarks/results/<record>.json
after copying the first call's record there, uncommitted: the record must be of the checkout's commit) runs the
parts the first skipped at its budget and merges the rows. The MoE configs tuned by the first call (its
-moe-configs.json beside the record) seed this machine's tuning cache, so that they are not tuned again and the
configs saved beside the merged record are all the calls'.

Run it through benchmarks/gpu_check.sh on the lent GPU machine; copy DIR/<record>.json and .md into
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import torch

from benchmarks import (bench_attention, bench_decode, bench_gemv, bench_host, bench_moe, bench_prefill,
                        bench_quant, bench_rmsnorm, bench_sampler, bench_serving, bench_swiglu)
from benchmarks.common import ROOT, device_default, environment, measure_ceilings
from qwen2rt.kernels.moe import cache_path as moe_cache_path
from qwen2rt.models.config import builtin_config

# the default run (issue 10's check): about two calls of the lent machine's 15 minutes
PARTS = ["tests", "decode", "kernels", "host", "prefill", "batches"]
# asked for by name: the quantized kernels and quantized decode, serving, and "big": loading the whole 57B-A14B and
# 72B in int4 (~32 and ~40 GB of random quantized weights, minutes each)
OPTIONAL_PARTS = ["quantized", "serving", "big"]
HF_EAGER_REPEATS = 1  # HF eager runs 10x slower than qwen2rt: one steady-state measurement is plenty (3 for the rest)
# decode at batch 1 first (these decide the next work): 0.5B (launch-bound: the fused decode path's main target),
# 7B (bandwidth-bound), the MoE, then the rest
DECODE_MODELS = ["qwen2-0.5b", "qwen2-7b", "qwen1.5-moe-a2.7b", "qwen2-1.5b", "qwen2-57b-a14b-4l"]
QUICK_MODELS = ["qwen2-7b", "qwen1.5-moe-a2.7b", "qwen2-0.5b"]
PREFILL_MODELS = ["qwen2-7b", "qwen1.5-moe-a2.7b", "qwen2-0.5b"]
BATCH_MODELS = ["qwen2-7b", "qwen1.5-moe-a2.7b", "qwen2-0.5b"]
# weight-only quantized decode at batch 1, after the dense parts: (model, quantization)
# (MoE: quantized experts; the 4-layer slice of Qwen2-57B-A14B, whose bf16 rows in the decode part are its baseline,
# then the whole 57B-A14B, which needs 114 GB in bf16 and ~32 GB in int4: the one-GPU goal, after the slice
# has tuned the expert kernels of its shapes)
QUANT_DECODE = [("qwen2-7b", "int4"), ("qwen2-7b", "int8"), ("qwen1.5-moe-a2.7b", "int4"),
                ("qwen2-57b-a14b-4l", "int4")]
BIG_QUANT_DECODE = [("qwen2-57b-a14b", "int4"), ("qwen2-72b", "int4")]  # the "big" part
WHOLE_ONLY = ("qwen2-72b", "qwen2-57b-a14b")  # loaded once, no eager run beside the graphs (time)
# Estimated seconds per part (a part is skipped if it would end past the budget), from the first run on an H200
# (2026-11-27) with some margin. Model parts include loading, graph capture, the eager baseline, HF eager and, for
# MoE shapes, the first-load autotuning. gpu_tests(_gate): estimates; their time limit is GPU_TESTS_LIMIT_S.
ESTIMATE_S = {"ceilings": 5, "warm": 90, "gpu_tests_gate": 60, "gpu_tests": 200, "decode": 40, "decode_moe": 60,
              "hf_compiled": 70,
              "bench_gemv": 40, "bench_sampler": 25, "bench_rmsnorm": 25, "bench_swiglu": 15, "bench_attention": 30,
              "bench_moe": 20, "host": 30, "prefill": 20, "batches": 70,
              # not measured yet (no GPU run of these parts so far), guessed with the Triton cache warmed first (which
              # takes their JIT compiles out of them): bench_quant is ~250 timings (its fp16 register-cap rows
              # compile 4 variants the warm does not); a quantized model's load includes quantizing its random
              # weights, and 72B int4 fills ~40 GB of weights
              "bench_quant": 170, "decode_quant": 60, "decode_quant_72b": 420,
              # five 7B loads (prefix caching on and off; fcfs and priority; structured), ~25 prefills of 2,050
              # tokens and 10 bursts of 4, 2 x 128 decode steps at batch 4, 18 requests of 64 tokens (structured:
              # free, choice split and serial); the server part is skipped there unless the serve extra's wheels
              # are carried
              "serving": 240,
              # quantized MoE: loading plus the first-load tuning of the quantized expert kernels (every bucket;
              # the warm compiles their default configs only, not the tuning candidates)
              "decode_quant_moe": 180,
              # the whole 57B-A14B in int4: ~32 GB of random quantized weights, 28 MoE layers captured per bucket
              "decode_quant_57b": 240}
# 68 tests took 29 s on the H200 (8 workers); since then the decode GEMV, sampler and batch-invariance tests, and the
# sampler's JIT compile (8-15 s per kernel for sm_90, measured ahead of time on the CPU) in each worker that needs
# it; then the quantized GEMV, quantized MoE and logprobs GPU tests (~43 more, each quantized form its own compile)
GPU_TESTS_LIMIT_S = 300
# restarts of one call after a part broke the CUDA context (an illegal address, a device-side assert): past them the
# parts left run in the broken process and fail at once
MAX_RESTARTS = 3
NOTES = ("Random weights: the router sends tokens to experts near-uniformly (max/mean expert load ~1.16 at 2048 "
         "tokens), so MoE numbers are for uniform routing. Decode rows are ms per step (one token for each sequence "
         "of the batch); floors count the bytes a step must read (MoE: experts touched by the batch; K/V at the "
         "mean context) over the measured copy bandwidth. Prefill: a prompt of up to 512 tokens replays a prefill "
         "CUDA graph (padded to a token bucket); qwen2rt_eager_prefill rows time the same prompt with every prefill "
         "eager.")


# tests/aot_sm90.py --warm: every kernel variant the built-in shapes launch, compiled in parallel into Triton's cache
# before the parts launch them one after another (not measured on a GPU yet; on the 2-core development machine the
# 218 float bf16 variants take ~700 s of compiles and the quantized ones ~500 s more, here spread over the GPU
# machine's cores); past its limit the run goes on without it
WARM_LIMIT_S = 120


def triton_cache_entries() -> int:
    """Entries in Triton's on-disk cache (one per compiled kernel variant, and per launcher built): the parts' new
    entries say how much of their time went to compiling."""
    from triton import knobs

    path = knobs.cache.dir
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def warm_triton_cache(quantized: bool, timeout_s: float = WARM_LIMIT_S) -> dict:
    """tests/aot_sm90.py --warm on every built-in shape in bf16 (and the weight-only quantized kernels when the
    quantized parts run), in a subprocess: its summary, failures and time for the record."""
    jobs = min(16, len(os.sched_getaffinity(0)))  # each worker imports torch and holds a CUDA context
    cmd = [sys.executable, os.path.join(ROOT, "tests", "aot_sm90.py"), "--warm", "--dtypes", "bf16",
           "--jobs", str(jobs)] + ([] if quantized else ["--no-quantized"])
    t0 = time.perf_counter()
    # its own process group, so that a timeout stops the pool's workers too (they would compile on into the next part)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        lines = stdout.strip().splitlines()
        summary = next((ln for ln in lines if ln.startswith("warmed ")), f"no summary (exit {proc.returncode}): "
                       + stderr.strip()[-500:])
        failed = [ln for ln in lines if ln.startswith("FAILED")]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        summary, failed = f"stopped at its {timeout_s:.0f} s limit (what compiled stays cached)", []
    return {"summary": summary, "failed": failed[:30], "seconds": time.perf_counter() - t0,
            "command": " ".join(cmd[1:])}


def cuda_context_error(device) -> str | None:
    """After a part failed: None when the device still runs work, else the error. An illegal address or a
    device-side assert leaves the process's CUDA context unusable: every later part would fail with it."""
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001 - any error here means the context is gone
        return repr(e)[:300]
    return None


def restart_argv(args, record: str, budget_left_s: float) -> list[str]:
    """The command that goes on after a part broke the CUDA context: this check in a fresh process, resuming
    `record` until the same deadline (its start-up counts: see main)."""
    argv = [sys.executable, "-m", "benchmarks.gpu_check", "--out", args.out, "--resume", record,
            "--deadline", f"{time.time() + max(budget_left_s, 0.0):.1f}", "--parts", *args.parts,
            "--restarted", str(args.restarted + 1)]
    if args.models:
        argv += ["--models", *args.models]
    return argv + (["--quick"] if args.quick else []) + (["--smoke"] if args.smoke else [])


def seed_moe_cache(configs_path: str) -> None:
    """--resume: the MoE configs an earlier call tuned (the record's -moe-configs.json) into this machine's tuning
    cache, where it has none for a key: a fresh machine does not tune them again, and the configs saved beside the
    merged record are all the calls'."""
    if not os.path.isfile(configs_path):
        return
    with open(configs_path) as f:
        earlier = json.load(f)
    tuned = moe_cache_path()
    mine = {}
    if os.path.isfile(tuned):
        with open(tuned) as f:
            mine = json.load(f)
    os.makedirs(os.path.dirname(tuned), exist_ok=True)
    with open(tuned, "w") as f:
        json.dump({**earlier, **mine}, f, indent=1, sort_keys=True)


def run_gpu_tests(timeout_s: float = GPU_TESTS_LIMIT_S, marker: str = "gpu") -> dict:
    """pytest -m MARKER in a subprocess, one line per test (-v), so that a timeout still says which tests ran; spread
    over 8 workers when pytest-xdist is there (the tests are mostly Triton compiles, which use the CPU)."""
    cmd = [sys.executable, "-m", "pytest", "-m", marker, "-v", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", "8"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "120"]
    env = dict(os.environ, QWEN2RT_MOE_TUNE="0")  # correctness only here: no MoE autotuning inside the tests
    t0 = time.perf_counter()
    # its own process group, so that a timeout stops the xdist workers too (they would run GPU tests on into the
    # next part's timings)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=max(timeout_s, 10))
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        returncode = None
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    outcomes = {k: sum(f" {k}" in ln for ln in lines if "::" in ln and not ln.startswith(k))
                for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    summary = lines[-1] if lines and returncode is not None else f"timed out after {timeout_s:.0f} s: {outcomes}"
    # the tracebacks of failures (--tb=short), for the record: the GPU machine keeps nothing
    tb = stdout[stdout.find("= FAILURES ="):] if "= FAILURES =" in stdout else ""
    return {"returncode": returncode, "summary": summary, "outcomes": outcomes, "failed": failed[:50],
            "seconds": time.perf_counter() - t0, "command": " ".join(cmd[1:]), "tracebacks": tb[:20000]}


def record_name(env: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    return f"{env['date']}-{gpu}-{env['commit'] or 'nocommit'}.json"


def summary_markdown(rec: dict) -> str:
    out = [f"# qwen2rt GPU check — {rec['gpu']}, {rec['date']}, commit {rec['commit']}", "",
           f"torch {rec['torch']}, triton {rec['triton']}, transformers {rec['transformers']}", ""]
    c = rec.get("ceilings") or {}
    if c:
        out += [f"Ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s, read {c.get('read_GBps', 0):.0f} "
                f"GB/s, bf16 GEMM {c['bf16_gemm_TFLOPs']:.0f} TFLOP/s.", ""]
    if rec.get("notes"):
        out += [rec["notes"], ""]
    if rec.get("calls", 1) > 1:
        out += [f"Built over {rec['calls']} calls (--resume: each ran only the parts not done before), "
                f"{rec.get('total_s') or 0:.0f} s in all.", ""]
    if rec.get("crashed"):
        out += [f"Parts that left the CUDA context unusable (the check went on in a fresh process, "
                f"{rec.get('restarts', 0)} restart(s)): {', '.join(rec['crashed'])}.", ""]
    for key, label in (("gpu_tests_gate", "GPU tests, the gate"), ("gpu_tests", "GPU tests, the rest")):
        t = rec.get(key)
        if t:
            out += [f"{label}: {t.get('summary')}", ""] + [f"- {ln}" for ln in t.get("failed", [])] + [""]
    w = rec.get("warm")
    if w:
        out += [f"Triton cache warmed first: {w.get('summary')}", ""] + [f"- {ln}" for ln in w.get("failed", [])]
        out += [""]
    if rec.get("parts"):
        compiles = rec.get("compiles") or {}
        out += ["Parts (with the Triton cache entries each added: its own compiles): " + "; ".join(
            f"{k}: {v}" + (f", {compiles[k]} compiled" if compiles.get(k) else "") for k, v in rec["parts"].items()),
            ""]
    if rec.get("decode"):
        out += ["## Decode (ms per step; at batch 1, per token)", "",
                "| model | batch | impl | ms/step | floor ms | % of floor | notes |",
                "|---|---|---|---|---|---|---|"]
        for r in rec["decode"]:
            out.append(f"| {r['model']} | {r.get('batch')} | {r['impl']} | {_f(r.get('ms_per_token'))} | "
                       f"{_f(r.get('floor_ms'))} | {_f(r.get('pct_of_floor'))} | {_decode_notes(r)} |")
        out.append("")
    if rec.get("prefill"):
        out += ["## Prefill (time to first token, ms)", "",
                "| model | tokens | impl | ms | its kernels ms | floor ms | % of floor |",
                "|---|---|---|---|---|---|---|"]
        for r in rec["prefill"]:
            out.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | {_f(r.get('ms'))} | {_f(r.get('kernel_ms'))} "
                       f"| {_f(r.get('floor_ms'))} | {_f(r.get('pct_of_floor'))} |"
                       + (f" error: {r['error']}" if r.get("error") else "")
                       + (f" skipped: {r['skipped']}" if r.get("skipped") else ""))
        out.append("")
    if rec.get("kernels"):
        # timing: device time of back-to-back calls in a CUDA graph, or eager calls between events (do_bench: host
        # launches and an L2 flush included) where a function cannot be captured: rows timed apart compare loosely
        out += ["## Kernels", "", "| kernel | shape | impl | ms | GB/s | % copy | TFLOP/s | % GEMM | timing |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rec["kernels"]:
            out.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {_f(r.get('ms'))} | {_f(r.get('GBps'))} | "
                       f"{_f(r.get('pct_copy_bw'))} | {_f(r.get('TFLOPs'))} | {_f(r.get('pct_gemm_rate'))} | "
                       f"{r.get('timing') or '-'} |"
                       + (f" error: {r['error']}" if r.get("error") else "")
                       + (f" skipped: {r['skipped']}" if r.get("skipped") else ""))
        out.append("")
    if rec.get("host"):
        out += ["## Host time per decode step (stub model: no device work but the step's copies)", "",
                "| mode | batch | context | tokenizer | us/step | p90 |", "|---|---|---|---|---|---|"]
        for r in rec["host"]:
            out.append(f"| {r['mode']} | {r['batch']} | {r['context']} | {r['tokenizer'] or '-'} | "
                       f"{_f(r.get('us_per_step'))} | {_f(r.get('us_p90'))} |")
        out.append("")
    if rec.get("serving"):
        out += ["## Serving", "",
                "Time to first token (system prompt + question, max_tokens 1; one request at a time, or a burst "
                "submitted together, the last of its requests):", "",
                "| model | prompt | case | prefix caching | ttft ms | cached tokens | floor ms | % of floor |",
                "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rec["serving"] if r["bench"] == "prefix"):
            out.append(f"| {r['model']} | {r['prompt']} | {r['case']} | {r['prefix_caching']} | {_f(r['ttft_ms'])} | "
                       f"{_f(r['cached_tokens'])} | {_f(r['floor_ms'])} | {_f(r['pct_of_floor'])} |")
        priority = [r for r in rec["serving"] if r["bench"] == "priority"]
        if priority:
            out += ["", "An urgent request when every slot holds a long one (fcfs: it waits; priority: it preempts):",
                    "", "| model | policy | slots | long tokens | urgent ttft ms | longs done ms | preemptions |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {r['model']} | {r['policy']} | {r['slots']} | {r['long_tokens']} | {_f(r['urgent_ttft_ms'])} | "
                    f"{_f(r['longs_done_ms'])} | {r['preemptions']} |" for r in priority]
        structured = [r for r in rec["serving"] if r["bench"] == "structured"]
        if structured:
            out += ["", "Structured outputs at batch 1 (greedy; a choice of one string forces the same tokens; serial: "
                    "each step read back before the next is launched):", "",
                    "| model | case | tokens | ms/token | vs free | floor ms | % of floor |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {r['model']} | {r['case']} | {r['tokens']} | {_f(r['per_token_ms'])} | {_f(r['vs_free'])} | "
                    f"{_f(r['floor_ms'])} | {_f(r['pct_of_floor'])} |" for r in structured]
        out += ["", "The OpenAI server over the Python API (same LLM, one request at a time):", ""]
        for r in (r for r in rec["serving"] if r["bench"] == "server"):
            out.append(f"- {r['model']}: " + ", ".join(f"{k} {_f(v)}" for k, v in r.items()
                                                      if k not in ("bench", "model")))
        out.append("")
    if rec.get("errors"):
        out += ["## Errors", ""] + [f"- {e['part']}: {e['error']}" for e in rec["errors"]] + [""]
    return "\n".join(out)


def _decode_notes(r: dict) -> str:
    notes = []
    if r.get("error"):
        notes.append(f"error: {r['error']}")
    if r.get("graph_capture_s") is not None and r["impl"] == "qwen2rt":
        prefill = r.get("prefill_graph_capture_s")
        notes.append(f"graphs captured in {r['graph_capture_s']:.2f} s"
                     + (f" ({prefill:.2f} s of prefill graphs)" if prefill is not None else "")
                     + f", {_f(r.get('graph_mib'))} MiB")
    if r.get("graph_replay_ms"):
        notes.append(f"graph replay {r['graph_replay_ms']:.3g} ms")
    if r.get("max_seq_len") and r["impl"].startswith("qwen2rt"):
        notes.append(f"max_seq_len {r['max_seq_len']}")
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
    lines = []
    for key in ("gpu_tests_gate", "gpu_tests"):
        t = rec.get(key) or {}
        lines += [f"{key}: {t.get('summary')}"] + [f"  {ln}" for ln in t.get("failed", [])[:10]]
    lines += [f"errors: {[e['part'] for e in rec.get('errors', [])]}",
              "model                 impl                   b  ms/step  replay   %floor"]
    for r in rec.get("decode", []):
        if r.get("ms_per_token"):
            lines.append(f"{r['model']:<21} {r['impl']:<22} {r['batch']:<2} {r['ms_per_token']:8.3f} "
                         f"{_f(r.get('graph_replay_ms')):>7}  {r['pct_of_floor']:5.1f}")
        elif r.get("error"):  # a variant that failed inside a part that ran: the part says "ok"
            lines.append(f"{_f(r.get('model')):<21} {_f(r.get('impl')):<22} {_f(r.get('batch')):<2} error: "
                         f"{str(r['error'])[:60]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON record and its markdown summary")
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS + OPTIONAL_PARTS,
                    help=f"default {' '.join(PARTS)}; also {' '.join(OPTIONAL_PARTS)}")
    ap.add_argument("--quick", action="store_true", help=f"end-to-end on {QUICK_MODELS} only")
    ap.add_argument("--models", nargs="+", default=None, help="end-to-end models (default: all built-in shapes)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip parts that would end after this")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the driver end to end")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="RECORD",
                    help="go on with a record of this GPU and commit (RECORD, a .json file, or else the newest in "
                         "--out): run only the parts it has not done (skipped, failed or missing), add their rows "
                         "and write the whole record into --out")
    # set by the restart after a part broke the CUDA context (restart_argv): same machine, same Triton cache
    ap.add_argument("--restarted", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # with --restarted: time.time()
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.deadline is not None:  # a restart: the budget left, this process's start-up counted
        args.budget_s = max(0.0, args.deadline - time.time())
    device = device_default()
    env = environment()
    rec = dict(env, ceilings=None, decode=[], prefill=[], kernels=[], host=[], serving=[], graph_capture_s=None,
               warm=None, gpu_tests_gate=None, gpu_tests=None, errors=[], parts={}, compiles={},
               budget_s=args.budget_s, notes=NOTES, calls=1, total_s=0.0,
               this_call=[])  # the parts this call ran (a restart within the call runs none of them again)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, record_name(env))
    if args.resume is not None:
        earlier = args.resume or max((os.path.join(args.out, p) for p in os.listdir(args.out) if p.endswith(".json")
                                      and p[len("yyyy-mm-dd-"):] == os.path.basename(path)[len("yyyy-mm-dd-"):]),
                                     default=None)
        if not earlier or not os.path.isfile(earlier):
            raise SystemExit(f"--resume: no record {earlier or 'of this GPU and commit in ' + args.out}")
        with open(earlier) as f:
            rec = json.load(f)
        if not args.restarted:  # a restart keeps its call's budget in the record
            rec["budget_s"] = args.budget_s
        if (rec.get("gpu"), rec.get("commit")) != (env["gpu"], env["commit"]):
            raise SystemExit(f"--resume: {earlier} is of {rec.get('gpu')} at commit {rec.get('commit')}, this run "
                             f"is {env['gpu']} at {env['commit']}")
        path = os.path.join(args.out, os.path.basename(earlier))  # its name (and first date) stays
        seed_moe_cache(earlier[:-len(".json")] + "-moe-configs.json")
        if args.restarted:  # the same call, in a fresh process
            rec["restarts"] = rec.get("restarts", 0) + 1
        else:
            rec["calls"] = rec.get("calls", 1) + 1
        rec.setdefault("compiles", {})
        if not args.restarted:
            rec["this_call"] = []
        print(f"[gpu_check] resuming {earlier}: done before: "
              f"{[k for k, v in rec['parts'].items() if v.startswith('ok')]}", flush=True)
    total_before = rec.get("total_s") or 0.0

    def save():
        rec["total_s"] = total_before + time.perf_counter() - start  # this call's time so far, and the earlier ones'
        with open(path, "w") as f:
            json.dump(rec, f, indent=2)
        with open(path[:-len(".json")] + ".md", "w") as f:
            f.write(summary_markdown(rec))

    def part(name, estimate_s, fn):
        elapsed = time.perf_counter() - start
        # --resume: done in an earlier call (the warm again on a fresh machine, not after a restart on this one)
        if rec["parts"].get(name, "").startswith("ok") and (name != "warm" or args.restarted):
            print(f"[gpu_check] {elapsed:6.1f} s  {name}: done in an earlier call", flush=True)
            return
        if args.restarted and name in rec.get("this_call", []):  # failed in this call, or broke the context
            print(f"[gpu_check] {elapsed:6.1f} s  {name}: failed earlier in this call, not run again", flush=True)
            return
        broken = None
        if not args.smoke and elapsed + estimate_s > args.budget_s:
            if name not in rec["parts"] or rec["parts"][name].startswith("skipped"):  # keep an earlier failure
                rec["parts"][name] = f"skipped: {elapsed:.0f} s spent + ~{estimate_s} s estimated > budget"
        else:
            rec["errors"] = [e for e in rec["errors"] if e["part"] != name]  # this run replaces an earlier failure
            t0, entries = time.perf_counter(), triton_cache_entries()
            rec.setdefault("this_call", []).append(name)
            # a part that hangs would use up the call and say nothing: its threads' stacks go to the log when it
            # runs three times its estimate (it goes on running)
            faulthandler.dump_traceback_later(max(120.0, 3.0 * estimate_s), exit=False)
            try:
                fn()
                if torch.device(device).type == "cuda":  # a fault of its kernels is its own, not the next part's
                    torch.cuda.synchronize()
                rec["parts"][name] = f"ok in {time.perf_counter() - t0:.1f} s"
            except Exception as e:
                rec["parts"][name] = f"failed after {time.perf_counter() - t0:.1f} s"
                rec["errors"].append({"part": name, "error": repr(e)[:500], "trace": traceback.format_exc()[-2000:]})
                broken = cuda_context_error(device)
                if broken:
                    rec["errors"][-1]["cuda_context"] = broken
                    rec["crashed"] = rec.get("crashed", []) + [name]
            faulthandler.cancel_dump_traceback_later()
            rec["compiles"][name] = triton_cache_entries() - entries  # new Triton cache entries during the part
        print(f"[gpu_check] {time.perf_counter() - start:6.1f} s  {name}: {rec['parts'][name]}", flush=True)
        save()
        if broken and args.restarted < MAX_RESTARTS:
            # every later part would fail in this process: go on in a fresh one (--resume of this record, the same
            # deadline), which runs none of this call's parts again (~10 s to start)
            argv = restart_argv(args, path, args.budget_s - (time.perf_counter() - start))
            print(f"[gpu_check] {name} left the CUDA context unusable ({broken}); restarting: "
                  f"{' '.join(argv[1:])}", flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os.chdir(ROOT)
            os.execv(sys.executable, argv)

    part("ceilings", ESTIMATE_S["ceilings"], lambda: rec.update(ceilings=measure_ceilings(device, small=args.smoke)))
    if rec["ceilings"] is None:  # everything below needs them
        rec["ceilings"] = {"copy_GBps": float("nan"), "read_GBps": float("nan"), "bf16_gemm_TFLOPs": float("nan")}
    ceilings = rec["ceilings"]
    models = args.models or (QUICK_MODELS if args.quick else DECODE_MODELS)
    if args.smoke:
        _smoke_parts(args, device, ceilings, rec, part)
    else:
        _gpu_parts(args, device, ceilings, rec, part, models, start)
    tuned = moe_cache_path()
    if os.path.isfile(tuned):  # the MoE configs tuned in this run, to keep beside the record
        shutil.copy(tuned, path[:-len(".json")] + "-moe-configs.json")
    captures = [r["graph_capture_s"] for r in rec["decode"] if r.get("graph_capture_s")]
    rec["graph_capture_s"] = max(captures) if captures else None
    save()
    print(f"[gpu_check] record: {path}")
    print(short_table(rec))
    return 0


def _gpu_parts(args, device, ceilings, rec, part, models, start):
    """The real run, in decision order: Triton's cache warmed, the gate of GPU tests, decode at batch 1 (qwen2rt, its
    eager run and HF eager per model), the kernels, host time, the HF torch.compile baselines, prefill, batches 4 and
    16, the rest of the GPU tests, then the quantized kernels and weight-only quantized decode at batch 1 (7B int4
    and int8, Qwen1.5-MoE and the 4-layer Qwen2-57B-A14B slice int4), serving; the "big" part, when asked for: the
    whole 57B-A14B and 72B in int4."""
    decode, kernels, prefill = rec["decode"].extend, rec["kernels"].extend, rec["prefill"].extend
    part("warm", ESTIMATE_S["warm"], lambda: rec.update(warm=warm_triton_cache(
        quantized="quantized" in args.parts or "big" in args.parts,
        timeout_s=max(30.0, min(WARM_LIMIT_S, args.budget_s - (time.perf_counter() - start) - 60)))))

    def tests(key, marker):
        left = args.budget_s - (time.perf_counter() - start)
        rec[key] = run_gpu_tests(timeout_s=min(GPU_TESTS_LIMIT_S, left - 20), marker=marker)
        if rec[key]["returncode"] != 0:  # failures fail the part (and land in errors), not only the test summary
            raise RuntimeError(f"{marker}: {rec[key]['summary']}")

    if "tests" in args.parts:  # the gate: one test per kernel family, model parity, graphs (tests/conftest.py)
        part("gpu_tests_gate", ESTIMATE_S["gpu_tests_gate"], lambda: tests("gpu_tests_gate", "gpu and gate"))
    if "decode" in args.parts:
        for name in models:
            est = ESTIMATE_S["decode_moe" if "moe" in name or "a14b" in name else "decode"]
            part(f"decode bs1 {name}", est, lambda name=name: decode(bench_decode.run(
                device, ceilings, models=[name], batches=[1], compiled_models=[], hf_eager_repeats=HF_EAGER_REPEATS)))
    if "kernels" in args.parts:
        # the decode GEMVs: every row count on 0.5B and 7B, the ends of the range on 1.5B and 72B (time)
        part("bench_gemv", ESTIMATE_S["bench_gemv"], lambda: kernels(
            bench_gemv.run(device, ceilings, models=["qwen2-0.5b", "qwen2-7b"])
            + bench_gemv.run(device, ceilings, models=["qwen2-1.5b", "qwen2-72b"], rows=[1, 16])))
        # the sampler: 8-15 s of JIT compile per kernel of a sampled form for sm_90 (measured on the CPU), unless warmed
        for name, mod in (("bench_attention", bench_attention), ("bench_sampler", bench_sampler),
                          ("bench_moe", bench_moe), ("bench_rmsnorm", bench_rmsnorm), ("bench_swiglu", bench_swiglu)):
            part(name, ESTIMATE_S[name], lambda mod=mod: kernels(mod.run(device, ceilings)))
    if "host" in args.parts:  # the engine's host time per step, with a stub model (the device's copies and syncs)
        part("host", ESTIMATE_S["host"], lambda: rec["host"].extend(bench_host.run(device=device)))
    if "decode" in args.parts:  # the HF torch.compile baselines last among the decode work: the slowest to get
        for name in [m for m in bench_decode.COMPILED_MODELS if m in models]:
            part(f"decode bs1 {name} hf_compiled", ESTIMATE_S["hf_compiled"], lambda name=name: decode(
                bench_decode.run(device, ceilings, models=[name], batches=[1], compiled_models=[name],
                                 qwen2rt=False, hf_eager=False)))
    if "prefill" in args.parts:
        for name in [m for m in PREFILL_MODELS if m in models]:
            part(f"prefill {name}", ESTIMATE_S["prefill"], lambda name=name: prefill(bench_prefill.run(
                device, ceilings, models=[name])))
    if "batches" in args.parts:
        for name in [m for m in BATCH_MODELS if m in models]:
            part(f"decode bs4,16 {name}", ESTIMATE_S["batches"], lambda name=name: decode(bench_decode.run(
                device, ceilings, models=[name], batches=[4, 16], compiled_models=[], lazy_models=[],
                sampled_models=[], hf_eager_repeats=HF_EAGER_REPEATS)))
    if "tests" in args.parts:  # the rest of the GPU suite, after the benchmarks that decide the next work
        part("gpu_tests", ESTIMATE_S["gpu_tests"], lambda: tests("gpu_tests", "gpu and not gate"))
    def quant_decode_part(name, quantization):
        moe = builtin_config(name).is_moe
        est = ESTIMATE_S["decode_quant_72b" if name == "qwen2-72b" else "decode_quant_57b"
                         if name == "qwen2-57b-a14b" else "decode_quant_moe" if moe else "decode_quant"]
        # the whole 72B and 57B load once (~40 / ~32 GB of random quantized weights): no eager run beside them
        part(f"decode bs1 {name} {quantization}", est, lambda: decode(quant_decode(
            device, ceilings, name, quantization, eager_baseline=name not in WHOLE_ONLY)))

    # last: weight-only quantized decode at batch 1 (the goal rows; their baseline: the dense rows), then the
    # quantized kernels, then the whole 57B / 72B (each needs a call of its own: --parts big --budget-s 520+)
    for name, quantization in QUANT_DECODE if "quantized" in args.parts else []:
        quant_decode_part(name, quantization)
    if "quantized" in args.parts:  # every row count on 7B, the ends of the range on 72B (time)
        part("bench_quant", ESTIMATE_S["bench_quant"], lambda: kernels(
            bench_quant.run(device, ceilings, models=["qwen2-7b"])
            + bench_quant.run(device, ceilings, models=["qwen2-72b"], rows=[1, 16], prefill_models=[], moe_layers=[],
                              cap_rows=())))  # the prefill, MoE and register-cap rows once (the first call's)
    for name, quantization in BIG_QUANT_DECODE if "big" in args.parts else []:
        quant_decode_part(name, quantization)
    if "serving" in args.parts:  # prefix-cache time to first token (cold / warm / off) and the server's overhead
        part("serving qwen2-7b", ESTIMATE_S["serving"], lambda: rec["serving"].extend(bench_serving.run(
            device, ceilings, "qwen2-7b", max_batch_size=4)))


def quant_decode(device, ceilings, name: str, quantization: str, **kwargs) -> list[dict]:
    """bench_decode's qwen2rt rows (graphs, and eager beside them) for a model loaded with `quantization`, marked
    with it; no Hugging Face rows (the dense model's rows are the baseline: a 72B in bf16 does not fit one GPU)."""
    rows = bench_decode.run(device, ceilings, models=[name], batches=[1], compiled_models=[], lazy_models=[],
                            sampled_models=[], maxctx_models=[], hf=False, quantization=quantization, **kwargs)
    for r in rows:
        r["quantization"] = quantization
        r["impl"] = f"{r['impl']}_{quantization}"
    return rows


def _smoke_parts(args, device, ceilings, rec, part):
    """Tiny shapes on the CPU: every kind of part once, to check the driver end to end."""
    if "decode" in args.parts:
        part("decode bs1 tiny", 0, lambda: rec["decode"].extend(bench_decode.run(
            device, ceilings, models=["tiny"], batches=[1], prompt_len=8, steps=4, dtype=torch.float32,
            compiled_models=[], lazy_models=["tiny"], sampled_models=["tiny"], maxctx_models=[], repeats=1)))
    if "kernels" in args.parts:
        part("bench_rmsnorm", 0, lambda: rec["kernels"].extend(bench_rmsnorm.run(
            device, ceilings, hidden=[100], tokens=[1], compile_baseline=False, dtype=torch.float32)))
        part("bench_attention", 0, lambda: rec["kernels"].extend(bench_attention.run(device, ceilings, smoke=True)))
        part("bench_gemv", 0, lambda: rec["kernels"].extend(bench_gemv.run(
            device, ceilings, models=["tiny"], rows=[1, 3], dtype=torch.float32)))
    if "host" in args.parts:
        part("host", 0, lambda: rec["host"].extend(bench_host.run(batches=(1, 2), contexts=(64,), steps=20,
                                                                  device=device)))
    if "quantized" in args.parts:
        part("bench_quant", 0, lambda: rec["kernels"].extend(bench_quant.run(
            device, ceilings, models=["tiny"], rows=[3], dtype=torch.float32, projs=["down"], prefill_models=["tiny"],
            prefill_rows=[40], moe_layers=["tiny-moe"], moe_tokens=[40])))
        part("decode bs1 tiny int4", 0, lambda: rec["decode"].extend(quant_decode(
            device, ceilings, "tiny", "int4", prompt_len=8, steps=4, dtype=torch.float32, repeats=1)))
    if "serving" in args.parts:
        part("serving tiny", 0, lambda: rec["serving"].extend(bench_serving.run(
            device, ceilings, **bench_serving.SMOKE)))
    if "prefill" in args.parts:
        part("prefill tiny", 0, lambda: rec["prefill"].extend(bench_prefill.run(
            device, ceilings, models=["tiny"], tokens=[16, 4096], dtype=torch.float32)))
    if "batches" in args.parts:
        part("decode bs2 tiny-moe", 0, lambda: rec["decode"].extend(bench_decode.run(
            device, ceilings, models=["tiny-moe"], batches=[2], prompt_len=8, steps=4, dtype=torch.float32,
            compiled_models=[], lazy_models=[], sampled_models=[], maxctx_models=[], repeats=1, hf=False)))


if __name__ == "__main__":
    raise SystemExit(main())
