"""RMSNorm and fused add + RMSNorm kernels against their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE, assert_bf16_close, assert_close, assert_tight, poisoned, rel_err
from qwen2rt.kernels import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (7, 1000), (63, 64), (2, 3, 333), (5, 3584)])
def test_rms_norm(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    w = (1 + 0.3 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    out = poisoned(*shape, dtype=dtype)
    y = rms_norm(x, w, 1e-6, out=out)
    assert y.shape == x.shape and y.dtype == dtype and y.data_ptr() == out.data_ptr()
    assert_close(y, rms_norm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (7, 1000), (63, 128), (2, 5, 333)])
def test_add_rms_norm(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    res = torch.randn(shape, dtype=dtype, device=DEVICE) * 2
    w = (1 + 0.3 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    x_before, res_before = x.clone(), res.clone()
    y, r = add_rms_norm(x, res, w, 1e-5, out=poisoned(*shape, dtype=dtype), residual_out=poisoned(*shape, dtype=dtype))
    y_ref, r_ref = add_rms_norm_ref(x, res, w, 1e-5)
    assert_close(r, r_ref, dtype)
    assert_close(y, y_ref, dtype)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)  # inputs untouched


def test_strided_rows_and_empty():
    base = torch.randn(6, 200, device=DEVICE)
    x = base[:, :100]  # rows with stride 200
    w = torch.rand(100, device=DEVICE)
    assert_close(rms_norm(x, w, 1e-6, out=poisoned(6, 100, dtype=torch.float32)), rms_norm_ref(x, w, 1e-6),
                 torch.float32)
    assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), torch.float32)  # fresh output
    assert rms_norm(torch.randn(0, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)


def test_bad_inputs():
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[64\]"):
        rms_norm(x, torch.ones(65, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        rms_norm(x.double(), torch.ones(64, device=DEVICE, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, out=torch.empty(3, 63, device=DEVICE))
    # as many elements, another shape (x's transpose, a flattened row): an error, not x's rows written into it
    for shape in ((64, 3), (192,)):
        with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor \[3, 64\]"):
            rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, out=torch.empty(shape, device=DEVICE))
        with pytest.raises(ValueError, match=r"residual_out must be a contiguous torch.float32 tensor \[3, 64\]"):
            add_rms_norm(x, x.clone(), torch.ones(64, device=DEVICE), 1e-6,
                         residual_out=torch.empty(shape, device=DEVICE))
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, torch.randn(3, 63, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6)


def _row_scales(tokens: int, device) -> torch.Tensor:
    """Per-row input scales from 10^-3.5 to 10^0.5 (a single row: 10^-3): rows whose mean square is near or below
    eps = 1e-6, where eps decides the output, and ordinary ones."""
    if tokens == 1:
        return torch.full((1, 1), 1e-3, device=device)
    return torch.logspace(-3.5, 0.5, tokens, device=device)[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_decides_small_rows(dtype):
    # inputs of size ~1 make eps invisible; rows of mean square ~eps make it decide the output (here by ~sqrt 2)
    x = (torch.randn(6, 300, device=DEVICE) * _row_scales(6, DEVICE)).to(dtype)
    w = (1 + 0.3 * torch.randn(300, device=DEVICE)).to(dtype)
    eps = 1e-6
    assert_close(rms_norm(x, w, eps, out=poisoned(6, 300, dtype=dtype)), rms_norm_ref(x, w, eps), dtype)
    y, _ = add_rms_norm(x, x, w, eps, out=poisoned(6, 300, dtype=dtype), residual_out=poisoned(6, 300, dtype=dtype))
    assert_close(y, add_rms_norm_ref(x, x, w, eps)[0], dtype)
    assert rel_err(rms_norm_ref(x.float(), w.float(), 0.0), rms_norm_ref(x.float(), w.float(), eps)) > 0.1


BF16_NORM_TOL = 1e-2  # bf16 roundings (residual, output) give ~3e-3 against fp32; the eps mutation is 0.16


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [896, 1536, 3584, 8192])
@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_qwen2_shapes_bf16_gpu(hidden, tokens):
    # bf16 kernels against the fp32 function on the same bf16 inputs; each mutation of that function (eps left out,
    # the residual not added, the weight applied as 1 + w) must land farther than the tolerance
    scale = _row_scales(tokens, "cuda")
    x = (torch.randn(tokens, hidden, device="cuda") * scale).bfloat16()
    res = (torch.randn(tokens, hidden, device="cuda") * scale).bfloat16()
    w = (1 + 0.3 * torch.randn(hidden, device="cuda")).bfloat16()
    eps = 1e-6
    y, r = add_rms_norm(x, res, w, eps, out=poisoned(tokens, hidden, dtype=torch.bfloat16),
                        residual_out=poisoned(tokens, hidden, dtype=torch.bfloat16))
    xf, resf, wf = x.float(), res.float(), w.float()
    y_ref, r_ref = add_rms_norm_ref(xf, resf, wf, eps)
    assert_bf16_close(r, r_ref, BF16_NORM_TOL)
    assert_bf16_close(y, y_ref, BF16_NORM_TOL)
    assert_tight(y_ref, {"eps left out": add_rms_norm_ref(xf, resf, wf, 0.0)[0],
                         "residual not added": rms_norm_ref(xf, wf, eps),
                         "weight applied as 1 + w": add_rms_norm_ref(xf, resf, 1 + wf, eps)[0]}, BF16_NORM_TOL)
    y_alone = rms_norm(x, w, eps, out=poisoned(tokens, hidden, dtype=torch.bfloat16))
    assert_bf16_close(y_alone, rms_norm_ref(xf, wf, eps), BF16_NORM_TOL)


# ---- operand checks: what the kernel cannot honour is a ValueError naming the operand ------------------------------

def test_weight_must_be_contiguous_and_of_x_dtype():
    # the kernel reads weight[i] at p_w + i and multiplies in x's dtype: a strided weight read every other element
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 13, generator=gen).to(DEVICE)
    res = torch.randn(5, 13, generator=gen).to(DEVICE)
    w_strided = torch.randn(26, generator=gen).to(DEVICE)[::2]
    with pytest.raises(ValueError, match=r"weight must be contiguous \(stride 1\), got stride 2"):
        rms_norm(x, w_strided, 1e-6)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        add_rms_norm(x, res, w_strided, 1e-6)
    assert_close(rms_norm(x, w_strided.contiguous(), 1e-6), rms_norm_ref(x, w_strided, 1e-6), torch.float32)
    xh = x.half()
    for w in (w_strided.contiguous(), w_strided.contiguous().bfloat16(), torch.ones(13, dtype=torch.bool,
                                                                                      device=DEVICE)):
        with pytest.raises(ValueError, match=f"weight must have x's dtype torch.float16, got {w.dtype}"):
            rms_norm(xh, w, 1e-6)
        with pytest.raises(ValueError, match=f"weight must have x's dtype torch.float16, got {w.dtype}"):
            add_rms_norm(xh, res.half(), w, 1e-6)


def test_x_needs_a_hidden_dimension():
    w = torch.rand(1, device=DEVICE) + 0.5
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H\] with at least one dimension, got a 0-d tensor"):
        rms_norm(torch.randn((), device=DEVICE), w, 1e-6)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H\]"):
        add_rms_norm(torch.randn((), device=DEVICE), torch.randn((), device=DEVICE), w, 1e-6)
    with pytest.raises(ValueError, match=r"x must have a hidden size H >= 1, got shape \[5, 0\]"):
        rms_norm(torch.randn(5, 0, device=DEVICE), torch.randn(0, device=DEVICE), 1e-6)


def test_out_exactly_in_place_is_allowed():
    # each program reads its whole row before it writes it: out (and residual_out) may be exactly x or residual
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 13, generator=gen).to(DEVICE)
    res = torch.randn(5, 13, generator=gen).to(DEVICE)
    w = (1 + 0.3 * torch.randn(13, generator=gen)).to(DEVICE)
    y_ref = rms_norm_ref(x, w, 1e-6)
    xc = x.clone()
    y = rms_norm(xc, w, 1e-6, out=xc)
    assert y.data_ptr() == xc.data_ptr()
    assert_close(y, y_ref, torch.float32)
    # a row-strided x as its own output would need a strided out, which the launcher refuses anyway
    base = torch.randn(5, 26, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        rms_norm(base[:, :13], w, 1e-6, out=base[:, :13])
    ref = add_rms_norm_ref(x, res, w, 1e-6)
    for out_of, res_out_of in (("x", "residual"), ("residual", "x")):
        xc, rc = x.clone(), res.clone()
        inputs = {"x": xc, "residual": rc}
        y, r = add_rms_norm(xc, rc, w, 1e-6, out=inputs[out_of], residual_out=inputs[res_out_of])
        assert y.data_ptr() == inputs[out_of].data_ptr() and r.data_ptr() == inputs[res_out_of].data_ptr()
        assert_close(y, ref[0], torch.float32)
        assert_close(r, ref[1], torch.float32)


def test_out_overlapping_an_operand_otherwise_is_refused():
    gen = torch.Generator().manual_seed(5)
    h = 13
    w = (1 + 0.3 * torch.randn(h, generator=gen)).to(DEVICE)
    buf = torch.randn(6, h, generator=gen).to(DEVICE)
    # out one row past x on one buffer: program i would write row i + 1 of x before program i + 1 reads it
    with pytest.raises(ValueError, match=r"out must not overlap x \(it may be x itself\)"):
        rms_norm(buf[:5], w, 1e-6, out=buf[1:])
    with pytest.raises(ValueError, match=r"out must not overlap x \(it may be x itself\)"):
        rms_norm(buf[1:], w, 1e-6, out=buf[:5])
    # a row-strided x and an out inside its span
    wide = torch.randn(4, 2 * h, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap x"):
        rms_norm(wide[:, :h], w, 1e-6, out=wide.view(-1)[h:5 * h].view(4, h))
    # out over the weight, which every program reads
    flat = torch.randn(6 * h, generator=gen).to(DEVICE)
    x = torch.randn(5, h, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap weight"):
        rms_norm(x, flat[:h], 1e-6, out=flat[h - 1:6 * h - 1].view(5, h))

    res = torch.randn(5, h, generator=gen).to(DEVICE)
    o = torch.empty(5, h, device=DEVICE)
    with pytest.raises(ValueError, match="out must not overlap residual_out"):
        add_rms_norm(x, res, w, 1e-6, out=o, residual_out=o)
    with pytest.raises(ValueError, match="out must not overlap residual_out"):  # four rows in common
        add_rms_norm(x, res, w, 1e-6, out=buf[:5], residual_out=buf[1:])
    for name, shifted in (("x", dict(x=buf[:5], residual=res)), ("residual", dict(x=x, residual=buf[:5]))):
        with pytest.raises(ValueError, match=rf"out must not overlap {name} \(it may be x or residual itself\)"):
            add_rms_norm(shifted["x"], shifted["residual"], w, 1e-6, out=buf[1:])
        with pytest.raises(ValueError,
                           match=rf"residual_out must not overlap {name} \(it may be x or residual itself\)"):
            add_rms_norm(shifted["x"], shifted["residual"], w, 1e-6, residual_out=buf[1:])
    # exactly x for out, but row-shifted over residual: program i + 1 would read residual after program i wrote it
    with pytest.raises(ValueError, match=r"out must not overlap residual \(it may be x or residual itself\)"):
        add_rms_norm(buf[1:], buf[:5], w, 1e-6, out=buf[1:])
    with pytest.raises(ValueError, match="residual_out must not overlap weight"):
        add_rms_norm(x, res, flat[:h], 1e-6, residual_out=flat[h - 1:6 * h - 1].view(5, h))


def test_aliasing_check_skips_meta_tensors():
    # tests/aot_sm90.py launches on meta tensors, which all report data pointer 0: they hold no memory to share
    from qwen2rt.kernels.gemv import check_out

    x, out, w = (torch.empty(*shape, device="meta") for shape in ((4, 8), (4, 8), (8,)))
    check_out(out, {"x": x, "weight": w, "residual_out": torch.empty(4, 8, device="meta")}, may_be=("x",))


def test_aliasing_check_sees_inputs_of_any_layout_without_copying():
    """An input that is not a 2-D tensor with contiguous rows (a paged cache, a permuted or strided view) is checked
    by its whole memory extent: a reshape would copy a non-contiguous one, and the copy overlaps nothing."""
    from qwen2rt.kernels.gemv import check_out

    buf = torch.randn(6, 4, 8)
    permuted = buf.permute(2, 0, 1)  # not viewable as one row
    out = buf[5].view(4, 8)  # its last block
    with pytest.raises(ValueError, match="out must not overlap cache"):
        check_out(out, {"cache": permuted})
    with pytest.raises(ValueError, match="out must not overlap column"):
        check_out(out, {"column": buf[:, :, 3]})  # 2-D, last stride 8
    check_out(torch.empty(4, 8), {"cache": permuted, "column": buf[:, :, 3]})  # elsewhere: no error
