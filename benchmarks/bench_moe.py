"""One MoE layer (routing + experts + shared expert): qwen2rt's fused_moe (as configured, with the shared expert
folded into the grouped launches or run separately, and at decode sizes with the down GEMV split over 4 programs
per token) against the same layer in Hugging Face transformers with each of its experts implementations (eager,
batched_mm, grouped_mm) and against a `torch._grouped_mm` implementation, all in the same run, for
Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B layers at T = 1, 4, 16, 32, 128, 2048; at T = 16, 32 and 128 also a graph
bucket of T rows of which T / 2 + 1 are live (padding rows skipped, computed, or absent). Small T: GB/s on the
bytes of the experts actually selected plus the shared expert and router, % of copy bandwidth. Large T: TFLOP/s, %
of the bf16 GEMM rate.

    python -m benchmarks.bench_moe [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, kernel_bench_main, kernel_row
from benchmarks.hf_baseline import hf_config
from qwen2rt.kernels import fused_moe, route_ref, silu_and_mul_ref
from qwen2rt.kernels.moe import DECODE_MAX_TOKENS, DEFAULT_CONFIGS, token_bucket
from qwen2rt.models.config import builtin_config

LAYERS = ["qwen1.5-moe-a2.7b", "qwen2-57b-a14b"]
TOKENS = [1, 4, 16, 32, 128, 2048]
BATCHED_MM_MAX_BYTES = 8e9


def grouped_mm_moe(x, w, top_k, renorm):
    """Routed experts with torch._grouped_mm (tokens sorted by expert), then the shared expert."""
    ids, weights = route_ref(F.linear(x, w["router"]), top_k, renorm)
    flat = ids.flatten()
    order = torch.argsort(flat)
    num_experts = w["router"].shape[0]
    counts = torch.histc(flat.float(), bins=num_experts, min=0, max=num_experts - 1)  # no host sync (bincount syncs)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // top_k]
    h = torch._grouped_mm(xs, w["gate_up"].transpose(1, 2), offs=offs)
    y = torch._grouped_mm(silu_and_mul_ref(h), w["down"].transpose(1, 2), offs=offs)
    y = y * weights.flatten()[order, None].to(y.dtype)
    out = torch.zeros_like(x).index_add_(0, order // top_k, y)
    shared = F.linear(silu_and_mul_ref(F.linear(x, w["shared_gate_up"])), w["shared_down"])
    return out + torch.sigmoid(F.linear(x, w["shared_gate"])) * shared


def _weights(c, device, dtype):
    e, h, i, s = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.shared_expert_intermediate_size

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, device=device) * fan_in ** -0.5).to(dtype)

    return dict(router=rnd(e, h, fan_in=h), gate_up=rnd(e, 2 * i, h, fan_in=h), down=rnd(e, h, i, fan_in=i),
                shared_gate_up=rnd(2 * s, h, fan_in=h), shared_down=rnd(h, s, fan_in=s),
                shared_gate=rnd(1, h, fan_in=h))


def _hf_block(c, w, device, dtype, impl):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = hf_config(dataclasses.replace(c, num_hidden_layers=1))
    cfg._experts_implementation = impl
    with torch.device(device):
        block = Qwen2MoeSparseMoeBlock(cfg).to(dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(w["router"])
        block.experts.gate_up_proj.copy_(w["gate_up"])
        block.experts.down_proj.copy_(w["down"])
        i = c.shared_expert_intermediate_size
        block.shared_expert.gate_proj.weight.copy_(w["shared_gate_up"][:i])
        block.shared_expert.up_proj.weight.copy_(w["shared_gate_up"][i:])
        block.shared_expert.down_proj.weight.copy_(w["shared_down"])
        block.shared_expert_gate.weight.copy_(w["shared_gate"])
    return block


def run(device, ceilings, layers=LAYERS, tokens=TOKENS, dtype=torch.bfloat16, configs=None):
    rows = []
    for name in layers:
        c = configs[name] if configs else builtin_config(name)
        w = _weights(c, device, dtype)
        k = c.num_experts_per_tok
        elem = torch.empty((), dtype=dtype).element_size()
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size * elem
        fixed = (3 * c.hidden_size * c.shared_expert_intermediate_size + (c.num_experts + 1) * c.hidden_size) * elem
        blocks = {impl: _hf_block(c, w, device, dtype, impl) for impl in ("eager", "batched_mm", "grouped_mm")}
        for t in tokens:
            x = torch.randn(t, c.hidden_size, device=device).to(dtype)
            ids, _ = route_ref(F.linear(x, w["router"]), k, c.norm_topk_prob)
            touched = fixed + ids.unique().numel() * per_expert + 2 * x.numel() * elem
            flops = 2 * t * (k * 3 * c.hidden_size * c.moe_intermediate_size
                             + 3 * c.hidden_size * c.shared_expert_intermediate_size
                             + (c.num_experts + 1) * c.hidden_size)
            shape = f"{name} T={t}"
            # qwen2rt as the model runs it (the tuned or default config), and with the shared expert forced folded
            # into the grouped launches / run separately (the measurement that decides FOLD_SHARED)
            impls = {f"qwen2rt{suffix}": (lambda fold=fold: fused_moe(
                x, w["router"], w["gate_up"], w["down"], k, c.norm_topk_prob, w["shared_gate_up"], w["shared_down"],
                w["shared_gate"], fold_shared=fold)) for suffix, fold in (("", None), ("_fold", True),
                                                                           ("_separate", False))}
            if t <= DECODE_MAX_TOKENS:  # the down GEMV with each token's pairs split over 4 programs
                split = dict(DEFAULT_CONFIGS[token_bucket(t)], SPLIT_PAIRS=4)
                impls["qwen2rt_split4"] = lambda split=split: fused_moe(
                    x, w["router"], w["gate_up"], w["down"], k, c.norm_topk_prob, w["shared_gate_up"],
                    w["shared_down"], w["shared_gate"], config=split)
                # the grouped GEMMs at a decode size: the measurement that says up to how many tokens the GEMVs
                # (DECODE_MAX_TOKENS) should take the block
                impls["qwen2rt_grouped"] = lambda: fused_moe(
                    x, w["router"], w["gate_up"], w["down"], k, c.norm_topk_prob, w["shared_gate_up"],
                    w["shared_down"], w["shared_gate"], regime="prefill")
            for impl, block in blocks.items():
                impls[f"hf_{impl}"] = (lambda b=block: b(x[None]))
            gathered = t * k * per_expert  # what HF's batched_mm copies: every selected expert's weights, per pair
            if gathered > BATCHED_MM_MAX_BYTES:
                del impls["hf_batched_mm"]
                rows.append({"kernel": "moe_layer", "shape": shape, "impl": "hf_batched_mm",
                             "skipped": f"would gather {gathered / 1e9:.0f} GB of expert weights"})
            if device.type == "cuda":
                impls["torch_grouped_mm"] = lambda: grouped_mm_moe(x, w, k, c.norm_topk_prob)
            _time(rows, shape, impls, touched, flops, ceilings, device)
            if 4 < t <= 128:  # the decode GEMVs (16, 32) and the grouped GEMMs (128) of a prefill graph bucket
                _time(rows, *_padded(name, c, w, x, elem, per_expert, fixed), ceilings, device)
    return rows


def _time(rows, shape, impls, touched, flops, ceilings, device):
    for impl, fn in impls.items():
        try:
            with torch.inference_mode():  # HF's experts synchronise (not capturable): timed eagerly
                timing = bench_ms(fn, device, graph=not impl.startswith("hf_"))
            rows.append(kernel_row("moe_layer", shape, impl, timing, touched, flops, ceilings))
        except Exception as e:
            rows.append({"kernel": "moe_layer", "shape": shape, "impl": impl, "error": repr(e)[:200]})


def _padded(name, c, w, x, elem, per_expert, fixed):
    """A CUDA graph's bucket of t rows of which t // 2 + 1 are live, the rest padding as the model runner fills
    them (one token at position 0: identical rows, which select the same experts): with token_slots marking the
    padding (no expert read for it), without (the padding rows' experts read too), and the live rows alone. Bytes
    and FLOPs are the live rows'."""
    t = x.shape[0]
    live = t // 2 + 1
    rows = x.clone()
    rows[live:] = x[-1]
    slots = torch.where(torch.arange(t, device=x.device) < live, 0, -1)
    k = c.num_experts_per_tok
    ids, _ = route_ref(F.linear(x[:live], w["router"]), k, c.norm_topk_prob)
    touched = fixed + ids.unique().numel() * per_expert + 2 * live * c.hidden_size * elem
    flops = 2 * live * (k * 3 * c.hidden_size * c.moe_intermediate_size
                        + 3 * c.hidden_size * c.shared_expert_intermediate_size + (c.num_experts + 1) * c.hidden_size)

    def moe(inputs, token_slots=None):
        return lambda: fused_moe(inputs, w["router"], w["gate_up"], w["down"], k, c.norm_topk_prob,
                                 w["shared_gate_up"], w["shared_down"], w["shared_gate"], token_slots=token_slots)
    impls = {"qwen2rt_padding_skipped": moe(rows, slots), "qwen2rt_padding_computed": moe(rows),
             "qwen2rt_live_rows_only": moe(x[:live])}
    return f"{name} T={t} ({live} live)", impls, touched, flops


def main(argv=None):
    smoke = dict(layers=["tiny-moe"], tokens=[5], dtype=torch.float32,
                 configs={"tiny-moe": builtin_config("tiny-moe")})
    return kernel_bench_main(__doc__, argv, run, smoke)


if __name__ == "__main__":
    main()
