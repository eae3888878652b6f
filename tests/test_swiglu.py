"""SwiGLU (silu_and_mul) kernel against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE, assert_close, poisoned
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


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [4864, 8960, 18944, 29568])
@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_qwen2_shapes_bf16_gpu(inter, tokens):
    x = torch.randn(tokens, 2 * inter, dtype=torch.bfloat16, device="cuda")
    out = poisoned(tokens, inter, dtype=torch.bfloat16)
    assert_close(silu_and_mul(x, out=out), silu_and_mul_ref(x), torch.bfloat16)
