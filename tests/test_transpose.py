"""The C transposing copy (lowprec.kernels.cpu.contiguous, used by backward's `_once` for a Linear's δ
as the [C_out, tokens] matrix of the block formats) is ``x.contiguous()`` bit for bit: guards the 8x8
register tiles' shuffles and the edges (sizes not a multiple of 8) that every block-format recipe's
δ passes through on a Linear."""

import pytest
import torch

from lowprec.kernels import cpu, native

SHAPES = [(1024, 64), (1024, 192), (8, 8), (9, 17), (63, 5), (7, 40), (16, 3), (2, 2), (300, 257)]


def _bits(t):
    return t.view(torch.int32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_transposed_matrix_copy_is_contiguous(shape, threads):
    if native.library() is None:
        pytest.skip("no C compiler")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, -1], x[-1, 0] = float("nan"), -0.0  # bits, not just values, are moved
    v = x.t()  # the [C_out, tokens] view of a [tokens, C_out] δ
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.contiguous(v)
    finally:
        torch.set_num_threads(before)
    assert got.is_contiguous() and got.shape == v.shape
    assert torch.equal(_bits(got), _bits(v.contiguous()))


def test_other_layouts_are_torch_contiguous():
    """Anything but a transposed fp32 CPU matrix is x.contiguous() itself (no copy when contiguous)."""
    x = torch.randn(6, 10)
    assert cpu.contiguous(x) is x
    s = torch.randn(10, 12)[:, ::2].t()  # transposed but not of a dense matrix
    assert torch.equal(cpu.contiguous(s), s.contiguous()) and cpu.contiguous(s).is_contiguous()
    h = torch.randn(10, 6, dtype=torch.float64).t()
    assert torch.equal(cpu.contiguous(h), h.contiguous()) and cpu.contiguous(h).dtype == torch.float64
