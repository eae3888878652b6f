"""Serving: time to first token with the prefix cache (a shared system prompt, cold and warm), and the OpenAI server's
added latency over the Python API.

- prefix: a 2,000-token system prompt plus a 50-token question, one request at a time, max_tokens 1. "cold": a new
  system prompt every time (a miss: the cache's cost at a 0% hit rate), "warm": the same system prompt with a new
  question (a hit on its full blocks), and the baseline "off": the same requests on an LLM with
  enable_prefix_caching=False. "burst": `burst` requests with one new system prompt and different questions,
  submitted together (the first computes the system prompt; with caching the others take its blocks in the same
  step); its time is the last request's time to first token. Median time to first token
  (RequestOutput.time_to_first_token_s) of `repeats`, beside the floor of the tokens actually prefilled: max(their
  FLOPs / the bf16 GEMM rate, the weights read once / the copy bandwidth), both measured in the same run;
  vs_no_caching divides it by the same case's time with caching off.
- priority: every slot (max_batch_size) busy with a long request (`long` tokens, priority 1), then one urgent
  request (a 50-token question, max_tokens 1, priority 0): its time to first token with scheduling_policy "fcfs"
  (it waits for a slot) and "priority" (it preempts a long one, which recomputes), and the time the long requests
  take to finish in each.
- structured: batch 1, greedy, a free request of `tokens` tokens against one held by structured outputs to exactly
  that text (a choice of one string): the cost of structured outputs per token, with each step's forward launched
  before the step before is read back and its sampling after the mask is written (the default), and "serial", with
  Engine.split_structured_steps off (the whole step launched after the read-back: the device idles meanwhile).
- server: the same model behind `python -m qwen2rt serve`'s app (uvicorn in a thread on 127.0.0.1, requests by
  httpx, one at a time) against LLM.generate on the same LLM, at max_tokens 1 (the added latency per request) and
  `tokens` (the added latency per token, after the per-request part). Skipped (recorded as such) without the serve
  extra or httpx, as on the lent GPU machine unless its wheels are carried.

    python -m benchmarks.bench_serving [--model qwen2-7b] [--system 2000] [--question 50] [--repeats 5]
                                       [--burst 4] [--tokens 64] [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import socket
import statistics
import threading
import time

import torch

from benchmarks.bench_prefill import prefill_flops, prefill_weight_bytes
from benchmarks.common import device_default, environment, measure_ceilings, print_rows, write_json
from qwen2rt import LLM, SamplingParams
from qwen2rt.kv_cache import kv_bytes_per_token


def _prompts(vocab: int, length: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def _ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
    return out.time_to_first_token_s * 1e3, out.num_cached_tokens


def _burst(llm: LLM, prompts: list[list[int]]) -> tuple[float, int]:
    """-> (the last of the prompts' times to first token, ms; their cached tokens in all), submitted together."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return max(o.time_to_first_token_s for o in outs) * 1e3, sum(o.num_cached_tokens for o in outs)


def _free(llm) -> None:
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_prefix(model: str, device, ceilings: dict, system: int = 2000, question: int = 50, repeats: int = 5,
               burst: int = 4, **llm_args) -> list[dict]:
    rows = []
    results = {}
    for caching in (True, False):
        llm = LLM(model, device=device, enable_prefix_caching=caching, **llm_args)
        vocab = llm.model.config.vocab_size
        systems = _prompts(vocab, system, repeats + 2, seed=1)
        questions = _prompts(vocab, question, repeats + 2, seed=2)
        _ttft(llm, systems[-1] + questions[-1])  # warm-up: compiles, fills nothing that the runs below reuse
        cold = [_ttft(llm, systems[i] + questions[i]) for i in range(repeats)]  # a new system prompt each time
        shared = systems[-2]
        _ttft(llm, shared + questions[-2])  # caches the shared system prompt's blocks
        warm = [_ttft(llm, shared + questions[i]) for i in range(repeats)]
        bursts = [_burst(llm, [s + q for q in _prompts(vocab, question, burst, seed=10 + i)])
                  for i, s in enumerate(_prompts(vocab, system, repeats, seed=5))]  # a new system prompt each
        results[caching] = (cold, warm, bursts)
        _free(llm)
    config = llm_config(model)
    dtype_bytes = 4 if llm_args.get("dtype") == "float32" else 2
    weight_floor = prefill_weight_bytes(config, dtype_bytes) / ceilings["copy_GBps"] / 1e6
    kv_token = kv_bytes_per_token(config, torch.bfloat16 if dtype_bytes == 2 else torch.float32)
    for caching, (cold, warm, bursts) in results.items():
        for case, runs in (("cold", cold), ("warm", warm), ("burst", bursts)):
            cached = statistics.median(c for _, c in runs)
            ttft = statistics.median(ms for ms, _ in runs)
            requests = burst if case == "burst" else 1
            # requests after the first take cached / (requests - 1) tokens each (a burst) or all `cached` (one)
            each = cached / max(1, requests - 1) if case == "burst" else cached
            flops = prefill_flops(config, int(system + question - each), int(each)) * (requests - (case == "burst"))
            if case == "burst":
                flops += prefill_flops(config, system + question, 0)
            # a hit's new tokens attend over the cached ones too, whose K/V are read from the cache
            floor = max(flops / ceilings["bf16_gemm_TFLOPs"] / 1e9,
                        weight_floor + cached * kv_token / ceilings["copy_GBps"] / 1e6)
            rows.append(dict(bench="prefix", model=model, case=case, prefix_caching=caching, ttft_ms=ttft,
                             prompt=f"{requests}x {system}+{question}" if case == "burst" else f"{system}+{question}",
                             cached_tokens=cached, floor_ms=floor, pct_of_floor=100 * floor / ttft))
    for r in rows:
        off = next(o["ttft_ms"] for o in rows if not o["prefix_caching"] and o["case"] == r["case"])
        r["vs_no_caching"] = r["ttft_ms"] / off if off else None
    return rows


def run_server(model: str, device, tokens: int = 64, repeats: int = 5, **llm_args) -> list[dict]:
    try:
        import httpx
        import uvicorn

        from qwen2rt.server import build_app
    except ImportError as e:
        return [dict(bench="server", model=model, skipped=f"no serve extra / httpx here ({e})")]
    llm = LLM(model, device=device, enable_prefix_caching=False, **llm_args)
    prompt = _prompts(llm.model.config.vocab_size, 64, 1, seed=3)[0]

    def api(n):
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return (time.perf_counter() - start) * 1e3

    api(tokens)  # warm-up
    api_ms = {n: statistics.median(api(n) for _ in range(repeats)) for n in (1, tokens)}
    with socket.socket() as sock:  # a free port; uvicorn binds it itself, as `qwen2rt serve` does
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(llm, model), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}/v1/completions"
    client = httpx.Client(timeout=600)

    def http(n):
        body = dict(model=model, prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        r = client.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})
        r.raise_for_status()
        return (time.perf_counter() - start) * 1e3

    try:
        http(tokens)  # warm-up
        server_ms = {n: statistics.median(http(n) for _ in range(repeats)) for n in (1, tokens)}
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)
        _free(llm)
    per_request = server_ms[1] - api_ms[1]
    per_token = (server_ms[tokens] - api_ms[tokens] - per_request) / (tokens - 1)
    return [dict(bench="server", model=model, max_tokens=n, api_ms=api_ms[n], server_ms=server_ms[n],
                 added_ms=server_ms[n] - api_ms[n]) for n in (1, tokens)] + [
        dict(bench="server", model=model, added_per_request_ms=per_request, added_per_token_ms=per_token)]


def run_priority(model: str, device, question: int = 50, long: int = 128, **llm_args) -> list[dict]:
    rows = []
    for policy in ("fcfs", "priority"):
        llm = LLM(model, device=device, scheduling_policy=policy, **llm_args)
        vocab, slots = llm.model.config.vocab_size, llm.max_batch_size
        greedy = SamplingParams(max_tokens=long, temperature=0, ignore_eos=True)
        llm.generate(_prompts(vocab, question, 1, seed=6), greedy)  # warm-up
        less_urgent = 1 if policy == "priority" else 0  # (fcfs takes no priorities)
        longs = [llm.new_request(p, greedy, priority=less_urgent) for p in _prompts(vocab, question, slots, seed=7)]
        start = time.perf_counter()
        llm.submit(longs)
        while not all(s.output_ids for s in longs):
            llm.step()
        urgent = llm.new_request(_prompts(vocab, question, 1, seed=8)[0],
                                 SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        llm.submit([urgent])
        while not all(s.finished for s in longs + [urgent]):
            llm.step()
        rows.append(dict(bench="priority", model=model, policy=policy, slots=slots, long_tokens=long,
                         urgent_ttft_ms=urgent.first_token_time * 1e3 - urgent.arrival * 1e3,
                         longs_done_ms=(max(s.last_token_time for s in longs) - start) * 1e3,
                         preemptions=llm.engine.num_preemptions))
        _free(llm)
    return rows


def run_structured(model: str, device, ceilings: dict, tokens: int = 64, repeats: int = 5, **llm_args) -> list[dict]:
    """Batch 1, greedy: a free request of `tokens` tokens against structured ones held to exactly that text (a
    choice of one string, so both run the same number of steps; then eos), one request at a time, median of
    `repeats` decode rates: per_token_ms - the free one's is what structured outputs cost per token at batch 1, with
    each step's sampling launched once the step before is read back and its mask written (its forward before), and
    with the whole step launched only then ("serial", the engine before the split). floor_ms: the decode step's
    weight bytes / the copy bandwidth."""
    from qwen2rt import StructuredOutputs

    llm = LLM(model, device=device, **llm_args)
    text = " ".join(f"w{i}" for i in range(tokens))
    while len(llm.tokenizer.encode(text)) > tokens:  # exactly `tokens` tokens (or as close below as words go)
        text = text.rsplit(" ", 1)[0]
    n = len(llm.tokenizer.encode(text))
    prompt = _prompts(llm.model.config.vocab_size, 50, 1, seed=9)[0]
    choice = SamplingParams(max_tokens=n + 1, temperature=0, structured_outputs=StructuredOutputs(choice=[text]))
    # "choice": each step's forward runs while the host reads the step before back and writes the mask (the
    # engine's default); "choice, serial": the step is read back before the next launch (the device idles meanwhile)
    cases = [("free", SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), True), ("choice", choice, True),
             ("choice, serial", choice, False)]
    config = llm_config(model)
    dtype_bytes = 4 if llm_args.get("dtype") == "float32" else 2
    floor = config.bytes_per_token(dtype_bytes) / ceilings["copy_GBps"] / 1e6
    rows = []
    for case, params, split in cases:
        llm.engine.split_structured_steps = split
        llm.generate([prompt], params)  # warm-up (and the choice's token index)
        rates = [llm.generate([prompt], params)[0].decode_tokens_per_s for _ in range(repeats)]
        per_token = 1e3 / statistics.median(rates)
        rows.append(dict(bench="structured", model=model, case=case, tokens=n, per_token_ms=per_token,
                         floor_ms=floor, pct_of_floor=100 * floor / per_token))
    for r in rows:
        r["vs_free"] = r["per_token_ms"] / rows[0]["per_token_ms"]
    _free(llm)
    return rows


def llm_config(model: str):
    from qwen2rt.models.config import BUILTIN_CONFIGS, load_config

    return BUILTIN_CONFIGS[model] if model in BUILTIN_CONFIGS else load_config(model)


def run(device, ceilings, model: str = "qwen2-7b", system: int = 2000, question: int = 50, repeats: int = 5,
        tokens: int = 64, burst: int = 4, long: int = 128, **llm_args) -> list[dict]:
    return (run_prefix(model, device, ceilings, system, question, repeats, burst, **llm_args)
            + run_priority(model, device, question, long, **llm_args)
            + run_structured(model, device, ceilings, tokens, repeats, **llm_args)
            + run_server(model, device, tokens, repeats, **llm_args))


SMOKE = dict(model="tiny", system=40, question=8, repeats=2, tokens=4, burst=3, long=6, dtype="float32",
             max_seq_len=128, max_batch_size=4)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-7b")
    ap.add_argument("--system", type=int, default=2000)
    ap.add_argument("--question", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--burst", type=int, default=4, help="requests submitted together in the burst case")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on CPU: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.smoke else device_default()
    ceilings = measure_ceilings(device, small=args.smoke)
    if args.smoke:
        rows = run(device, ceilings, **SMOKE)
    else:
        rows = run(device, ceilings, args.model, args.system, args.question, args.repeats, args.tokens, args.burst)
    print_rows([r for r in rows if r["bench"] == "prefix"],
               ["model", "prompt", "case", "prefix_caching", "ttft_ms", "cached_tokens", "vs_no_caching", "floor_ms",
                "pct_of_floor"])
    print_rows([r for r in rows if r["bench"] == "priority"],
               ["model", "policy", "slots", "long_tokens", "urgent_ttft_ms", "longs_done_ms", "preemptions"])
    print_rows([r for r in rows if r["bench"] == "structured"],
               ["model", "case", "tokens", "per_token_ms", "vs_free", "floor_ms", "pct_of_floor"])
    print_rows([r for r in rows if r["bench"] == "server"],
               ["model", "max_tokens", "api_ms", "server_ms", "added_ms", "added_per_request_ms",
                "added_per_token_ms", "skipped"])
    write_json(args.out, dict(environment(), ceilings=ceilings, serving=rows))
    return rows


if __name__ == "__main__":
    main()
