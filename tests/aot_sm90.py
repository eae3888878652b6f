"""Compile every Triton kernel ahead of time for an H100 (sm_90) — no GPU needed: Triton's bundled ptxas builds
the cubin on the CPU. This catches what the interpreter cannot: type and layout errors of the real compiler,
tl.dot shape limits, and shared memory over the 227 KiB an sm_90 block may use. Run as a script (it must import
the kernels with TRITON_INTERPRET=0); exits 1 if any kernel fails.

    python tests/aot_sm90.py [--quick] [--capability 90]
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qwen2rt.kernels import moe, rmsnorm, rope_attention, swiglu  # noqa: E402

MAX_SHARED = 227 * 1024  # sm_90: largest dynamic shared memory per block

# pointer arguments whose element type is not the activation dtype
POINTER_TYPES = {"p_cos": "fp32", "p_sin": "fp32", "p_pos": "i64", "p_slot": "i64", "p_block_tables": "i32",
                 "p_seq_lens": "i64", "p_query_start": "i32", "p_part": "fp32", "p_lse": "fp32", "p_ids": "i32",
                 "p_weights": "fp32", "p_sorted": "i32", "p_block_experts": "i32", "p_num_rows": "i32",
                 "p_logits": "bf16"}
FLOAT_SCALARS = {"eps", "qk_scale"}


def signature(fn, dtype: str, constexprs: dict, pointer_overrides: dict | None = None) -> dict:
    types = dict(POINTER_TYPES, **(pointer_overrides or {}))
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("p_"):
            sig[name] = "*" + types.get(name, dtype)
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def cases(quick: bool = False):
    """Every kernel at the constexprs the launchers use; quick: bf16 only, the defaults and the largest MoE tiles."""
    for dtype in ("bf16",) if quick else ("bf16", "fp16"):
        for has_res in (False, True):
            for block, warps in ((1024, 4), (8192, 16)) if quick else ((1024, 4), (4096, 16), (8192, 16)):
                yield "rms_norm", rmsnorm._rms_norm_kernel, dtype, dict(HAS_RESIDUAL=has_res, BLOCK=block), \
                    dict(num_warps=warps), None
        yield "silu_and_mul", swiglu._silu_and_mul_kernel, dtype, dict(BLOCK=1024), dict(num_warps=4), None
        for hq, hkv, d in ((14, 2, 64), (28, 4, 128), (16, 16, 128), (64, 8, 128)):
            heads = dict(NUM_HEADS=hq, NUM_KV_HEADS=hkv, HEAD_DIM=d)
            yield f"rope_cache_write {hq}:{hkv} D{d}", rope_attention._rope_cache_write_kernel, dtype, heads, \
                dict(num_warps=1), None
            yield f"prefill_attention {hq}:{hkv} D{d}", rope_attention._prefill_attention_kernel, dtype, \
                dict(heads, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION="tf32"), \
                dict(num_warps=4 if d <= 64 else 8, num_stages=2), None
            yield f"decode_attention {hq}:{hkv} D{d}", rope_attention._decode_attention_kernel, dtype, \
                dict(heads, NUM_SPLITS=32, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_N=64,
                     DOT_PRECISION="tf32"), dict(num_warps=4), None
            yield f"decode_reduce D{d}", rope_attention._decode_reduce_kernel, dtype, \
                dict(NUM_HEADS=hq, HEAD_DIM=d, NUM_SPLITS=32, BLOCK_S=32), dict(num_warps=1), None
        # (E, k, shared chunks): Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B, with the shared expert folded (4 and 8 chunks)
        for e, k, chunks in ((60, 4, 4), (64, 8, 8)):
            for shared in (0, chunks):
                yield f"route E{e} k{k} S{shared}", moe._route_kernel, dtype, \
                    dict(TOP_K=k, SHARED_CHUNKS=shared, RENORMALIZE=True, BLOCK_E=64, BLOCK_K=k, BLOCK_S=max(2, shared),
                         BLOCK_H=1024), dict(num_warps=1), {"p_logits": dtype}
            decode_cfgs = [moe.DEFAULT_CONFIGS["decode"]] + ([] if quick else moe.TUNING_CANDIDATES["decode"])
            for cfg in decode_cfgs:
                for shared in (0, chunks):
                    meta = dict(PAIRS=k + shared, HAS_SHARED=shared > 0, BLOCK_N=cfg["BLOCK_N"],
                                BLOCK_K=cfg["BLOCK_K"])
                    yield f"moe gemv gate_up k{k} S{shared} {cfg}", moe._gemv_gate_up_kernel, dtype, meta, \
                        dict(num_warps=cfg["num_warps"]), None
                    yield f"moe gemv down k{k} S{shared} {cfg}", moe._gemv_down_kernel, dtype, meta, \
                        dict(num_warps=cfg["num_warps"]), None
            largest = max(moe.TUNING_CANDIDATES["prefill-large"],
                          key=lambda c: (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"]) * c["num_stages"])
            prefill_cfgs = [moe.DEFAULT_CONFIGS["prefill-small"], moe.DEFAULT_CONFIGS["prefill-large"], largest]
            if not quick:
                prefill_cfgs += moe.TUNING_CANDIDATES["prefill-small"] + moe.TUNING_CANDIDATES["prefill-large"]
            for cfg in prefill_cfgs:
                tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                             DOT_PRECISION="tf32")
                opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                for shared in (0, chunks):
                    yield f"moe grouped gate_up S{shared} {cfg}", moe._grouped_gate_up_kernel, dtype, \
                        dict(tiles, PAIRS=k + shared, HAS_SHARED=shared > 0), opts, None
                    yield f"moe grouped down S{shared} {cfg}", moe._grouped_down_kernel, dtype, \
                        dict(tiles, HAS_SHARED=shared > 0), opts, {"p_out": "fp32"}


def main() -> int:
    capability = int(sys.argv[sys.argv.index("--capability") + 1]) if "--capability" in sys.argv else 90
    target = GPUTarget("cuda", capability, 32)
    seen, failed = set(), []
    for name, fn, dtype, constexprs, options, overrides in cases(quick="--quick" in sys.argv):
        key = (fn.fn.__name__, dtype, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs, overrides), constexprs=constexprs)
            compiled = triton.compile(src, target=target, options=options)
            shared = compiled.metadata.shared
            if shared > MAX_SHARED:
                raise RuntimeError(f"needs {shared} bytes of shared memory, sm_{capability} allows {MAX_SHARED}")
        except Exception as e:  # report every failure, not just the first
            failed.append(f"{name} [{dtype}]: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"compiled {len(seen) - len(failed)} of {len(seen)} kernel variants for sm_{capability} "
          f"(triton {triton.__version__})")
    for line in failed:
        print("FAILED", line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
