"""The C im2col (lowprec.kernels.cpu.im2col, used by backward.im2col_of for the update GEMM's
activation operand under act_upd/update_rht) is the same matrix, bit for bit, as F.unfold followed by
the transposing reshape it replaces, and so is the rotated one (each of its gather paths: a plane
shifted, rows one by one, each block of 16 tokens read straight from x under a mask): guards the update GEMM's numbers (nvfp4_sr_rht on convolutions)
against an off-by-one in the padding, stride or dilation arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from lowprec.backward import im2col_of
from lowprec.kernels import cpu, native

CASES = [((2, 3, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),
         ((3, 4, 10, 11), (3, 2), (2, 3), (0, 2), (2, 1)),
         ((2, 5, 1, 13), (1, 3), (1, 2), (0, 1), (1, 2)),
         ((1, 2, 5, 5), (5, 5), (1, 1), (2, 2), (1, 1)),
         ((2, 3, 6, 6), (1, 1), (2, 2), (0, 0), (1, 1)),
         ((2, 3, 9, 40), (3, 3), (1, 2), (1, 1), (1, 1)),  # rows of >= 16 tokens, strided
         ((2, 2, 6, 20), (3, 3), (1, 1), (0, 0), (1, 1)),  # rows of >= 16 tokens, shorter than the image's
         ((3, 2, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1)),  # a 'same' convolution: each image's plane shifted
         # stride 1, Wo = W, whole blocks of 16 per image: the rotated im2col's blocks read straight from x
         ((2, 3, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),  # blocks of two rows
         ((3, 2, 4, 4), (3, 3), (1, 1), (1, 1), (1, 1)),  # one block per image: reads before and after x
         ((2, 2, 8, 8), (3, 3), (1, 1), (2, 2), (2, 2)),  # dilated
         ((2, 2, 10, 16), (3, 3), (1, 1), (0, 1), (1, 1)),  # Ho < H
         ((2, 3, 4, 8), (1, 1), (1, 1), (0, 0), (1, 1))]  # 1x1


def _out_hw(case):
    (_, _, h, w), k, s, p, d = case
    return tuple((size + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, size in enumerate((h, w)))


def _unfold(x, k, s, p, d):
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_im2col_matches_unfold(case, use_c):
    if use_c and native.library() is None:
        pytest.skip("no C compiler")
    shape, k, s, p, d = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    native.set_enabled(use_c)
    try:
        assert torch.equal(cpu.im2col(x, k, s, p, d), _unfold(x, k, s, p, d))
    finally:
        native.set_enabled(None)


def test_im2col_of_conv1d_and_strided_input():
    """A 1-d convolution goes through the 2-d one of height 1; a non-contiguous input is read right."""
    x = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(1))
    w = torch.empty(5, 4, 3)
    got = im2col_of(w, ([2], [1], [1]))(x).matrix()
    assert torch.equal(got, _unfold(x.unsqueeze(2), (1, 3), (1, 2), (0, 1), (1, 1)))
    x4 = torch.randn(4, 3, 6, 6).transpose(0, 1)
    w4 = torch.empty(2, 4, 3, 3)
    got4 = im2col_of(w4, ([1, 1], [1, 1], [1, 1]))(x4).matrix()
    assert torch.equal(got4, _unfold(x4, (3, 3), (1, 1), (1, 1), (1, 1)))


@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("case", CASES)
def test_im2col_rht_is_the_rotation_of_the_matrix(case, n):
    """The fused im2col + FWHT (Im2col.rotated, one C pass) equals block_rht of the im2col matrix bit
    for bit, the zero-padded tail block (tokens not a multiple of n) included; the C pass writes it
    transposed (each block of tokens contiguous), as a [tokens, K] view."""
    from lowprec.dispatch import block_rht
    from lowprec.hadamard import random_signs
    shape, k, s, p, d = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    signs = random_signs(n, generator=torch.Generator().manual_seed(3))
    got = cpu.im2col_rht(x, k, s, p, d, signs)
    want = block_rht(_unfold(x, k, s, p, d), signs, 0)
    assert got.shape == want.shape and torch.equal(got, want)
    if native.library() is not None:
        assert got.stride() == (1, got.shape[0])


@pytest.mark.parametrize("rounding", ["rtn", "sr"])
@pytest.mark.parametrize("n", [16, 32])
def test_im2col_rht_nvfp4_is_nvfp4_of_the_rotated_matrix(n, rounding, monkeypatch):
    """NVFP4 along tokens of the rotated im2col matrix (one C call where each block of it is a masked,
    shifted plane of x, rotated twice: for the tensor max, then to quantize it; else the two twins) equals
    NVFP4 of Im2col.rotated's matrix, and the reference given the same uniforms, bit for bit, in the same
    [tokens, K] view; a NaN raises or zeros."""
    from lowprec import NonFiniteError, fp4
    from lowprec.hadamard import random_signs
    from lowprec.kernels import cpu_rht, native_calls
    calls = []
    run = native_calls.run_im2col_rht_nvfp4
    monkeypatch.setattr(native_calls, "run_im2col_rht_nvfp4", lambda *a, **k: calls.append(1) or run(*a, **k))
    signs = random_signs(n, generator=torch.Generator().manual_seed(3))
    for shape, k, s, p, d in CASES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 10.0 ** torch.randint(-3, 4, shape[:2])[
            ..., None, None]
        g = lambda: torch.Generator().manual_seed(6)  # noqa: E731
        got = cpu_rht.im2col_rht_nvfp4(x, k, s, p, d, signs, rounding=rounding, generator=g())
        rot = cpu.im2col_rht(x, k, s, p, d, signs)
        want = cpu.nvfp4(rot, dim=0, rounding=rounding, generator=g())
        assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want), (shape, n)
        u = cpu.uniforms(cpu.draw_seed(g()), rot.shape) if rounding == "sr" else None
        assert torch.equal(got, fp4.nvfp4(rot, dim=0, rounding=rounding, noise=u))
    if native.library() is not None:  # the one-call geometry: n = 16, stride 1, Wo = W, whole blocks per image
        direct = [c for c in CASES if n == 16 and c[2] == (1, 1) and _out_hw(c)[1] == c[0][3] and
                  _out_hw(c)[0] * _out_hw(c)[1] % 16 == 0]
        assert len(calls) == len(direct) and (len(direct) >= 5 or n == 32)
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 7, 7] = float("nan")
    with pytest.raises(NonFiniteError):
        cpu_rht.im2col_rht_nvfp4(x, (3, 3), (1, 1), (1, 1), (1, 1), signs)
    z = cpu_rht.im2col_rht_nvfp4(x, (3, 3), (1, 1), (1, 1), (1, 1), signs, nonfinite="skip")
    assert not z.any() and z.shape == cpu.im2col_rht(x, (3, 3), (1, 1), (1, 1), (1, 1), signs).shape
