"""SwiGLU (silu_and_mul) kernel against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE, assert_bf16_close, assert_close, assert_tight, poisoned
from qwen2rt.kernels import silu_and_mul, silu_and_mul_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 4864), (7, 2 * 1000), (63, 2 * 37), (2, 3, 2 * 1408)])
def test_silu_and_mul(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    out = silu_and_mul(x, out=poisoned(*shape[:-1], shape[-1] // 2, dtype=dtype))
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, silu_and_mul_ref(x), dtype)


def test_bad_inputs():
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        silu_and_mul(torch.randn(3, 8, device=DEVICE).double())
    for shape in ((), (3, 0)):  # a 0-d tensor, an empty last dimension: errors, not IndexError / RuntimeError
        with pytest.raises(ValueError, match="even and positive"):
            silu_and_mul(torch.zeros(shape, device=DEVICE))
    # out over gate_up's memory: rows other programs still read (the second row of out is the first's up half)
    buf = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap gate_up"):
        silu_and_mul(buf, out=buf.view(-1)[:16])
    expected = silu_and_mul_ref(buf)
    assert_close(silu_and_mul(buf, out=torch.empty(16, device=DEVICE)).view(4, 4), expected, torch.float32)


BF16_SWIGLU_TOL = 1e-2  # bf16 rounding of the output gives ~1.5e-3 against fp32


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [4864, 8960, 18944, 29568])
@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_qwen2_shapes_bf16_gpu(inter, tokens):
    # against the fp32 function on the same bf16 inputs; its mutations (gate and up swapped, sigmoid for silu) must
    # land farther than the tolerance
    x = (torch.randn(tokens, 2 * inter, device="cuda") * 3).bfloat16()
    out = silu_and_mul(x, out=poisoned(tokens, inter, dtype=torch.bfloat16))
    xf = x.float()
    gate, up = xf.chunk(2, dim=-1)
    reference = silu_and_mul_ref(xf)
    assert_bf16_close(out, reference, BF16_SWIGLU_TOL)
    assert_tight(reference, {"gate and up swapped": torch.nn.functional.silu(up) * gate,
                             "sigmoid for silu": torch.sigmoid(gate) * up}, BF16_SWIGLU_TOL)
