"""Render the README's performance table and a chart from the newest recorded GPU run.

    python -m benchmarks.report [--results benchmarks/results] [--readme README.md] [--png FILE]

The README section between `<!-- perf:start -->` and `<!-- perf:end -->` is replaced; the chart compares
qwen2rt, Hugging Face eager, Hugging Face static cache + torch.compile and the bandwidth floor per model
(decode, batch 1).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def newest_record(results_dir: str) -> tuple[str, dict]:
    paths = [p for p in glob.glob(os.path.join(results_dir, "*.json")) if not p.endswith("sample.json")]
    if not paths:
        raise FileNotFoundError(f"no recorded GPU run (*.json) in {results_dir}")
    path = max(paths, key=lambda p: (json.load(open(p)).get("date", ""), os.path.getmtime(p)))
    with open(path) as f:
        return path, json.load(f)


# issue 12's goals for weight-only quantized decode at batch 1 on an H100 (ms per token)
QUANT_GOALS_MS = {("qwen2-7b", "int4"): 2.0, ("qwen2-72b", "int4"): 16.0, ("qwen2-57b-a14b", "int4"): 3.5}


def _decode_rows(rec: dict, batch: int) -> dict[str, dict]:
    """model -> {impl: ms, "floor", "replay"} of the floating-point decode rows at `batch`."""
    table: dict[str, dict] = {}
    for r in rec.get("decode", []):
        if r.get("batch") == batch and r.get("ms_per_token") and not r.get("quantization"):
            t = table.setdefault(r["model"], {"floor": r["floor_ms"]})
            t[r["impl"]] = r["ms_per_token"]
            if r["impl"] == "qwen2rt":
                t["replay"] = r.get("graph_replay_ms")
    return table


def _decode_bs1(rec: dict) -> dict[str, dict]:
    return _decode_rows(rec, 1)


def render_table(rec: dict, source: str) -> str:
    c = rec.get("ceilings") or {}
    tests = "; ".join((rec.get(k) or {}).get("summary", "not run").strip("= ") for k in ("gpu_tests_gate", "gpu_tests")
                      if k in rec)  # a gate, then the rest (records before the split: one run of all of them)
    lines = [f"Measured on {rec['gpu']} on {rec['date']} at commit `{rec['commit']}` (torch {rec['torch']}, triton "
             f"{rec['triton']}, transformers {rec['transformers']}); record: `{source}`. Ceilings measured in the "
             f"same run: copy {c.get('copy_GBps', float('nan')):.0f} GB/s, bf16 GEMM "
             f"{c.get('bf16_gemm_TFLOPs', float('nan')):.0f} TFLOP/s. GPU tests in that run: "
             f"{tests or 'not run'}.", "",
             "Decode, batch 1, prompt 128, random weights (MoE: near-uniform routing), ms per token (lower is better); "
             "qwen2rt end to end through the Python API, and the device time of its CUDA-graph step alone:", "",
             "| model | qwen2rt | its graph replay | HF eager | HF static + compile | floor (bytes / copy bandwidth) "
             "| qwen2rt % of floor |",
             "|---|---|---|---|---|---|---|"]
    for model, r in _decode_bs1(rec).items():
        ours = r.get("qwen2rt")
        pct = f"{100 * r['floor'] / ours:.0f}%" if ours else "-"
        lines.append(f"| {model} | {_f(ours)} | {_f(r.get('replay'))} | {_f(r.get('hf_eager'))} | "
                     f"{_f(r.get('hf_compiled'))} | {_f(r['floor'])} | {pct} |")
    batched = [(b, _decode_rows(rec, b)) for b in (4, 16)]
    if any(rows for _, rows in batched):
        lines += ["", "Decode at batch 4 and 16, ms per step (one token for each sequence; floor: weights, the "
                  "experts the batch selects, K/V):", "",
                  "| model | batch | qwen2rt | HF eager | floor | qwen2rt % of floor |", "|---|---|---|---|---|---|"]
        for b, rows in batched:
            for model, r in rows.items():
                ours = r.get("qwen2rt")
                pct = f"{100 * r['floor'] / ours:.0f}%" if ours else "-"
                lines.append(f"| {model} | {b} | {_f(ours)} | {_f(r.get('hf_eager'))} | {_f(r['floor'])} | {pct} |")
    quant = [r for r in rec.get("decode", []) if r.get("quantization") and r.get("batch") == 1
             and r.get("ms_per_token") and r["impl"] == f"qwen2rt_{r['quantization']}"]
    if quant:
        lines += ["", "Weight-only quantized decode, batch 1, ms per token (random quantized weights; floor: the "
                  "packed weight bytes read per token / copy bandwidth; goals: for an H100):", "",
                  "| model | weights | qwen2rt | its graph replay | floor | qwen2rt % of floor | goal |",
                  "|---|---|---|---|---|---|---|"]
        for r in quant:
            goal = QUANT_GOALS_MS.get((r["model"], r["quantization"]))
            lines.append(f"| {r['model']} | {r['quantization']} | {_f(r['ms_per_token'])} | "
                         f"{_f(r.get('graph_replay_ms'))} | {_f(r['floor_ms'])} | "
                         f"{100 * r['floor_ms'] / r['ms_per_token']:.0f}% | {_f(goal)} |")
    prefill = [r for r in rec.get("prefill", []) if r.get("ms")]
    if prefill:
        lines += ["", "Prefill, time to first token in ms (batch 1; floor: the larger of FLOPs / GEMM rate and weight "
                  "bytes / copy bandwidth):", "",
                  "| model | tokens | qwen2rt | its kernels | qwen2rt, eager prefill | HF | floor |",
                  "|---|---|---|---|---|---|---|"]
        by_key: dict[tuple, dict] = {}
        for r in prefill:
            entry = by_key.setdefault((r["model"], r["tokens"]), {"floor": r["floor_ms"]})
            entry[r["impl"]] = r["ms"]
            if r["impl"] == "qwen2rt":  # the device time of its kernels (records since the column was added)
                entry["kernels"] = r.get("kernel_ms")
        for (model, tokens), r in by_key.items():
            lines.append(f"| {model} | {tokens} | {_f(r.get('qwen2rt'))} | {_f(r.get('kernels'))} | "
                         f"{_f(r.get('qwen2rt_eager_prefill'))} | {_f(r.get('hf'))} | {_f(r['floor'])} |")
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def write_readme(readme: str, table: str) -> None:
    text = open(readme, encoding="utf-8").read()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{table}\n{END}{tail}")


def write_chart(rec: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _decode_bs1(rec)
    impls = [("qwen2rt", "qwen2rt"), ("hf_eager", "HF eager"), ("hf_compiled", "HF static+compile"),
             ("floor", "floor")]
    models = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(models)), 4))
    width = 0.8 / len(impls)
    for i, (key, label) in enumerate(impls):
        xs = [m + (i - 1.5) * width for m in range(len(models))]
        ax.bar(xs, [table[m].get(key) or 0 for m in models], width, label=label)
    ax.set_xticks(range(len(models)), models, rotation=15)
    ax.set_ylabel("ms per token (batch 1)")
    ax.set_yscale("log")
    ax.set_title(f"Decode latency on {rec['gpu']} ({rec['date']}, {rec['commit']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--record", default=None, help="a specific record instead of the newest")
    ap.add_argument("--readme", default="README.md", help="README to update ('' to only print)")
    ap.add_argument("--png", default="benchmarks/results/decode_bs1.png", help="chart path ('' for none)")
    args = ap.parse_args(argv)
    if args.record:
        path, rec = args.record, json.load(open(args.record))
    else:
        path, rec = newest_record(args.results)
    table = render_table(rec, os.path.relpath(path))
    print(table)
    if args.readme:
        write_readme(args.readme, table)
    if args.png:
        write_chart(rec, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
