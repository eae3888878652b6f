"""Weight-only quantized decode projections: qwen2rt's quant_linear (W4A16 with group-128 scales and zeros, W8A16
per channel) at M = 1..32 rows on the Qwen2-7B / 72B projections (qkv, o, gate_up, down; the projection alone, no
fusions), with its word loop pipelined (the default) and not, against bf16 cuBLAS (F.linear on the dense bf16
weight of the same shape: what quantization must beat) and the two prefill paths at the largest M. Then prefill
(128-2048 rows, Qwen2-7B): the fused dequantize-GEMM against dequantize + cuBLAS and bf16 cuBLAS; one int4 MoE
layer of Qwen1.5-MoE and Qwen2-57B-A14B at 128 and 2048 tokens: experts dequantized in the grouped GEMMs' K loops
against the scratch path (bench_moe has the bf16 layer); on a GPU, the fp16 int4 GEMV with the residual at M = 2
and 16 with ptxas's register choice and capped at 255 (register_cap).
Every row has the copy floor beside it: the bytes the kernel must move (packed weight, scales, zeros, x, output)
over the copy bandwidth measured in the same run. Each call reads a different copy of the weights (enough copies to
overflow L2), so no timing is served from cache.

    python -m benchmarks.bench_quant [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row
from qwen2rt.kernels.quant import KINDS, QuantizedWeight, quant_config, quant_linear, quant_linear_gemm
from qwen2rt.models.config import builtin_config

MODELS = ["qwen2-7b", "qwen2-72b"]
ROWS = [1, 2, 4, 8, 16, 32]
PREFILL_MODELS = ["qwen2-7b"]
PREFILL_ROWS = [128, 512, 2048]  # prompt tokens: FUSED_GEMM_MAX_ROWS (1024) lies between the last two
MOE_LAYERS = ["qwen1.5-moe-a2.7b", "qwen2-57b-a14b"]  # one layer each (the bf16 layer is bench_moe's)
MOE_TOKENS = [128, 2048]
FORMS = {"w4a16-g128": ("int4", 128), "w8a16-channel": ("int8", None)}  # (kind, group size; None: per channel)
L2_BYTES = 128 << 20  # more than any current GPU's L2 (H100 50 MB, H200 60 MB)


def projections(config) -> list[tuple[str, int, int]]:
    """(name, N rows of the weight, K) of each quantized decode projection."""
    c = config
    return [("qkv", c.qkv_size, c.hidden_size), ("o", c.hidden_size, c.num_attention_heads * c.head_dim),
            ("gate_up", 2 * c.intermediate_size, c.hidden_size), ("down", c.hidden_size, c.intermediate_size)]


def random_weight(n: int, k: int, form: str, device) -> QuantizedWeight:
    """Random words (any bit pattern is a valid weight), fp16 scales, integer zeros; per channel where the group size
    does not divide K (the smoke shapes)."""
    kind, group = FORMS[form]
    group = group if group and k % group == 0 else k
    words = k * KINDS[kind] // 32
    groups = k // group
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, words), device=device, dtype=torch.int32)
    scales = (torch.rand(n, groups, device=device) / (8 * k ** 0.5)).half()
    zeros = torch.randint(0, 2 ** KINDS[kind], (n, groups), device=device).half()
    return QuantizedWeight(kind, qweight, scales, zeros, group)


def timed_row(kernel, shape, impl, fn, device, rep_ms, ceilings, floor_ms, bytes_moved=None, flops=None) -> dict:
    """One implementation timed as a kernel_row with the floor beside it, or a row that records why it failed (the
    run goes on)."""
    try:
        r = kernel_row(kernel, shape, impl, bench_ms(fn, device, rep_ms=rep_ms), bytes_moved, flops, ceilings)
    except Exception as e:  # noqa: BLE001 - record why, keep going
        return {"kernel": kernel, "shape": shape, "impl": impl, "error": repr(e)[:200]}
    r.update(floor_ms=floor_ms, pct_of_floor=100 * floor_ms / r["ms"])
    return r


def run(device, ceilings, models=MODELS, rows=ROWS, dtype=torch.bfloat16, forms=tuple(FORMS), projs=None, rep_ms=60,
        prefill_models=PREFILL_MODELS, prefill_rows=PREFILL_ROWS, moe_layers=MOE_LAYERS, moe_tokens=MOE_TOKENS,
        cap_rows=(2, 16)):
    out = []
    act_bytes = torch.finfo(dtype).bits // 8
    for name in models:
        config = builtin_config(name)
        for proj, n, k in [p for p in projections(config) if projs is None or p[0] in projs]:
            dense_bytes = n * k * act_bytes
            dense_copies = max(1, -(-L2_BYTES // dense_bytes)) if device.type == "cuda" else 1
            dense = itertools.cycle([torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
                                     for _ in range(dense_copies)])
            for form in forms:
                w0 = random_weight(n, k, form, device)
                copies = max(1, -(-L2_BYTES // w0.nbytes())) if device.type == "cuda" else 1
                weights = itertools.cycle([w0] + [random_weight(n, k, form, device) for _ in range(copies - 1)])
                nopipe = dict(quant_config(n, k, w0.kind, w0.group_size, False, device.type == "cpu"), NUM_STAGES=1)
                for m in rows:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    io_bytes = (m * k + m * n) * act_bytes
                    shape = f"{name} {proj} {form} M={m} N={n} K={k}"
                    impls = {"qwen2rt": (lambda: quant_linear(x, next(weights)), w0.nbytes()),
                             "qwen2rt_nopipe": (lambda: quant_linear(x, next(weights), config=nopipe), w0.nbytes()),
                             "cublas_bf16": (lambda: F.linear(x, next(dense)), dense_bytes)}
                    if m == max(rows):  # the prefill paths, for scale: what the same rows cost through them
                        impls["dequant+cublas"] = (lambda: quant_linear_gemm(x, next(weights), path="dequant"),
                                                   w0.nbytes())
                        impls["qwen2rt_fused_gemm"] = (lambda: quant_linear_gemm(x, next(weights), path="fused"),
                                                       w0.nbytes())
                    # the floor of this projection is the packed weight's: the same for every impl
                    floor_ms = (w0.nbytes() + io_bytes) / ceilings["copy_GBps"] / 1e6
                    out += [timed_row("quant_gemv", shape, impl, fn, device, rep_ms, ceilings, floor_ms,
                                      bytes_moved=weight_bytes + io_bytes)
                            for impl, (fn, weight_bytes) in impls.items()]
                weights = w0 = None  # free this form's copies before the next one allocates
            dense = None
    for name in prefill_models:
        out += prefill(device, ceilings, builtin_config(name), name, prefill_rows, dtype, forms, projs, rep_ms)
    if device.type == "cuda" and cap_rows:  # the compiled kernel only: the interpreter has no registers
        out += register_cap(device, ceilings, rep_ms, rows=cap_rows)
    for name in moe_layers:
        out += moe_prefill(device, ceilings, builtin_config(name), name, moe_tokens, dtype, rep_ms)
    return out


def register_cap(device, ceilings, rep_ms, name="qwen2-7b", rows=(2, 16), form="w4a16-g128") -> list[dict]:
    """ptxas's own register choice against a cap of 255 (maxnreg) for the int4 GEMV in fp16 (GPTQ / AWQ checkpoints
    are fp16) on the projections that add the residual (o, down), at M > 1: the variants that Triton 3.6's ptxas
    caps at 168 registers, keeping 4-8 values in local memory outside the weight loop (3 blocks per SM), where the
    cap of 255 takes 203 registers and spills nothing (2 blocks per SM). Measured, not argued: see quant_config."""
    config = builtin_config(name)
    out = []
    for proj, n, k in [p for p in projections(config) if p[0] in ("o", "down")]:
        w0 = random_weight(n, k, form, device)
        copies = max(1, -(-L2_BYTES // w0.nbytes()))
        weights = itertools.cycle([w0] + [random_weight(n, k, form, device) for _ in range(copies - 1)])
        cfg = quant_config(n, k, w0.kind, w0.group_size, False)
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            res = torch.randn(m, n, device=device, dtype=torch.float16)
            moved = w0.nbytes() + (m * k + 2 * m * n) * 2  # packed weight, x, residual, output
            shape = f"{name} {proj}+residual {form} fp16 M={m} N={n} K={k}"
            for impl, c in (("qwen2rt", cfg), ("qwen2rt_maxnreg255", dict(cfg, maxnreg=255))):
                out.append(timed_row("quant_gemv_regcap", shape, impl,
                                     lambda c=c: quant_linear(x, next(weights), residual=res, config=c), device,
                                     rep_ms, ceilings, moved / ceilings["copy_GBps"] / 1e6, bytes_moved=moved))
        weights = w0 = None
    return out


def moe_prefill(device, ceilings, config, name, tokens, dtype, rep_ms, form="w4a16-g128") -> list[dict]:
    """One MoE layer with int4 experts at prefill sizes: qwen2rt's grouped GEMMs dequantizing each expert tile in
    their K loops (the shared expert separate: the prefill default) against the scratch path (every expert and the
    shared expert dequantized by dequantize_weight, then the float grouped GEMMs: what fused_moe does with the shared
    expert folded) and against the same layer in bf16. TFLOP/s on the routed and shared FLOPs; the floor is the
    larger of the FLOP floor and the packed weights' bytes at the copy bandwidth."""
    from qwen2rt.kernels import fused_moe
    from qwen2rt.kernels.moe import DEFAULT_CONFIGS, token_bucket
    from qwen2rt.kernels.quant import dequantize_weight

    c = config
    e, h, inter, s, k = (c.num_experts, c.hidden_size, c.moe_intermediate_size, c.shared_expert_intermediate_size,
                         c.num_experts_per_tok)
    gate = (torch.randn(e + 1, h, device=device) * h ** -0.5).to(dtype)
    router, shared_gate = gate[:e], gate[e:]
    q = dict(gate_up=random_weight(e * 2 * inter, h, form, device), down=random_weight(e * h, inter, form, device),
             shared_gate_up=random_weight(2 * s, h, form, device), shared_down=random_weight(h, s, form, device))
    packed = sum(w.nbytes() for w in q.values())
    out = []
    for t in tokens:
        x = torch.randn(t, h, device=device).to(dtype)
        cfg = DEFAULT_CONFIGS[token_bucket(t)]
        flops = 2 * t * 3 * h * (k * inter + s)
        floor_ms = max(flops / ceilings["bf16_gemm_TFLOPs"] / 1e9, packed / ceilings["copy_GBps"] / 1e6)

        def scratch():
            f = {n: dequantize_weight(w, dtype) for n, w in q.items()}
            return fused_moe(x, router, f["gate_up"].view(e, 2 * inter, h), f["down"].view(e, h, inter), k,
                             c.norm_topk_prob, f["shared_gate_up"], f["shared_down"], shared_gate, config=cfg,
                             regime="prefill", fold_shared=False)
        impls = {"qwen2rt_in_loop": lambda: fused_moe(x, router, q["gate_up"], q["down"], k, c.norm_topk_prob,
                                                      q["shared_gate_up"], q["shared_down"], shared_gate, config=cfg,
                                                      regime="prefill", fold_shared=False),
                 "dequant_scratch": scratch}
        out += [timed_row("quant_moe_prefill", f"{name} {form} T={t}", impl, fn, device, rep_ms, ceilings, floor_ms,
                          flops=flops) for impl, fn in impls.items()]
    return out


def prefill(device, ceilings, config, name, rows, dtype, forms, projs, rep_ms) -> list[dict]:
    """The prefill projection at `rows` prompt tokens: the fused dequantize-GEMM and dequantize + cuBLAS (the two
    paths quant_linear_gemm chooses between at FUSED_GEMM_MAX_ROWS: these rows say where they cross) against bf16
    cuBLAS on a dense weight of the same shape. The floor is the larger of the FLOP floor (2 M N K at the measured
    bf16 GEMM rate) and the byte floor (packed weight, x and the output at the copy bandwidth). One weight copy: at
    these sizes the GEMM reads it from memory once per wave of output tiles either way."""
    out = []
    act_bytes = torch.finfo(dtype).bits // 8
    for proj, n, k in [p for p in projections(config) if projs is None or p[0] in projs]:
        dense = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        for form in forms:
            w = random_weight(n, k, form, device)
            for m in rows:
                x = torch.randn(m, k, device=device, dtype=dtype)
                io_bytes = (m * k + m * n) * act_bytes
                flops = 2 * m * n * k
                floor_ms = max(flops / ceilings["bf16_gemm_TFLOPs"] / 1e9,
                               (w.nbytes() + io_bytes) / ceilings["copy_GBps"] / 1e6)
                shape = f"{name} {proj} {form} M={m} N={n} K={k}"
                impls = {"qwen2rt_fused_gemm": lambda: quant_linear_gemm(x, w, path="fused"),
                         "dequant+cublas": lambda: quant_linear_gemm(x, w, path="dequant"),
                         "cublas_bf16": lambda: F.linear(x, dense)}
                out += [timed_row("quant_gemm", shape, impl, fn, device, rep_ms, ceilings, floor_ms, flops=flops)
                        for impl, fn in impls.items()]
        dense = w = None
    return out


def main(argv=None):
    smoke = dict(models=["tiny"], rows=[3], dtype=torch.float32, projs=["down"], prefill_models=["tiny"],
                 prefill_rows=[40], moe_layers=["tiny-moe"], moe_tokens=[40])
    return kernel_bench_main(__doc__, argv, run, smoke)


if __name__ == "__main__":
    main()
