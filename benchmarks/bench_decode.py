"""End-to-end decode: ms per decode step at batch 1 (and 4, 16) for the built-in shapes (random weights, prompt
128, 32 steps; the median of 3 requests), against Hugging Face transformers eager and HF with a static cache +
torch.compile(reduce-overhead) (steady state: (generate 64 - generate 32) / 32, median of 3), all in the same run,
and qwen2rt with enforce_eager (no CUDA graphs) beside it. Also: the device time of one step alone (back-to-back
graph replays timed with CUDA events; the end-to-end step minus it is host time), the summed kernel time of one
eager step (the replay over it: the launch gaps left), graph capture time and memory, load and first-request time
with graphs captured at start-up vs lazily, sampled decoding (top-k and full sampler) beside greedy, and batch 1 at
the model's full context (max_seq_len 131072, as users get it) beside the short benchmark context.
The floor is the bytes a step must read (weights; in MoE layers the experts the batch's tokens select under uniform
routing; each sequence's K/V) over the measured copy bandwidth. Random weights route near-uniformly.
With --quantization (int8, int4, fp8) qwen2rt's decoder linears are random quantized weights and the floor counts
their quantized bytes; the Hugging Face baselines stay in the float dtype.

    python -m benchmarks.bench_decode [--models M ...] [--batches 1 4 16] [--steps 32] [--compiled-models M ...]
                                      [--quantization int4] [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import device_default, free_device_memory, measure_ceilings, print_rows, write_json
from benchmarks.hf_baseline import decode_ms_per_token, hf_model, time_generate
from qwen2rt import LLM, SamplingParams
from qwen2rt.model_runner import PrefillGraphError
from qwen2rt.models.config import builtin_config
from qwen2rt.models.quant import at_load_config, linear_bytes, weight_bytes
from qwen2rt.profiling import decode_step_ms

MODELS = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b-4l"]
# torch.compile of a whole HF model takes tens of seconds per shape: by default the smallest and the 7B, at batch 1.
COMPILED_MODELS = ["qwen2-0.5b", "qwen2-7b"]
# capture at start-up vs on first use (load time and first-request time of each): measured on the smallest model
LAZY_MODELS = ["qwen2-0.5b"]
SAMPLED_MODELS = ["qwen2-0.5b"]  # where the sampler's share of a step is largest
# also at batch 1 with the model's full context (max_position_embeddings, 131072 for Qwen2): the decode attention's
# split count follows max_seq_len, so the short benchmark context alone would flatter it
MAXCTX_MODELS = ["qwen2-0.5b", "qwen2-7b"]


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 32000), (batch, prompt_len), generator=g).tolist()


def decode_bytes(config, batch: int, context: int, dtype_bytes: int, quantization: str | None = None) -> float:
    """Bytes one decode step of `batch` sequences at `context` tokens each must read: the weights (the decoder linears
    quantized when `quantization` says so), where in MoE layers a batch reads every expert that at least one of its
    tokens selects (under uniform routing, which random weights give, E * (1 - (1 - k/E)^B) experts: 16 tokens touch
    ~40 of Qwen1.5-MoE's 60), plus each sequence's K and V."""
    quant = at_load_config(quantization) if quantization else None
    nbytes = float(weight_bytes(config, dtype_bytes, quant)[1])
    if config.is_moe and batch > 1:
        e, k = config.num_experts, config.num_experts_per_tok
        h, inter = config.hidden_size, config.moe_intermediate_size
        per_expert = (3 * h * inter * dtype_bytes if quant is None else
                      linear_bytes(quant, 2 * inter, h, dtype_bytes) + linear_bytes(quant, h, inter, dtype_bytes))
        moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        nbytes += moe_layers * (e * (1 - (1 - k / e) ** batch) - k) * per_expert
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes
    return nbytes + batch * context * kv_per_token


# sampled decoding (the benchmark's other rows are greedy): Qwen's instruct defaults (the top-k sampler) and a
# nucleus-only request (the full sampler, which sorts the vocabulary)
SAMPLED = {"qwen2rt_sampled_topk": dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=0),
           "qwen2rt_sampled_full": dict(temperature=0.7, top_p=0.8, seed=0)}


def load_llm(name: str, **kwargs) -> tuple[LLM, str | None]:
    """LLM(name, **kwargs) and None; when capturing a prefill graph fails, the LLM without prefill graphs and that
    error (prefill graphs are the newest: their failure must not cost the decode rows, and says so in them). Any
    other failure, a decode graph's included, is raised."""
    try:
        return LLM(name, **kwargs), None
    except RuntimeError as e:
        if not isinstance(e.__cause__, PrefillGraphError):
            raise
        error = repr(e)[:300]
    free_device_memory()
    return LLM(name, **{**kwargs, "cuda_graph_prefill_tokens": ()}), error


def qwen2rt_ms_per_token(llm: LLM, batch: int, prompt_len: int, steps: int, repeats: int = 3,
                         **sampling) -> tuple[float, float, list[float]]:
    """-> (median over `repeats` requests of the ms per decode step, seconds of the first (warm-up) request at this
    batch size, which includes capturing its graph when capture is lazy, the sorted per-request ms). Each step is
    wall clock through the public API: host work and the graph replay together. Greedy unless `sampling` says
    otherwise."""
    params = SamplingParams(max_tokens=steps, ignore_eos=True, **(sampling or dict(temperature=0)))
    t0 = time.perf_counter()
    llm.generate(_prompts(batch, prompt_len, llm.config.vocab_size), SamplingParams(max_tokens=4, temperature=0,
                                                                                     ignore_eos=True))
    first_s = time.perf_counter() - t0
    per_request = []
    for r in range(repeats):
        outs = llm.generate(_prompts(batch, prompt_len, llm.config.vocab_size, seed=r + 1), params)
        per_request.append(statistics.median(1000 / o.decode_tokens_per_s for o in outs))
    return statistics.median(per_request), first_s, sorted(per_request)


def graph_replay_ms(llm: LLM, batch: int, replays: int = 50) -> float | None:
    """Device time of one greedy decode step: back-to-back replays of its CUDA graph timed with CUDA events, on the
    buffers of the last step run (the replays rewrite one cache slot of a finished sequence, which nothing reads).
    The end-to-end ms per step minus this is the host's share."""
    dec = llm.engine.decoder
    graph = dec.graphs.get((dec.bucket(batch), "greedy"))
    if graph is None or llm.device.type != "cuda":
        return None
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def run(device, ceilings, models=MODELS, batches=(1, 4, 16), prompt_len=128, steps=32, dtype=torch.bfloat16,
        compiled_models=COMPILED_MODELS, compiled_batches=(1,), hf=True, eager_baseline=True,
        lazy_models=LAZY_MODELS, sampled_models=SAMPLED_MODELS, maxctx_models=MAXCTX_MODELS, repeats=3,
        qwen2rt=True, hf_eager=True, quantization=None, hf_eager_repeats=None):
    """-> decode rows. `qwen2rt`, `hf_eager` and `hf` (all HF rows) switch parts off, so that a caller can run the
    costly torch.compile baseline separately. `quantization` (None, "int8", "int4", "fp8") is passed to qwen2rt's
    LLM; the floor of every row then counts the quantized weight bytes (the HF rows stay in `dtype`).
    hf_eager_repeats: the HF eager baseline's repeats (default `repeats`; each is 96 tokens at HF's 20-70 ms per
    token on the GPU check's shapes)."""
    rows = []
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    context = prompt_len + steps // 2  # the mean context of the timed steps
    bench_max_seq_len = prompt_len + 2 * steps + 16
    for name in models:
        config = builtin_config(name)

        def row(batch, impl, ms, **extra):
            nbytes = decode_bytes(config, batch or 1, context, dtype_bytes, quantization)
            floor_ms = nbytes / ceilings["copy_GBps"] / 1e6
            r = {"model": name, "batch": batch, "impl": impl, "ms_per_token": ms, "floor_ms": floor_ms,
                 "bytes_per_step": nbytes, "context": context, "pct_of_floor": 100 * floor_ms / ms if ms else None,
                 "quantization": quantization}
            if batch and batch > 1:  # every sequence of the batch gets one token per step
                r["ms_per_step"] = ms
                r["unit"] = "ms per step (one token for each of the batch's sequences)"
            r.update(extra)
            return r

        # graphs captured at start-up (the default), no graphs, graphs captured on first use, the full context
        variants = [("qwen2rt", False, "startup", bench_max_seq_len, batches),
                    ("qwen2rt_eager", True, "startup", bench_max_seq_len, batches)]
        if name in lazy_models:
            variants.append(("qwen2rt_lazy", False, "lazy", bench_max_seq_len, batches))
        if name in maxctx_models and 1 in batches:
            variants.append(("qwen2rt_maxctx", False, "startup", None, [1]))
        for impl, eager, capture, max_seq_len, impl_batches in variants if qwen2rt else []:
            if eager and not eager_baseline:
                continue
            try:
                t0 = time.perf_counter()
                llm, prefill_graph_error = load_llm(
                    name, device=device, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=max(impl_batches),
                    enforce_eager=eager, capture_graphs=capture, quantization=quantization)
                if prefill_graph_error:
                    rows.append(row(None, impl, None, error=f"prefill graphs (the rows below have none): "
                                                            f"{prefill_graph_error}"))
                load_s = time.perf_counter() - t0
                dec = llm.engine.decoder
                for b in impl_batches:
                    ms, first_s, spread = qwen2rt_ms_per_token(llm, b, prompt_len, steps, repeats)
                    extra = {}
                    if eager and llm.device.type == "cuda":  # the step's kernels alone, summed: no launch gaps
                        extra["kernel_ms_per_step"] = decode_step_ms(llm, b, prompt_len)
                    if not eager:
                        extra["graph_replay_ms"] = graph_replay_ms(llm, b)
                    rows.append(row(b, impl, ms, backend=llm.backend.name, graphs=llm.use_graphs, load_s=load_s,
                                    first_request_s=first_s, graph_capture_s=dec.capture_s,
                                    prefill_graph_capture_s=dec.prefill_capture_s,
                                    graph_mib=dec.capture_mib, max_seq_len=llm.max_seq_len, ms_spread=spread,
                                    **extra))
                if impl == "qwen2rt" and name in sampled_models:  # the sampler's cost, at batch 1
                    for label, sampling in SAMPLED.items():
                        ms, _, spread = qwen2rt_ms_per_token(llm, 1, prompt_len, steps, repeats, **sampling)
                        rows.append(row(1, label, ms, graphs=llm.use_graphs, max_seq_len=llm.max_seq_len,
                                        ms_spread=spread))
                del llm, dec
            except Exception as e:
                rows.append(row(None, impl, None, error=repr(e)[:300]))
            free_device_memory()
        kernels = {r["batch"]: r.get("kernel_ms_per_step") for r in rows
                   if r["model"] == name and r["impl"] == "qwen2rt_eager"}
        for r in rows:  # the graph's device time over the sum of its kernels' times (the launch gaps left)
            if r["model"] == name and r["impl"] == "qwen2rt" and r.get("graph_replay_ms") and kernels.get(r["batch"]):
                r["graph_over_kernels"] = r["graph_replay_ms"] / kernels[r["batch"]]
        if not hf:
            continue
        try:
            model = hf_model(config, device, dtype)
            # MoE: transformers' default experts implementation (it may differ between prefill and decode)
            experts = {"hf_experts": getattr(model.config, "_experts_implementation", None)} if config.is_moe else {}
            for b in batches if hf_eager else []:
                ids = torch.tensor(_prompts(b, prompt_len, config.vocab_size), device=device)
                stats = {}
                ms = decode_ms_per_token(model, ids, steps, hf_eager_repeats or repeats, stats)
                rows.append(row(b, "hf_eager", ms, **stats, **experts))
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
                            time_generate(model, ids, 2 * steps)  # compiles for this batch size and cache length
                            break
                        except Exception:
                            if not fullgraph:
                                raise
                            _dynamo.reset()
                    compile_s = time.perf_counter() - t0
                    stats = {}
                    ms = decode_ms_per_token(model, ids, steps, repeats, stats)
                    rows.append(row(b, "hf_compiled", ms, compile_s=compile_s, fullgraph=fullgraph, **stats,
                                    **experts))
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
    ap.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"],
                    help="qwen2rt with its decoder linears quantized (random quantized weights)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = device_default()
    ceilings = measure_ceilings(device, small=args.smoke)
    if args.smoke:
        # HF's steady state is a difference of two generate() times: 12 steps, median of 3, so that a loaded CPU's
        # noise does not swallow it (4 steps once timed once gave a negative difference under load)
        rows = run(device, ceilings, models=["tiny", "tiny-moe"], batches=[1, 2], prompt_len=8, steps=12,
                   dtype=torch.float32, compiled_models=[], lazy_models=["tiny"], sampled_models=["tiny"],
                   maxctx_models=["tiny"], repeats=1, quantization=args.quantization, hf_eager_repeats=3)
    else:
        rows = run(device, ceilings, models=args.models, batches=args.batches, prompt_len=args.prompt_len,
                   steps=args.steps, compiled_models=args.compiled_models, quantization=args.quantization)
    print_rows(rows, ["model", "batch", "impl", "ms_per_token", "floor_ms", "pct_of_floor"])
    write_json(args.out, {"ceilings": ceilings, "decode": rows})
    return rows


if __name__ == "__main__":
    main()
