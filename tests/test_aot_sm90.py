"""Every Triton kernel compiles for an H100 (sm_90) on this CPU machine as its launcher launches it, and no
decode-path kernel spills registers in a loop: ahead-of-time compilation through Triton's bundled ptxas
(tests/aot_sm90.py --quick), in a subprocess (the kernels must be imported without the interpreter). With this
machine's Triton the quick subset spills nothing at all. Then the SASS parser that places spills (sass_loops)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# aot_sm90.DECODE_PATH (not imported: importing it would turn the interpreter off in this process)
DECODE_PATH = ("_decode_attention_kernel", "_decode_reduce_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel",
               "_route_kernel", "_gemv_gate_up_kernel", "_gemv_down_kernel", "_fused_linear_kernel",
               "_candidates_kernel", "_draw_kernel", "_fallback_kernel", "_quant_linear_kernel")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton's ptxas ships for Linux")
@pytest.mark.timeout(960)  # past the subprocess's own 900 s limit, which reports more
def test_all_kernels_compile_for_sm90_and_decode_path_does_not_spill():
    r = subprocess.run([sys.executable, os.path.join(HERE, "aot_sm90.py"), "--quick"], capture_output=True,
                       text=True, timeout=900)
    summary = r.stdout[r.stdout.find("compiled "):]  # the last lines: counts, then each spill and failure
    assert r.returncode == 0, summary + r.stderr[-3000:]
    assert summary.startswith("compiled") and "FAILED" not in summary and "SPILL" not in summary
    assert "0 decode-path spills in loops, 0 outside them" in summary  # none at all (the full run allows NOTEs)
    # the quick subset still covers every decode-path kernel, head_dim 128 decode attention included
    rows = re.findall(r"^\s*\d+\s+\d+\s+\d+\s+[\d.]+\s+(_\w+) (.*)$", r.stdout, re.M)  # regs spill smem s kernel
    for kernel in DECODE_PATH:
        assert any(name == kernel for name, _ in rows), f"{kernel} is missing from the quick subset"
    assert any(name == "_decode_attention_kernel" and "HEAD_DIM=128" in rest for name, rest in rows)
    # the quantized GEMV in every weight form (int4 grouped, act-order, int8 and fp8 per channel) and the prefill path
    quant = [rest for name, rest in rows if name == "_quant_linear_kernel"]
    for form in ("BITS=4, IS_FP8=False, GROUP_WORDS=16, PER_CHANNEL=False, HAS_PERM=True",
                 "BITS=8, IS_FP8=False, GROUP_WORDS=1, PER_CHANNEL=True", "IS_FP8=True"):
        assert any(form in rest for rest in quant), form
    assert any(name == "_dequantize_kernel" for name, _ in rows)
    gemm = [rest for name, rest in rows if name == "_quant_gemm_kernel"]
    for form in ("BITS=4, IS_FP8=False, GROUP_STEPS=2, PER_CHANNEL=False, HAS_PERM=True", "IS_FP8=True"):
        assert any(form in rest for rest in gemm), form


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                                   /* 0x00000a0000017a02 */
        /*0010*/              @!P0 EXIT ;                                                   /* 0x000000000000894d */
        /*0020*/                   STL [R1], R2 ;                                           /* 0x0000000201007387 */
        /*0030*/                   IADD3 R4, R4, 0x1, RZ ;                                  /* 0x0000000104047810 */
        /*0040*/                   FFMA R5, R6, R7, R5 ;                                    /* 0x0000000706057223 */
        /*0050*/               @P1 BRA 0x70 ;                                               /* 0x0000000000801947 */
        /*0060*/                   LDL.64 R8, [R1+0x8] ;                                    /* 0x0000080001087983 */
        /*0070*/              @!P2 BRA 0x40 ;                                               /* 0xffffffc000d4a947 */
        /*0080*/                   LDL R2, [R1] ;                                           /* 0x0000000001027983 */
        /*0090*/                   BRA.U !UP0, 0x30 ;                                       /* 0xffffff9000787947 */
        /*00a0*/                   BRA 0xa0;                                                /* 0xfffffffc00fc7947 */
"""


def test_spill_sites_finds_the_spills_of_innermost_loops():
    """The parser behind aot_sm90's loop rule, on SASS as cuobjdump prints it: a loop 0x40-0x70 (a predicated
    backward branch, a forward branch inside it) within a loop 0x30-0x90 (a branch with a predicate operand); the
    function's closing self-branch is no loop. The LDL.64 at 0x60 is in the inner loop; the STL at 0x20 (before
    both) and the LDL at 0x80 (in the outer loop only) are not."""
    from sass_loops import spill_sites
    sites = spill_sites(SASS)
    assert (sites.instructions, sites.in_loops, sites.loops) == (3, 1, 1)
    moved = SASS.replace("/*0060*/                   LDL.64", "/*0060*/                   IADD3 ")
    assert (spill_sites(moved).instructions, spill_sites(moved).in_loops) == (2, 0)
    no_inner = SASS.replace("@!P2 BRA 0x40", "@!P2 BRA 0x80")  # a forward branch: the outer loop is innermost
    assert (spill_sites(no_inner).in_loops, spill_sites(no_inner).loops) == (2, 1)


# a loop kernel compiled for sm_90 by Triton's bundled ptxas: with 80 registers it keeps its 64 accumulators per
# thread, capped at 32 it spills them on every iteration
SPILLING = """
import subprocess, sys, tempfile
import triton, triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sass_loops import spill_sites

@triton.jit
def _sum_of_squares(p_x, p_out, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n, BLOCK):
        x = tl.load(p_x + i + tl.arange(0, BLOCK))
        acc += x * x
    tl.store(p_out + tl.arange(0, BLOCK), acc)

for limit in ({}, {"maxnreg": 32}):
    src = ASTSource(_sum_of_squares, {"p_x": "*fp32", "p_out": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": 2048})
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, **limit)).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    s = spill_sites(sass)
    print(s.instructions, s.in_loops, s.loops)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton's ptxas ships for Linux")
def test_spill_sites_on_a_kernel_ptxas_spills(tmp_path):
    script = tmp_path / "spilling.py"  # a file: Triton reads a kernel's source
    script.write_text(SPILLING)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=HERE))
    assert r.returncode == 0, r.stderr[-3000:]
    free, capped = (tuple(map(int, line.split())) for line in r.stdout.split("\n")[-3:-1])
    assert free == (0, 0, 1)
    assert capped[2] == 1 and capped[1] > 32 and capped[0] > capped[1]  # 64 values, stored and reloaded in the loop


WARM = [sys.executable, os.path.join(HERE, "aot_sm90.py"), "--warm", "--only", "_rms_norm", "--models", "qwen2-0.5b",
        "--dtypes", "bf16", "--no-quantized", "--jobs", "2"]
# a fresh process launching the RMSNorm kernels at a recorded 0.5B shape (one row), counting Triton's cache, then a
# kernel the warm did not compile (SwiGLU), counting again: that one must add entries (the cache read is this one)
LAUNCH = """
import os, torch
from qwen2rt.kernels import rmsnorm, swiglu
count = lambda: len(os.listdir(os.environ["TRITON_CACHE_DIR"]))
x, w = torch.randn(1, 896, device="cuda", dtype=torch.bfloat16), torch.randn(896, device="cuda", dtype=torch.bfloat16)
rmsnorm.rms_norm(x, w, 1e-6)
rmsnorm.add_rms_norm(x, x.clone(), w, 1e-6)
torch.cuda.synchronize()
after_warmed = count()
swiglu.silu_and_mul(torch.randn(1, 2 * 4864, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print(after_warmed, count())
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below warms for real")
def test_warm_without_a_gpu_says_so():
    r = subprocess.run(WARM, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "warmed 0 of 2 kernel variants" in r.stdout
    assert r.stdout.count("FAILED _rms_norm_kernel") == 2 and "driver" in r.stdout


@pytest.mark.gpu
def test_warm_fills_the_cache_a_later_launch_reads(tmp_path):
    """--warm compiles through the JIT under the keys a real launch looks up: after it, a fresh process launching
    the same kernels at the recorded shape adds nothing to Triton's cache (no compile, no launcher build)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run(WARM, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "warmed 2 of 2" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    warmed = len(os.listdir(tmp_path))
    out = subprocess.run([sys.executable, "-c", LAUNCH], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    after_warmed, after_other = map(int, out.stdout.split()[-2:])
    assert after_warmed == warmed < after_other, (warmed, out.stdout)
