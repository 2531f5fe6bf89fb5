"""The C im2col (lowprec.kernels.cpu.im2col, used by backward.im2col_of for the update GEMM's
activation operand under act_upd/update_rht) is the same matrix, bit for bit, as F.unfold followed by
the transposing reshape it replaces, and so is the rotated one (each of its gather paths: a plane
shifted, rows one by one): guards the update GEMM's numbers (nvfp4_sr_rht on convolutions)
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
         ((3, 2, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1))]  # a 'same' convolution: each image's plane shifted


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
