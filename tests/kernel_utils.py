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


# ---- bf16 on the GPU: error against the fp32 function, with a tolerance proven tight ---------------------------

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (NaN anywhere gives NaN, which fails every `<` check)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm()).item()


def assert_tight(reference: torch.Tensor, mutants: dict[str, torch.Tensor], tol: float) -> None:
    """Each mutant (the reference with one plausible bug) must be farther than `tol` from the reference: otherwise a
    kernel with that bug would pass a test at this tolerance."""
    for name, mutant in mutants.items():
        err = rel_err(mutant, reference)
        assert err > tol, f"the mutation {name!r} is only {err:.2e} from the reference: tolerance {tol:.1e} too loose"


def assert_bf16_close(actual: torch.Tensor, reference: torch.Tensor, tol: float) -> None:
    """A bf16 kernel's output against the fp32 reference on the same bf16 inputs."""
    assert not torch.isnan(actual).any(), "output holds NaN (an element was never written?)"
    err = rel_err(actual, reference)
    assert err < tol, f"relative error {err:.2e} >= {tol:.1e}"
