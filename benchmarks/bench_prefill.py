"""End-to-end prefill: time to first token at 128, 512, 2048 and 8192 prompt tokens for the built-in shapes
(random weights, batch 1), against one Hugging Face transformers forward over the same prompt, in the same run;
fraction of the floor: the larger of the FLOP floor (matmul + attention FLOPs / measured bf16 GEMM rate) and the
weight-byte floor (every weight read once / measured copy bandwidth). qwen2rt rows also carry kernel_ms: the
device time of one prefill's kernels (profiled), against which the time to first token shows the host's share.
Prompts that fit a prefill CUDA graph (model_runner.DEFAULT_PREFILL_BUCKETS) are also timed with every prefill
eager (impl qwen2rt_eager_prefill), in the same run.
Prompts longer than a model's context are recorded as skipped.

    python -m benchmarks.bench_prefill [--models M ...] [--tokens 128 512 2048 8192] [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_decode import MODELS, _prompts, load_llm
from benchmarks.common import device_default, free_device_memory, measure_ceilings, print_rows, write_json
from benchmarks.hf_baseline import hf_model, prefill_ms
from qwen2rt import LLM, SamplingParams
from qwen2rt.models.config import Qwen2Config, builtin_config
from qwen2rt.profiling import prefill_kernel_ms


def prefill_flops(config: Qwen2Config, tokens: int, cached: int = 0) -> float:
    """2 x active matmul parameters x tokens (lm_head for the last token only) + causal attention of the `tokens`
    new ones over the `cached` tokens before them (a prefix-cache hit) and over each other."""
    c = config
    weights = c.bytes_per_token(1) - c.vocab_size * c.hidden_size  # active parameters without the lm_head
    attn = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * tokens * (cached + tokens / 2)
    return 2 * weights * tokens + 2 * c.vocab_size * c.hidden_size + attn


def prefill_weight_bytes(config: Qwen2Config, dtype_bytes: int) -> int:
    """Weight bytes a prefill must read at least once: every weight but the embedding table (a tied lm_head reads
    it once), all experts included (a long prompt selects every one)."""
    c = config
    embed = c.vocab_size * c.hidden_size
    return (c.parameter_count() - (0 if c.tie_word_embeddings else embed)) * dtype_bytes


def ttft_ms(llm: LLM, ids: list[list[int]]) -> float:
    """Best of two times to first token of one greedy token, after a warm-up."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate(ids, params)
    return 1000 * min(llm.generate(ids, params)[0].time_to_first_token_s for _ in range(2))


def run(device, ceilings, models=MODELS, tokens=(128, 512, 2048, 8192), dtype=torch.bfloat16, hf=True):
    rows = []
    for name in models:
        config = builtin_config(name)

        # the weights are read at least once whatever the prompt length: at 128 tokens that floor dominates
        # (Qwen2-7B: 4.7 ms of bytes vs 2.1 ms of FLOPs on an H100)
        weight_floor = prefill_weight_bytes(config, torch.empty((), dtype=dtype).element_size()) \
            / ceilings["copy_GBps"] / 1e6
        fits = [t for t in tokens if t < config.max_position_embeddings]

        def row(t, impl, ms, **extra):
            flop_floor = prefill_flops(config, t) / ceilings["bf16_gemm_TFLOPs"] / 1e9
            floor = max(flop_floor, weight_floor)
            r = {"model": name, "tokens": t, "impl": impl, "ms": ms, "floor_ms": floor, "flop_floor_ms": flop_floor,
                 "weight_floor_ms": weight_floor, "pct_of_floor": 100 * floor / ms if ms else None}
            r.update(extra)
            return r

        for t in sorted(set(tokens) - set(fits)):  # said, not silently dropped
            rows.append(row(t, "qwen2rt", None, skipped=f"longer than the model's context "
                                                        f"({config.max_position_embeddings})"))
        tokens = fits
        try:
            # no prefix caching: the timed prompts repeat the warm-up's, and would reuse all but its last block
            llm, prefill_graph_error = load_llm(name, device=device, dtype=dtype, max_batch_size=1,
                                                max_seq_len=min(max(tokens) + 8, config.max_position_embeddings),
                                                enable_prefix_caching=False)
            if prefill_graph_error:  # the rows below are eager prefills
                rows.append(row(tokens[0], "qwen2rt_prefill_graphs", None, error=prefill_graph_error))
            runner = llm.engine.decoder
            for t in tokens:
                ids = _prompts(1, t, config.vocab_size)
                replays = runner.prefill_replays
                ms = ttft_ms(llm, ids)
                graph = runner.prefill_replays > replays  # the prompt's prefill replayed a graph
                # the GPU's busy time within it (an eager prefill's kernels, the same ones a graph holds): a time to
                # first token far above it is host-bound (launches)
                kernel_ms = prefill_kernel_ms(llm, t)
                rows.append(row(t, "qwen2rt", ms, backend=llm.backend.name, kernel_ms=kernel_ms, prefill_graph=graph))
                if graph:  # the same prompt with every prefill eager, as before prefill graphs
                    buckets, runner.prefill_buckets = runner.prefill_buckets, []
                    try:
                        rows.append(row(t, "qwen2rt_eager_prefill", ttft_ms(llm, ids), backend=llm.backend.name))
                    finally:
                        runner.prefill_buckets = buckets
            del llm
        except Exception as e:
            rows.append(row(tokens[0], "qwen2rt", None, error=repr(e)[:300]))
        free_device_memory()
        if not hf:
            continue
        try:
            model = hf_model(config, device, dtype, experts_implementation="grouped_mm" if config.is_moe else None)
            for t in tokens:
                ids = torch.tensor(_prompts(1, t, config.vocab_size), device=device)
                rows.append(row(t, "hf", prefill_ms(model, ids)))
            del model
        except Exception as e:
            rows.append(row(tokens[0], "hf", None, error=repr(e)[:300]))
        free_device_memory()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048, 8192])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = device_default()
    ceilings = measure_ceilings(device, small=args.smoke)
    if args.smoke:
        rows = run(device, ceilings, models=["tiny", "tiny-moe"], tokens=[8, 32], dtype=torch.float32)
    else:
        rows = run(device, ceilings, models=args.models, tokens=args.tokens)
    print_rows(rows, ["model", "tokens", "impl", "ms", "floor_ms", "pct_of_floor"])
    write_json(args.out, {"ceilings": ceilings, "prefill": rows})
    return rows


if __name__ == "__main__":
    main()
