"""The sampler: qwen2rt's Triton kernels vs the PyTorch sampler eager vs torch.compile of it, at Qwen2's vocabulary
(151936) and batch 1 / 8 / 32, in its three forms: greedy, topk (Qwen instruct defaults: temperature 0.7, top_k 20,
top_p 0.8, repetition penalty 1.05) and full (top_p 0.9 with no top-k, the form that sorts the whole vocabulary in
torch). GB/s counts the float32 logits read once (the least any sampler moves), against the copy ceiling.

    python -m benchmarks.bench_sampler [--smoke] [--no-compile] [--out FILE.json]
"""

from __future__ import annotations

import torch

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row, maybe_compile
from qwen2rt.kernels import sampler
from qwen2rt.sampling import SamplerState, SamplingParams, row_values, rows_tensor, sample_tokens_ref

VOCAB = 151936
BATCHES = [1, 8, 32]
FORMS = {
    "greedy": SamplingParams(temperature=0),
    "topk": SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    "full": SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.05),
}


def run(device, ceilings, vocab=VOCAB, batches=BATCHES, compile_baseline=True):
    rows_out = []
    compiled = maybe_compile(sample_tokens_ref, device) if compile_baseline else None
    for b in batches:
        logits = torch.randn(b, vocab, device=device) * 3
        state = SamplerState(b, vocab, device)
        for slot in range(b):
            state.seen[slot, torch.randint(0, vocab, (200,))] = True
        for form, params in FORMS.items():
            rows = rows_tensor([row_values(params.resolved(), 1000 + i, 5, i) for i in range(b)], device)
            shape = f"B={b} V={vocab} {form}"
            impls = {
                # as the engine calls them: with the bias and held rows (no row here asks for them)
                "qwen2rt": lambda: sampler.sample(logits, rows, state.counts, state.seen, form, bias=state.bias,
                                                  held=state.held),
                "torch_eager": lambda: sample_tokens_ref(logits, rows, state.counts, state.seen, form,
                                                         bias=state.bias, held=state.held),
                "torch_compile": (lambda: compiled(logits, rows, state.counts, state.seen, form, bias=state.bias,
                                                   held=state.held)) if compiled else None,
            }
            for impl, fn in impls.items():
                if fn is None:
                    continue
                try:
                    rows_out.append(kernel_row("sampler", shape, impl, bench_ms(fn, device), 4 * b * vocab, None,
                                               ceilings))
                except Exception as e:  # e.g. torch.compile unavailable: record why, keep going
                    rows_out.append({"kernel": "sampler", "shape": shape, "impl": impl, "error": repr(e)[:200]})
    return rows_out


def main(argv=None):
    """GPU numbers; without CUDA only --smoke runs (tiny shapes through the Triton interpreter), else it skips."""
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if not torch.cuda.is_available() and "--smoke" not in argv and not {"-h", "--help"} & set(argv):
        print("bench_sampler: no CUDA GPU, skipped (--smoke runs tiny shapes through the interpreter)")
        return []
    smoke = dict(vocab=300, batches=[2])
    return kernel_bench_main(__doc__, argv, run, smoke, compile_flag=True)


if __name__ == "__main__":
    main()
