"""Host time per decode step: the engine's own work (scheduling, the step's inputs, launching, reading back and
processing the sampled tokens) with a stub model and a stub sampler that do no device work. At batch 1 / 8 / 32 with
4K and 32K contexts (block tables of 256 and 2048 columns), with no tokenizer (token ids only) and with the byte
tokenizer (incremental detokenization on top), in two modes:
- "graphs": the decode step's device work is a stand-in CUDA graph whose replay does nothing, so the time is the
  host's alone, as in a CUDA-graph run less the two replay calls (a few µs each in the driver);
- "eager": the step's own torch ops (input gather, sampler bookkeeping) run too, as with enforce_eager.
On a GPU the same numbers say how much host time each step has to hide behind the device.

    python -m benchmarks.bench_host [--batches 1 8 32] [--contexts 4096 32768] [--modes graphs eager]
                                    [--steps 200] [--device cpu] [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from types import SimpleNamespace

import torch

import qwen2rt.model_runner as model_runner
from benchmarks.common import environment, print_rows, write_json
from qwen2rt.engine import Engine, Sequence
from qwen2rt.kv_cache import KVCache
from qwen2rt.model_runner import StepGraphs
from qwen2rt.sampling import VARIANTS, SamplingParams
from qwen2rt.tokenizer import ByteTokenizer

VOCAB = 512  # the byte tokenizer's ids and a few more
TOKEN = ord("a")  # what the stub sampler always picks: one character of text per token


class StubModel:
    """Stands in for Qwen2Model with no device work: forward and compute_logits return slices of preallocated
    tensors. A one-layer KV cache with one head of size 1 keeps 32 sequences of 32K tokens in a few MiB."""

    def __init__(self, max_tokens: int, max_rows: int, device):
        self.config = SimpleNamespace(vocab_size=VOCAB, num_hidden_layers=1, num_key_value_heads=1, head_dim=1)
        self.device = torch.device(device)
        self._hidden = torch.zeros(max_tokens, 1, device=device)
        self._logits = torch.zeros(max_rows, VOCAB, device=device)

    def forward(self, token_ids, meta, kv_caches):
        return self._hidden[:token_ids.shape[0]]

    def compute_logits(self, hidden):
        return self._logits[:hidden.shape[0]]

    def named_range(self, name):
        return contextlib.nullcontext()


class NoOpGraph:
    """A captured graph whose replay costs the host nothing: the engine's own host work is what is left."""

    def replay(self):
        pass


NO_OP_STEP = StepGraphs(NoOpGraph(), NoOpGraph())  # a decode step's forward and sampler graphs


@contextlib.contextmanager
def stub_sampler(max_rows: int, device):
    """The runner's sample_tokens replaced by one that returns preallocated token ids."""
    tokens = torch.full((max_rows,), TOKEN, dtype=torch.long, device=device)
    saved = model_runner.sample_tokens
    model_runner.sample_tokens = lambda logits, rows, state, variant="full": tokens[:logits.shape[0]]
    try:
        yield
    finally:
        model_runner.sample_tokens = saved


def host_us_per_step(batch: int, context: int, steps: int, tokenizer: bool, graphs: bool, device="cpu",
                     block_size: int = 16) -> dict:
    """Median, mean and 90th percentile µs of one engine.step() once `batch` sequences of `context` prompt tokens
    all decode."""
    warmup = 20
    max_seq_len = context + warmup + steps + 8
    model = StubModel(batch * context, batch, device)
    blocks = batch * -(-max_seq_len // block_size)
    # and the watermark the scheduler keeps free at admission: every sequence runs from the start, none is preempted
    cache = KVCache(model.config, blocks + blocks // 50 + 1, block_size, device, torch.float32)
    engine = Engine(model, cache, batch, max_seq_len, seed=0, max_prefill_tokens=batch * context)
    params = SamplingParams(max_tokens=warmup + steps + 4, temperature=0, ignore_eos=True).resolved()
    tok = ByteTokenizer(VOCAB) if tokenizer else None
    # prompt lengths differ a little, so that rows start new cache blocks at different steps, as they would
    seqs = [Sequence([1 + i % 200] * (context - i % block_size), params, max_seq_len, tok, frozenset())
            for i in range(batch)]
    if graphs:
        runner = engine.decoder
        runner.use_graphs = True
        runner.graphs.update({(b, v): NO_OP_STEP for b in runner.buckets for v in VARIANTS})
        runner.prefill_graphs.update({b: NoOpGraph() for b in runner.prefill_buckets})  # short prompts (--smoke)
        runner.prefill_logits.update({b: model.compute_logits(model._hidden[:runner.prefill_seqs])
                                      for b in runner.prefill_buckets})
        runner.tokens.fill_(TOKEN)  # what the replays would sample
    with stub_sampler(batch, device):
        for s in seqs:
            engine.add(s)
        while not all(s.output_ids for s in seqs):  # the prefill, then every sequence decodes
            engine.step()
        for _ in range(warmup):
            engine.step()
        gc.collect()
        gc.disable()  # a collection in the middle of a step is noise here, not the engine's cost
        try:
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    assert all(not s.finished and len(s.output_ids) > warmup for s in seqs) and not engine.num_preemptions
    return {"us_per_step": 1e6 * statistics.median(times), "us_mean": 1e6 * statistics.fmean(times),
            "us_p90": 1e6 * statistics.quantiles(times, n=10)[-1]}


def run(batches=(1, 8, 32), contexts=(4096, 32768), steps=200, tokenizers=(False, True), modes=("graphs", "eager"),
        device="cpu") -> list[dict]:
    rows = []
    for mode in modes:
        for context in contexts:
            for batch in batches:
                for tokenizer in tokenizers:
                    r = {"mode": mode, "batch": batch, "context": context, "tokenizer": "byte" if tokenizer else None,
                         "impl": "qwen2rt", "device": str(device)}
                    r.update(host_us_per_step(batch, context, steps, tokenizer, mode == "graphs", device))
                    rows.append(r)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--modes", nargs="+", default=["graphs", "eager"], choices=["graphs", "eager"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to include the real copies and syncs")
    ap.add_argument("--smoke", action="store_true", help="batch 1 and 2, context 64, 20 steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        rows = run(batches=[1, 2], contexts=[64], steps=20, modes=args.modes, device=args.device)
    else:
        rows = run(args.batches, args.contexts, args.steps, modes=args.modes, device=args.device)
    print_rows(rows, ["mode", "batch", "context", "tokenizer", "us_per_step", "us_mean", "us_p90"])
    write_json(args.out, {"environment": environment(), "host": rows})
    return rows


if __name__ == "__main__":
    main()
