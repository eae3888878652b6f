"""Command line: `python -m qwen2rt generate | chat | info | profile | serve`."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time

DEFAULT_MODEL = "tiny"
DEFAULT_PROMPT = "The quick brown fox"
QUANTIZATIONS = ("int8", "int4", "fp8")
# `info`'s decode floor: bytes read per token over this bandwidth (GB/s); default: the device copy bandwidth measured on
# one H100 80GB
DEFAULT_BANDWIDTH_GBPS = 3020.0


def number_in(kind, low, high=None):
    """An argparse type: `kind` (int / float) in [low, high] (high None: no bound), else a usage error naming the
    range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high if high is not None else 'inf'}]")
        return value
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder or built-in name (default: {DEFAULT_MODEL}, random weights)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default=None, help="torch or triton (default: triton on CUDA, torch on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for random weights and sampling")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="quantize a floating-point model's decoder linears at load (GPTQ / AWQ checkpoints load "
                        "quantized as they are)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=None, dest="stop_token_ids")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--request-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--min-tokens", type=int, default=None, help="no stop token or stop string before this many")
    p.add_argument("--logit-bias", action="append", default=None, type=_bias_entry, metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100 to 100) to a token's logit (repeatable)")


def _bias_entry(text: str) -> tuple[int, float]:
    """--logit-bias TOKEN_ID=BIAS -> (id, bias)."""
    import argparse

    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID=BIAS (e.g. 1234=-100)") from None


def _sampling_params(args):
    from qwen2rt import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=args.stop, stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos, seed=args.request_seed, min_tokens=args.min_tokens,
        logit_bias=None if args.logit_bias is None else dict(args.logit_bias))


def _load(args):
    from qwen2rt import LLM

    # With no --model this is the built-in default shape; LLM logs the one line saying its weights are random.
    model = args.model or DEFAULT_MODEL
    return LLM(model, device=args.device, dtype=args.dtype, backend=args.backend, max_seq_len=args.max_seq_len,
               seed=args.seed, quantization=args.quantization)


def cmd_generate(args) -> int:
    params = _sampling_params(args)
    llm = _load(args)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    start = time.perf_counter()
    stream = llm.stream(prompt, params)
    first = next(stream, "")  # a bad prompt or parameter fails here, before the prompt is echoed
    sys.stdout.write(prompt)
    sys.stdout.flush()
    pieces = 0
    for piece in itertools.chain([first], stream):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces += 1
    sys.stdout.write("\n")
    print(f"[qwen2rt] {llm.model_name} on {llm.device} ({llm.dtype}, backend {llm.backend.name}): "
          f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load(args)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise ValueError(f"{llm.model_name} has no {'tokenizer.json' if llm.tokenizer is None else 'chat template'}: "
                         "chat needs one (generate takes plain text)")
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sys.stdout.write("assistant> ")
        reply = []
        for piece in llm.stream(prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply.append(piece)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args) -> int:
    from qwen2rt.models.config import BUILTIN_CONFIGS, builtin_config, load_config

    model = args.model or DEFAULT_MODEL
    if model in BUILTIN_CONFIGS:
        config = builtin_config(model)
    elif os.path.isdir(model):
        config = load_config(model)
    else:
        print(f"error: {model!r} is neither a checkpoint folder nor a built-in name "
              f"({', '.join(sorted(BUILTIN_CONFIGS))})", file=sys.stderr)
        return 2
    from qwen2rt.models.quant import at_load_config, weight_bytes

    if args.quantization is not None and config.quantization is not None:
        print(f"error: {model} is already quantized ({config.quantization.describe()}): --quantization applies to "
              "floating-point models", file=sys.stderr)
        return 2
    quant = config.quantization or (at_load_config(args.quantization) if args.quantization else None)
    params = config.parameter_count()
    info = {
        "model": model,
        "config": config.to_dict(),
        "parameters": params,
        "bytes_read_per_token_bf16": config.bytes_per_token(2),
        "bytes_read_per_token_fp32": config.bytes_per_token(4),
    }
    if quant is not None:  # the decoder linears quantized, everything else (embeddings, norms, lm_head) in bf16
        total, per_token = weight_bytes(config, 2, quant)
        info["quantization"] = quant.describe()
        info["weight_bytes"] = total
        info["bytes_read_per_token"] = per_token
    else:
        info["weight_bytes"], info["bytes_read_per_token"] = weight_bytes(config, 2, None)
    info["bandwidth_GBps"] = args.bandwidth
    info["decode_floor_ms"] = info["bytes_read_per_token"] / (args.bandwidth * 1e9) * 1e3
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {model} ({config.architecture})")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"parameters: {params:,} ({params / 1e9:.2f} B)")
    print(f"bytes read per decoded token (batch 1): bf16 {info['bytes_read_per_token_bf16'] / 1e9:.3f} GB, "
          f"fp32 {info['bytes_read_per_token_fp32'] / 1e9:.3f} GB")
    label = f"{quant.describe()} linears, the rest bf16" if quant is not None else "bf16"
    print(f"weights ({label}): {info['weight_bytes'] / 1e9:.3f} GB; read per decoded token "
          f"{info['bytes_read_per_token'] / 1e9:.3f} GB; decode floor {info['decode_floor_ms']:.3f} ms at "
          f"{args.bandwidth:.0f} GB/s")
    return 0


def cmd_profile(args) -> int:
    from qwen2rt.profiling import profile

    if args.trace and not os.path.isdir(os.path.dirname(os.path.abspath(args.trace))):
        raise ValueError(f"--trace {args.trace}: the folder {os.path.dirname(os.path.abspath(args.trace))} does "
                         "not exist")
    llm = _load(args)
    profile(llm, batch=args.batch, prompt_len=args.prompt_len, steps=args.steps, trace_path=args.trace)
    return 0


def cmd_serve(args) -> int:
    from qwen2rt.server import serve

    try:
        return serve(args, args.model or DEFAULT_MODEL)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2rt", description="Qwen2 inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion of --prompt to stdout")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", default=None, help=f"default: {DEFAULT_PROMPT!r}")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template (one line per turn)")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=cmd_chat)
    i = sub.add_parser("info", help="config, parameter count, weight bytes, bytes read per decoded token and the "
                                   "decode floor")
    i.add_argument("--model", default=None)
    i.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="weight bytes and decode floor with the decoder linears quantized at load")
    i.add_argument("--bandwidth", type=number_in(float, 1e-9), default=DEFAULT_BANDWIDTH_GBPS,
                   help=f"GB/s for the decode floor (default {DEFAULT_BANDWIDTH_GBPS:.0f}: H100 copy bandwidth)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    pr = sub.add_parser("profile", help="torch.profiler trace of a prefill and decode steps, per-op table")
    _add_model_args(pr)
    pr.add_argument("--batch", type=number_in(int, 1), default=1)
    pr.add_argument("--prompt-len", type=number_in(int, 1), default=128)
    pr.add_argument("--steps", type=number_in(int, 0), default=8, help="decode steps")
    pr.add_argument("--trace", default="qwen2rt_trace.json", help="Chrome trace path ('' for none)")
    pr.set_defaults(func=cmd_profile)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, "
                                      "/v1/models, /health, /metrics (needs the serve extra)")
    _add_model_args(sv)
    from qwen2rt.server import add_arguments

    add_arguments(sv)
    sv.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
