"""Every benchmark script, the GPU-check driver, the results renderer and the profiler run end to end at tiny
sizes on CPU (smoke tests: nothing about speed is asserted), so that they never rot."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from benchmarks import (bench_attention, bench_decode, bench_gemv, bench_moe, bench_prefill, bench_quant,
                        bench_rmsnorm, bench_sampler, bench_swiglu, gpu_check, report)


def _finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("module, args, key", [
    (bench_rmsnorm, ["--smoke", "--no-compile"], "kernels"),
    (bench_swiglu, ["--smoke", "--no-compile"], "kernels"),
    (bench_attention, ["--smoke"], "kernels"),
    (bench_gemv, ["--smoke"], "kernels"),
    (bench_quant, ["--smoke"], "kernels"),
    (bench_sampler, ["--smoke", "--no-compile"], "kernels"),
    (bench_moe, ["--smoke"], "kernels"),
    (bench_decode, ["--smoke"], "decode"),
    (bench_prefill, ["--smoke"], "prefill"),
])
def test_bench_scripts_run(module, args, key, tmp_path):
    out = tmp_path / "r.json"
    rows = module.main(args + ["--out", str(out)])
    saved = json.load(open(out))
    assert saved[key] == rows and rows
    assert not [r for r in rows if r.get("error")]
    assert _finite(saved["ceilings"]["copy_GBps"])
    impls = {r["impl"] for r in rows}
    assert "qwen2rt" in impls and len(impls) >= 2  # always a baseline beside qwen2rt
    for r in rows:
        assert _finite(r.get("ms") or r.get("ms_per_token"))
    if module is bench_decode:  # start-up vs lazy graph capture, timed from load to first request
        assert {"qwen2rt_eager", "qwen2rt_lazy", "qwen2rt_sampled_topk", "qwen2rt_sampled_full"} <= impls
        assert all(_finite(r["first_request_s"]) and _finite(r["load_s"]) for r in rows
                   if r["impl"] in ("qwen2rt", "qwen2rt_eager", "qwen2rt_lazy"))
    if module is bench_prefill:  # the profiled prefill's kernel (here CPU) time beside the time to first token
        assert all(_finite(r["kernel_ms"]) and r["kernel_ms"] > 0 for r in rows if r["impl"] == "qwen2rt")
    if module is bench_moe:  # the shared expert folded into the grouped launches vs run separately; padding rows
        assert {"qwen2rt_fold", "qwen2rt_separate"} <= impls
        padded = {r["impl"] for r in rows if r["shape"] == "tiny-moe T=5 (3 live)"}
        assert padded == {"qwen2rt_padding_skipped", "qwen2rt_padding_computed", "qwen2rt_live_rows_only"}
    if module is bench_quant:  # pipelined vs plain word loop, bf16 cuBLAS and the prefill path; the copy floor
        assert {"qwen2rt_nopipe", "cublas_bf16", "dequant+cublas"} <= impls
        assert all(_finite(r["floor_ms"]) and {"w4a16-g128", "w8a16-channel"} & set(r["shape"].split())
                   for r in rows)


def test_bench_structured_runs(tmp_path, qwen_tokenizer_dir):
    """Structured outputs' host cost over Qwen's vocabulary: the cold sets of the prefix walk and of the
    token-by-token baseline, and the cached cost per token."""
    from benchmarks import bench_structured

    out = tmp_path / "st.json"
    rows = bench_structured.main(["--tokenizer", qwen_tokenizer_dir, "--repeats", "1", "--out", str(out)])
    assert json.load(open(out))["structured"] == rows
    cold = {(r["grammar"], r["case"]): r for r in rows if r["bench"] == "cold set"}
    names = ["json_object", "json schema", "constrained schema", "regex (phone)", "regex (words)",
             "grammar (json, GBNF)", "grammar (sql, Lark)"]
    assert [name for name, _, _ in bench_structured.CASES] == names
    assert set(cold) == {(g, c) for g in names for c in ("prefix walk", "every token (baseline)")}
    assert all(cold[g, "prefix walk"]["states"] >= 10 for g in names)
    assert all(10 <= cold[g, "every token (baseline)"]["states"] <= bench_structured.BASELINE_STATES for g in names)
    assert rows[0]["tokens"] > 150_000 and all(_finite(r["per_token_ms"]) for r in rows if r["bench"] == "per token")


def test_bench_serving_runs(tmp_path):
    """Prefix-cache time to first token (cold, warm, a burst; caching off) and the server's added latency, tiny
    model."""
    from benchmarks import bench_serving

    out = tmp_path / "s.json"
    rows = bench_serving.main(["--smoke", "--out", str(out)])
    assert json.load(open(out))["serving"] == rows
    prefix = {(r["case"], r["prefix_caching"]): r for r in rows if r["bench"] == "prefix"}
    assert set(prefix) == {(case, caching) for case in ("cold", "warm", "burst") for caching in (True, False)}
    assert prefix[("warm", True)]["cached_tokens"] == 32  # 40 system tokens: two full blocks of 16
    assert prefix[("burst", True)]["cached_tokens"] == 2 * 32  # 3 requests: the second and third take them
    assert prefix[("burst", True)]["prompt"] == "3x 40+8"
    assert all(prefix[k]["cached_tokens"] == 0 for k in prefix if k not in (("warm", True), ("burst", True)))
    assert all(r["vs_no_caching"] == 1 for k, r in prefix.items() if not k[1])  # each case over its own off time
    priority = {r["policy"]: r for r in rows if r["bench"] == "priority"}
    assert priority["priority"]["preemptions"] >= 1 and priority["fcfs"]["preemptions"] == 0
    assert all(_finite(r["urgent_ttft_ms"]) and _finite(r["longs_done_ms"]) for r in priority.values())
    structured = {r["case"]: r for r in rows if r["bench"] == "structured"}
    assert set(structured) == {"free", "choice", "choice, serial"} and structured["free"]["vs_free"] == 1
    assert all(_finite(r["per_token_ms"]) and r["tokens"] >= 2 for r in structured.values())
    assert all(_finite(r["ttft_ms"]) and _finite(r["floor_ms"]) for r in prefix.values())
    server = [r for r in rows if r["bench"] == "server"]
    if not any("skipped" in r for r in server):  # the serve extra is installed (CI): both sides timed
        assert all(_finite(r["api_ms"]) and _finite(r["server_ms"]) for r in server if "max_tokens" in r)


def test_gpu_check_driver_writes_the_record(tmp_path, monkeypatch):
    """Two calls, as on the GPU machine: the first runs some parts, the second (--resume, writing into another
    folder as the machine's fresh $OUT) only the rest, into one record; the MoE configs the first call tuned seed
    the second's tuning cache and end up beside the merged record."""
    monkeypatch.setenv("QWEN2RT_CACHE_DIR", str(tmp_path / "cache"))
    first = ["decode", "kernels", "host", "quantized"]
    assert gpu_check.main(["--out", str(tmp_path / "call1"), "--smoke", "--parts", *first]) == 0
    (record,) = [p for p in os.listdir(tmp_path / "call1") if p.endswith(".json")]
    rec1 = json.load(open(tmp_path / "call1" / record))
    assert "serving tiny" not in rec1["parts"] and not rec1["serving"]
    tuned_before = {"GPU X|H64|decode": {"BLOCK_K": 64, "BLOCK_N": 16, "FOLD_SHARED": True, "num_warps": 4}}
    json.dump(tuned_before, open(tmp_path / "call1" / record.replace(".json", "-moe-configs.json"), "w"))
    assert gpu_check.main(["--out", str(tmp_path), "--smoke", "--resume", str(tmp_path / "call1" / record),
                           "--parts", *gpu_check.PARTS, *gpu_check.OPTIONAL_PARTS]) == 0
    rec = json.load(open(tmp_path / record))
    assert rec["calls"] == 2 and rec["total_s"] > rec1["total_s"]
    configs = json.load(open(tmp_path / record.replace(".json", "-moe-configs.json")))
    assert configs.items() >= tuned_before.items()
    assert rec["decode"][:len(rec1["decode"])] == rec1["decode"]  # the first call's rows, not run again
    assert {(r["model"], r["batch"]) for r in rec["decode"][len(rec1["decode"]):]} == {("tiny-moe", 2)}  # batches
    for key in ("gpu", "torch", "triton", "transformers", "commit", "date", "ceilings", "decode", "prefill",
                "kernels", "graph_capture_s"):
        assert key in rec, key
    assert not rec["errors"], rec["errors"]
    assert {r["impl"] for r in rec["decode"]} == {"qwen2rt", "qwen2rt_eager", "qwen2rt_lazy", "qwen2rt_sampled_topk",
                                                  "qwen2rt_sampled_full", "hf_eager", "qwen2rt_int4",
                                                  "qwen2rt_eager_int4"}
    assert all(p.startswith("ok") for p in rec["parts"].values()), rec["parts"]
    assert all(r["floor_ms"] > 0 for r in rec["decode"])
    assert {(r["bench"], r.get("case")) for r in rec["serving"]} >= {("prefix", "cold"), ("prefix", "warm")}
    summary = open(tmp_path / record.replace(".json", ".md")).read()
    assert "## Decode" in summary and "## Serving" in summary
    assert "| % GEMM | timing |" in summary  # each kernel row says how it was timed (graph replay or eager)


def test_short_table_shows_the_rows_that_failed_inside_a_part():
    """The last lines a GPU call prints: a variant that failed inside a part that ran ("ok") is listed too."""
    rec = {"errors": [], "decode": [
        {"model": "qwen2-7b", "impl": "qwen2rt", "batch": 1, "ms_per_token": 5.5, "pct_of_floor": 85.0},
        {"model": "qwen2-7b", "impl": "hf_compiled", "batch": 1, "error": "RuntimeError('recompiled')"},
        # bench_decode's rows for a variant that failed as a whole have batch None (a CI run met one: the table
        # raised a TypeError and the call ended with no table and exit status 1)
        {"model": "qwen2-7b", "impl": "hf", "batch": None, "error": "ValueError('negative')"}]}
    lines = gpu_check.short_table(rec).splitlines()
    assert any(ln.startswith("qwen2-7b") and "5.500" in ln for ln in lines)
    assert any("hf_compiled" in ln and "error: RuntimeError('recompiled')" in ln for ln in lines)
    assert any(" hf " in ln and " - " in ln and "error: ValueError('negative')" in ln for ln in lines)


def test_load_llm_retries_without_prefill_graphs_only_when_capture_fails(monkeypatch):
    """A failed graph capture costs the decode rows nothing when the prefill graphs caused it: the LLM again without
    them, and the error for the record; other errors, or a failure without prefill graphs, are raised."""
    from qwen2rt.model_runner import PrefillGraphError

    made = []

    def capture_failed(cause: Exception):  # as LLM raises it (runtime/llm.py)
        error = RuntimeError(f"CUDA graph capture failed ({cause!r}); LLM(..., cuda_graph_prefill_tokens=()) ...")
        error.__cause__ = cause
        return error

    def fake_llm(name, **kwargs):
        made.append(kwargs)
        if name == "decode-broken":
            raise capture_failed(RuntimeError("decode graph boom"))
        if kwargs.get("cuda_graph_prefill_tokens") != () or name == "broken":
            raise capture_failed(PrefillGraphError("prefill graph boom"))
        return "llm"

    monkeypatch.setattr(bench_decode, "LLM", fake_llm)
    llm, error = bench_decode.load_llm("tiny", max_batch_size=2, cuda_graph_prefill_tokens=(16, 32))
    assert llm == "llm" and "prefill graph boom" in error
    assert made == [{"max_batch_size": 2, "cuda_graph_prefill_tokens": (16, 32)},
                    {"max_batch_size": 2, "cuda_graph_prefill_tokens": ()}]
    with pytest.raises(RuntimeError, match="prefill graph boom"):  # no prefill graphs and still failing
        bench_decode.load_llm("broken")
    made.clear()
    with pytest.raises(RuntimeError, match="decode graph boom"):  # a decode graph: no second load
        bench_decode.load_llm("decode-broken")
    assert len(made) == 1
    monkeypatch.setattr(bench_decode, "LLM", lambda name, **kw: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        bench_decode.load_llm("tiny")
    monkeypatch.setattr(bench_decode, "LLM", lambda name, **kw: ("llm", kw))
    assert bench_decode.load_llm("tiny", device="cpu") == (("llm", {"device": "cpu"}), None)


def stub_gpu_parts(tmp_path, monkeypatch) -> tuple[list[str], dict]:
    """gpu_check's GPU path with every measurement stubbed: -> (the parts' calls, in order; the GPU tests' return
    codes by marker)."""
    calls = []

    def stub(name, rows=()):
        def run(*args, **kwargs):
            calls.append(name)
            return [dict(r) for r in rows]
        return run

    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: 0.0)  # every part takes no time
    monkeypatch.setenv("QWEN2RT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gpu_check, "measure_ceilings", lambda *a, **k: {"copy_GBps": 3000.0, "read_GBps": 2900.0,
                                                                         "bf16_gemm_TFLOPs": 700.0})
    monkeypatch.setattr(gpu_check, "warm_triton_cache", lambda **k: calls.append("warm") or {"summary": "warmed"})
    results = {"gpu and gate": 0, "gpu and not gate": 1}

    def tests(timeout_s, marker):
        calls.append(marker)
        return {"returncode": results[marker], "summary": f"{marker}: done", "failed": []}

    monkeypatch.setattr(gpu_check, "run_gpu_tests", tests)
    row = {"model": "qwen2-0.5b", "batch": 1, "impl": "qwen2rt", "ms_per_token": 1.0, "floor_ms": 0.3,
           "pct_of_floor": 30.0}
    for mod in (gpu_check.bench_decode, gpu_check.bench_gemv, gpu_check.bench_attention, gpu_check.bench_sampler,
                gpu_check.bench_moe, gpu_check.bench_rmsnorm, gpu_check.bench_swiglu, gpu_check.bench_host,
                gpu_check.bench_prefill):
        monkeypatch.setattr(mod, "run", stub(mod.__name__.split(".")[-1], [row] if mod is gpu_check.bench_decode
                                             else []))
    monkeypatch.setattr(gpu_check, "device_default", lambda: "cpu")
    monkeypatch.setattr(gpu_check, "triton_cache_entries", lambda: 0)
    return calls, results


def test_gpu_check_real_run_order_budget_and_resume(tmp_path, monkeypatch):
    """The GPU path of gpu_check (not --smoke) with every measurement stubbed: the parts in issue 10's order (warm,
    the test gate, decode, kernels, host, compiled baselines, prefill, batches, the rest of the tests), a part past
    the budget recorded as skipped, a failing test run failing its part, and a second call (--resume) running only
    what the first did not finish."""
    calls, results = stub_gpu_parts(tmp_path, monkeypatch)
    assert gpu_check.main(["--out", str(tmp_path / "call1"), "--models", "qwen2-0.5b"]) == 0
    assert calls == ["warm", "gpu and gate", "bench_decode", "bench_gemv", "bench_gemv", "bench_attention",
                     "bench_sampler", "bench_moe", "bench_rmsnorm", "bench_swiglu", "bench_host", "bench_decode",
                     "bench_prefill", "bench_decode", "gpu and not gate"]
    (record,) = [p for p in os.listdir(tmp_path / "call1") if p.endswith(".json")]
    rec = json.load(open(tmp_path / "call1" / record))
    assert rec["parts"]["gpu_tests"].startswith("failed") and [e["part"] for e in rec["errors"]] == ["gpu_tests"]
    # the second call: the failed rest of the tests only (now passing), with the first call's rows kept
    calls.clear()
    results["gpu and not gate"] = 0
    assert gpu_check.main(["--out", str(tmp_path), "--models", "qwen2-0.5b", "--resume",
                           str(tmp_path / "call1" / record)]) == 0
    assert calls == ["warm", "gpu and not gate"]
    rec = json.load(open(tmp_path / record))
    assert rec["calls"] == 2 and not rec["errors"] and all(v.startswith("ok") for v in rec["parts"].values())
    assert len(rec["decode"]) == 3  # decode, compiled baseline, batches: one stub row each, not run again
    # a part that would end past the budget is recorded as skipped, not run: 50 s, ~60 s for the gate
    calls.clear()
    assert gpu_check.main(["--out", str(tmp_path / "call3"), "--models", "qwen2-0.5b", "--budget-s", "50"]) == 0
    (record,) = [p for p in os.listdir(tmp_path / "call3") if p.endswith(".json")]
    rec = json.load(open(tmp_path / "call3" / record))
    assert rec["parts"]["gpu_tests_gate"].startswith("skipped") and "gpu and gate" not in calls
    assert rec["parts"]["decode bs1 qwen2-0.5b"].startswith("ok")


def test_gpu_check_goes_on_in_a_fresh_process_after_a_part_breaks_the_cuda_context(tmp_path, monkeypatch):
    """A part that fails and leaves the context unusable (as an illegal address does): the record is saved with the
    part failed, and the check re-executes itself with --resume of that record until the same deadline; the fresh
    process runs every part left but the ones this call already ran: not the crashed one, not one that failed
    normally before it (bench_gemv here), not the warm (same machine); the same call, its budget kept."""
    calls, results = stub_gpu_parts(tmp_path, monkeypatch)
    error = "RuntimeError('CUDA error: an illegal memory access was encountered')"

    def attention(*args, **kwargs):
        calls.append("bench_attention")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def gemv(*args, **kwargs):
        calls.append("bench_gemv")
        raise ValueError("a plain failure")

    class Exec(Exception):
        pass

    def execv(exe, argv):
        raise Exec(argv)

    monkeypatch.setattr(gpu_check.bench_attention, "run", attention)
    monkeypatch.setattr(gpu_check.bench_gemv, "run", gemv)
    # the context: fine after bench_gemv's failure, broken after the attention part's, fine after the rest
    broken = [None, error][::-1]
    monkeypatch.setattr(gpu_check, "cuda_context_error", lambda device: broken.pop() if broken else None)
    monkeypatch.setattr(gpu_check.os, "execv", execv)
    monkeypatch.chdir(os.getcwd())  # restored after the test: the restart runs from the repository root
    with pytest.raises(Exec) as restart:
        gpu_check.main(["--out", str(tmp_path), "--models", "qwen2-0.5b", "--budget-s", "400", "--quick"])
    assert calls[-2:] == ["bench_gemv", "bench_attention"]
    (record,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    rec = json.load(open(tmp_path / record))
    assert rec["parts"]["bench_attention"].startswith("failed") and rec["crashed"] == ["bench_attention"]
    assert [e["part"] for e in rec["errors"]] == ["bench_gemv", "bench_attention"]
    assert "cuda_context" not in rec["errors"][0] and rec["errors"][1]["cuda_context"] == error
    argv = restart.value.args[0]
    assert argv[1:3] == ["-m", "benchmarks.gpu_check"] and os.getcwd() == gpu_check.ROOT
    assert argv[argv.index("--resume") + 1] == str(tmp_path / record) and "--quick" in argv
    assert argv[argv.index("--models") + 1:argv.index("--models") + 2] == ["qwen2-0.5b"]
    # the same deadline: perf_counter is stubbed (no time spent), so 400 s from the restart command's making
    assert abs(float(argv[argv.index("--deadline") + 1]) - time.time() - 400) < 5
    calls.clear()
    assert gpu_check.main(argv[3:]) == 0  # the fresh process
    assert calls == ["bench_sampler", "bench_moe", "bench_rmsnorm", "bench_swiglu", "bench_host", "bench_decode",
                     "bench_prefill", "bench_decode", "gpu and not gate"]
    rec = json.load(open(tmp_path / record))
    assert rec["calls"] == 1 and rec["restarts"] == 1 and rec["budget_s"] == 400
    assert [e["part"] for e in rec["errors"]] == ["bench_gemv", "bench_attention", "gpu_tests"]
    # a later call (--resume on a fresh machine) runs the failed parts again, the crashed one included
    calls.clear()
    results["gpu and not gate"] = 0
    monkeypatch.setattr(gpu_check.bench_attention, "run", lambda *a, **k: calls.append("bench_attention") or [])
    assert gpu_check.main(["--out", str(tmp_path), "--models", "qwen2-0.5b", "--resume", str(tmp_path / record),
                           "--quick"]) == 0
    assert calls == ["warm", "bench_gemv", "bench_attention", "gpu and not gate"]
    rec = json.load(open(tmp_path / record))
    assert rec["calls"] == 2 and [e["part"] for e in rec["errors"]] == ["bench_gemv"]
    summary = open(tmp_path / record.replace(".json", ".md")).read()
    assert "left the CUDA context unusable" in summary and "bench_attention" in summary
    # past MAX_RESTARTS the broken process goes on (its parts fail at once) instead of restarting again
    monkeypatch.setattr(gpu_check, "MAX_RESTARTS", 0)
    monkeypatch.setattr(gpu_check.bench_attention, "run", attention)
    broken[:] = [None, error][::-1]
    calls.clear()
    assert gpu_check.main(["--out", str(tmp_path / "again"), "--models", "qwen2-0.5b"]) == 0
    assert "bench_attention" in calls and calls[-1] == "gpu and not gate"


SAMPLE = {  # the shape of a recorded run; the numbers are made up for this test
    "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "transformers": "5.17.0",
    "commit": "abc123", "date": "2026-11-27", "ceilings": {"copy_GBps": 3020.0, "bf16_gemm_TFLOPs": 793.0},
    "decode": [
        {"model": "qwen2-0.5b", "batch": 1, "impl": "qwen2rt", "ms_per_token": 1.5, "floor_ms": 0.33,
         "graph_replay_ms": 1.2},
        {"model": "qwen2-0.5b", "batch": 1, "impl": "hf_eager", "ms_per_token": 16.4, "floor_ms": 0.33},
        {"model": "qwen2-0.5b", "batch": 1, "impl": "hf_compiled", "ms_per_token": 2.34, "floor_ms": 0.33},
        {"model": "qwen2-7b", "batch": 1, "impl": "qwen2rt", "ms_per_token": 9.0, "floor_ms": 4.68},
        {"model": "qwen2-7b", "batch": 4, "impl": "qwen2rt", "ms_per_token": 9.5, "floor_ms": 4.68},
        {"model": "qwen2-7b", "batch": 1, "impl": "qwen2rt_int4", "ms_per_token": 2.5, "floor_ms": 1.51,
         "quantization": "int4", "graph_replay_ms": 2.2},
        {"model": "qwen2-7b", "batch": 1, "impl": "qwen2rt_eager_int4", "ms_per_token": 9.9, "floor_ms": 1.51,
         "quantization": "int4"},
    ],
    "prefill": [{"model": "qwen2-7b", "tokens": 2048, "impl": "qwen2rt", "ms": 60.0, "floor_ms": 34.8,
                 "kernel_ms": 41.5},
                {"model": "qwen2-7b", "tokens": 2048, "impl": "hf", "ms": 56.4, "floor_ms": 34.8},
                {"model": "qwen2-7b", "tokens": 128, "impl": "qwen2rt", "ms": 5.2, "floor_ms": 3.4,
                 "kernel_ms": 4.1, "prefill_graph": True},
                {"model": "qwen2-7b", "tokens": 128, "impl": "qwen2rt_eager_prefill", "ms": 19.0, "floor_ms": 3.4}],
    "kernels": [], "graph_capture_s": None,
}


def test_report_renders_readme_table_and_chart(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    json.dump(SAMPLE, open(results / "2026-11-27-h100-abc123.json", "w"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    png = tmp_path / "chart.png"
    assert report.main(["--results", str(results), "--readme", str(readme), "--png", str(png)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "NVIDIA H100 80GB HBM3" in text and "abc123" in text
    assert "| qwen2-0.5b | 1.5 | 1.2 | 16.4 | 2.34 | 0.33 | 22% |" in text
    assert "| qwen2-7b | 4 | 9.5 | - | 4.68 | 49% |" in text  # batch 4: its own table, ms per step
    assert "| qwen2-7b | 2048 | 60 | 41.5 | - | 56.4 | 34.8 |" in text
    assert "| qwen2-7b | 128 | 5.2 | 4.1 | 19 | - | 3.4 |" in text
    assert "| qwen2-7b | 9 | - | - | - | 4.68 | 52% |" in text  # the dense row: the int4 rows stay out of it
    assert "| qwen2-7b | int4 | 2.5 | 2.2 | 1.51 | 60% | 2 |" in text and "9.9" not in text
    assert png.stat().st_size > 1000 and open(png, "rb").read(4) == b"\x89PNG"


def test_report_without_records_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recorded GPU run"):
        report.main(["--results", str(tmp_path), "--readme", "", "--png", ""])


def test_profile_prints_a_row_per_op(tmp_path, capsys):
    from qwen2rt import LLM
    from qwen2rt.profiling import profile

    llm = LLM("tiny-moe", device="cpu", max_seq_len=64)
    trace = tmp_path / "trace.json"
    rows = profile(llm, batch=2, prompt_len=12, steps=3, trace_path=str(trace))
    ops = {r["op"] for r in rows}
    assert {"attention.prefill", "attention.decode", "moe", "linear.norm+qkv", "linear.o+residual",
            "linear.norm+gate_up+swiglu", "linear.down+residual", "linear.norm+lm_head"} <= ops  # layer 0 is dense
    assert all(r["MB"] > 0 and r["time_ms"] > 0 for r in rows)
    assert "qwen2rt.layer.0" in trace.read_text()
    assert llm.model.backend.name == "torch" and not llm.model.profile_ranges  # restored
    printed = capsys.readouterr().out
    assert "attention.decode" in printed and "decode step:" in printed


def test_decode_floor_counts_quantized_experts():
    """The quantized MoE floor counts the quantized expert bytes (int4: ~1/3.7 of bf16 per expert), at batch 1 and
    for the experts a batch of 16 touches; Qwen2-57B-A14B int4 at batch 1 is the issue's ~2.6 ms at 3.02 TB/s."""
    from benchmarks.bench_decode import decode_bytes
    from qwen2rt.models.config import builtin_config
    from qwen2rt.models.quant import at_load_config, linear_bytes

    config = builtin_config("qwen2-57b-a14b")
    q = at_load_config("int4")
    assert 2.5 < decode_bytes(config, 1, 0, 2, "int4") / 3.02e9 < 2.8
    h, inter = config.hidden_size, config.moe_intermediate_size
    per_expert = linear_bytes(q, 2 * inter, h, 2) + linear_bytes(q, h, inter, 2)
    e, k = config.num_experts, config.num_experts_per_tok
    extra = config.num_hidden_layers * (e * (1 - (1 - k / e) ** 16) - k) * per_expert
    assert decode_bytes(config, 16, 0, 2, "int4") == pytest.approx(decode_bytes(config, 1, 0, 2, "int4") + extra)
    assert 3.5 < decode_bytes(config, 16, 0, 2, None) / decode_bytes(config, 16, 0, 2, "int4") < 3.9


def test_hf_decode_timing_refuses_a_negative_difference(monkeypatch):
    """(generate(2 steps) - generate(steps)) / steps is the time per token; when noise makes the longer generation
    the faster one, no number is returned rather than a negative one."""
    from benchmarks import hf_baseline

    def timed(*pairs):  # the warm-up, then (short, long) per repeat
        times = iter([9.0, *[t for pair in pairs for t in pair]])
        monkeypatch.setattr(hf_baseline, "time_generate", lambda *args, **kwargs: next(times))

    timed((0.4, 0.8), (0.4, 0.9), (0.5, 0.8))
    assert hf_baseline.decode_ms_per_token(None, None, steps=4) == pytest.approx(100.0)  # median of 100, 125, 75
    timed((0.5, 0.4), (0.5, 0.45), (0.4, 0.5))
    with pytest.raises(RuntimeError, match="timing noise"):
        hf_baseline.decode_ms_per_token(None, None, steps=4)


def test_prefill_flops_count_the_cached_prefix_the_new_tokens_attend_over():
    """A prefix-cache hit's new tokens attend over the cached ones too: 4 L H D new x cached more FLOPs than the
    same tokens as a fresh prompt (bench_serving's warm floor counted them as fresh)."""
    from benchmarks.bench_prefill import prefill_flops
    from qwen2rt.models.config import builtin_config

    c = builtin_config("qwen2-7b")
    extra = prefill_flops(c, 50, cached=2000) - prefill_flops(c, 50)
    assert extra == 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 50 * 2000
