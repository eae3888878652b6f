"""End-to-end decode: ms per generated token at batch 1 (and 4, 16) for the built-in shapes (random weights,
prompt 128), against Hugging Face transformers eager and HF with a static cache + torch.compile(reduce-overhead),
all in the same run, and qwen2rt with enforce_eager (no CUDA graphs) beside it; graph capture time and memory;
the summed kernel time of one decode step (graph replay over it: the launch gaps left); load and first-request time
with graphs captured at start-up vs lazily; sampled decoding (top-k and full sampler) beside greedy.
Reports the weight bytes read per token, the floor (bytes / measured copy bandwidth) and the fraction of the floor
reached.

    python -m benchmarks.bench_decode [--models M ...] [--batches 1 4 16] [--steps 32] [--compiled-models M ...]
                                      [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import device_default, free_device_memory, measure_ceilings, print_rows, write_json
from benchmarks.hf_baseline import decode_ms_per_token, hf_model, time_generate
from qwen2rt import LLM, SamplingParams
from qwen2rt.models.config import builtin_config
from qwen2rt.profiling import decode_step_ms

MODELS = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b-4l"]
# torch.compile of a whole HF model takes tens of seconds per shape: by default only the smallest one, so that
# gpu_check.sh stays within its ~5 minutes, and at batch 1 only. Pass --compiled-models to add more.
COMPILED_MODELS = ["qwen2-0.5b"]
# capture at start-up vs on first use (load time and first-request time of each): measured on the smallest model
LAZY_MODELS = ["qwen2-0.5b"]
SAMPLED_MODELS = ["qwen2-0.5b"]  # where the sampler's share of a step is largest


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 32000), (batch, prompt_len), generator=g).tolist()


# sampled decoding (the benchmark's other rows are greedy): Qwen's instruct defaults (the top-k sampler) and a
# nucleus-only request (the full sampler, which sorts the vocabulary)
SAMPLED = {"qwen2rt_sampled_topk": dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=0),
           "qwen2rt_sampled_full": dict(temperature=0.7, top_p=0.8, seed=0)}


def qwen2rt_ms_per_token(llm: LLM, batch: int, prompt_len: int, steps: int, **sampling) -> tuple[float, float]:
    """-> (median ms per decoded token, seconds of the first (warm-up) request at this batch size, which includes
    capturing its graph when capture is lazy). Greedy unless `sampling` says otherwise."""
    params = SamplingParams(max_tokens=steps, ignore_eos=True, **(sampling or dict(temperature=0)))
    t0 = time.perf_counter()
    llm.generate(_prompts(batch, prompt_len, llm.config.vocab_size), SamplingParams(max_tokens=4, temperature=0,
                                                                                     ignore_eos=True))
    first_s = time.perf_counter() - t0
    outs = llm.generate(_prompts(batch, prompt_len, llm.config.vocab_size), params)
    return statistics.median(1000 / o.decode_tokens_per_s for o in outs), first_s


def run(device, ceilings, models=MODELS, batches=(1, 4, 16), prompt_len=128, steps=32, dtype=torch.bfloat16,
        compiled_models=COMPILED_MODELS, compiled_batches=(1,), hf=True, eager_baseline=True,
        lazy_models=LAZY_MODELS, sampled_models=SAMPLED_MODELS):
    rows = []
    for name in models:
        config = builtin_config(name)
        nbytes = config.bytes_per_token(torch.empty((), dtype=dtype).element_size())
        floor_ms = nbytes / ceilings["copy_GBps"] / 1e6

        def row(batch, impl, ms, **extra):
            r = {"model": name, "batch": batch, "impl": impl, "ms_per_token": ms, "floor_ms": floor_ms,
                 "bytes_per_token": nbytes, "pct_of_floor": 100 * floor_ms / ms if ms else None}
            r.update(extra)
            return r

        # graphs captured at start-up (the default), no graphs, and (for lazy_models) graphs captured on first use
        variants = [("qwen2rt", False, "startup"), ("qwen2rt_eager", True, "startup")]
        if name in lazy_models:
            variants.append(("qwen2rt_lazy", False, "lazy"))
        for impl, eager, capture in variants:
            if eager and not eager_baseline:
                continue
            try:
                t0 = time.perf_counter()
                llm = LLM(name, device=device, dtype=dtype, max_seq_len=prompt_len + steps + 16,
                          max_batch_size=max(batches), enforce_eager=eager, capture_graphs=capture)
                load_s = time.perf_counter() - t0
                dec = llm.engine.decoder
                for b in batches:
                    ms, first_s = qwen2rt_ms_per_token(llm, b, prompt_len, steps)
                    extra = {}
                    if eager and llm.device.type == "cuda":  # the step's kernels alone: a replay with no gaps
                        extra["kernel_ms_per_step"] = decode_step_ms(llm, b, prompt_len)
                    rows.append(row(b, impl, ms, backend=llm.backend.name, graphs=llm.use_graphs, load_s=load_s,
                                    first_request_s=first_s, graph_capture_s=dec.capture_s,
                                    graph_mib=dec.capture_mib, **extra))
                if impl == "qwen2rt" and name in sampled_models:  # the sampler's cost, at batch 1
                    for label, sampling in SAMPLED.items():
                        ms, _ = qwen2rt_ms_per_token(llm, 1, prompt_len, steps, **sampling)
                        rows.append(row(1, label, ms, graphs=llm.use_graphs))
                del llm, dec
            except Exception as e:
                rows.append(row(None, impl, None, error=repr(e)[:300]))
            free_device_memory()
        kernels = {r["batch"]: r.get("kernel_ms_per_step") for r in rows
                   if r["model"] == name and r["impl"] == "qwen2rt_eager"}
        for r in rows:  # graph replay time over the sum of its kernels' times (the issue's target: <= 1.1)
            if r["model"] == name and r["impl"] == "qwen2rt" and r["ms_per_token"] and kernels.get(r["batch"]):
                r["graph_over_kernels"] = r["ms_per_token"] / kernels[r["batch"]]
        if not hf:
            continue
        try:
            model = hf_model(config, device, dtype)
            # MoE: transformers' default experts implementation (it may differ between prefill and decode)
            experts = {"hf_experts": getattr(model.config, "_experts_implementation", None)} if config.is_moe else {}
            for b in batches:
                ids = torch.tensor(_prompts(b, prompt_len, config.vocab_size), device=device)
                rows.append(row(b, "hf_eager", decode_ms_per_token(model, ids, steps), **experts))
            if name in compiled_models:
                # transformers compiles the decode forward itself when the cache is static (on CUDA); it is only
                # told how: CUDA graphs (reduce-overhead), one graph for the whole forward
                from torch import _dynamo
                from transformers import CompileConfig

                model.generation_config.cache_implementation = "static"
                for b in [b for b in batches if b in compiled_batches]:
                    ids = torch.tensor(_prompts(b, prompt_len, config.vocab_size), device=device)
                    t0 = time.perf_counter()
                    for fullgraph in (True, False):  # graph breaks are allowed only if one whole graph fails
                        model.generation_config.compile_config = CompileConfig(fullgraph=fullgraph,
                                                                               mode="reduce-overhead")
                        try:
                            time_generate(model, ids, steps)  # compiles for this batch size and cache length
                            break
                        except Exception:
                            if not fullgraph:
                                raise
                            _dynamo.reset()
                    compile_s = time.perf_counter() - t0
                    rows.append(row(b, "hf_compiled", decode_ms_per_token(model, ids, steps), compile_s=compile_s,
                                    fullgraph=fullgraph, **experts))
            del model
        except Exception as e:
            rows.append(row(None, "hf", None, error=repr(e)[:300]))
        free_device_memory()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--compiled-models", nargs="*", default=COMPILED_MODELS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = device_default()
    ceilings = measure_ceilings(device, small=args.smoke)
    if args.smoke:
        rows = run(device, ceilings, models=["tiny", "tiny-moe"], batches=[1, 2], prompt_len=8, steps=4,
                   dtype=torch.float32, compiled_models=[], lazy_models=["tiny"], sampled_models=["tiny"])
    else:
        rows = run(device, ceilings, models=args.models, batches=args.batches, prompt_len=args.prompt_len,
                   steps=args.steps, compiled_models=args.compiled_models)
    print_rows(rows, ["model", "batch", "impl", "ms_per_token", "floor_ms", "pct_of_floor"])
    write_json(args.out, {"ceilings": ceilings, "decode": rows})
    return rows


if __name__ == "__main__":
    main()
