"""Helpers for kernel tests: the device kernels run on (CUDA if present, else the Triton interpreter on CPU),
tolerances per dtype, NaN-poisoned buffers."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16: 2 ulps where the kernels round like torch (GPU). The Triton interpreter (3.6 and 3.9) truncates fp32 -> bf16
# instead of rounding to nearest, so each of a kernel's roundings may land one more ulp away: 4 ulps there.
BF16_TOL = 1.6e-2 if DEVICE.type == "cuda" else 3.2e-2
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=BF16_TOL, atol=BF16_TOL)}


def poisoned(*shape, dtype, device=DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(actual, expected, dtype):
    assert not torch.isnan(actual).any(), "output holds NaN (an element was never written?)"
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])
