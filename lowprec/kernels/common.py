"""Shared Triton pieces: launch options, block sizes, bit-exact helpers and the uniforms kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = 2 ** 31 - 1  # kernels index with int32

# Every launch: no a*b+c -> FMA contraction (the references round after each op).
LAUNCH_OPTS = {"enable_fp_fusion": False}

# Interpreter: the cost is per op, not per element, so one big block is 50-100x faster than
# BLOCK=1024 (install notes: 0.2-1.4 M el/s at 1024, ~7 M el/s at 65536).
INTERP_BLOCK = 1 << 16


def check_launchable(x: torch.Tensor, who: str) -> None:
    """Raise a clear error when ``x`` cannot go through a kernel."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{who}: the Triton kernel takes fp32/fp16/bf16, got {x.dtype} (use backend='reference')")
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"{who}: {x.numel()} elements exceed the kernels' int32 indexing ({MAX_NUMEL})")
    if x.is_cuda:
        return
    if not interpreter_enabled():
        raise RuntimeError(
            f"{who}: the Triton kernel got a {x.device} tensor; kernels run on CUDA tensors, or on CPU "
            "tensors only under TRITON_INTERPRET=1 (set before triton is first imported)"
        )


def block_for(n: int, cuda: bool, gpu_block: int) -> int:
    """Elements (or N:M blocks) per program: ``gpu_block`` on a GPU, one large block in the interpreter."""
    if cuda:
        return gpu_block
    return max(16, min(INTERP_BLOCK, triton.next_power_of_2(max(int(n), 1))))


def num_programs_cap(x: torch.Tensor) -> int:
    """Grid cap for grid-stride reductions (bounds the number of atomics on one address)."""
    if x.is_cuda:
        return 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1 << 30


@triton.jit
def pow2(e):
    """2^e as fp32 for int32 e in [-126, 127], exactly (built from the exponent field)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def floor_log2(y):
    """floor(log2 y) for positive normal fp32 y, exactly (the exponent field), as lowprec._common.floor_log2."""
    return ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def copysign(mag, x):
    """mag (>= 0, fp32) with the sign bit of x (fp32), bit for bit like torch.copysign."""
    bits = (mag.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (x.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed"])
def _uniforms_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)


def uniforms(seed: int, shape, device="cpu") -> torch.Tensor:
    """``tl.rand(seed, flat_index)`` laid out in ``shape``: exactly the uniforms a kernel launched with
    ``seed`` draws for the reference's ``noise=`` tensor of that shape (tests feed them back)."""
    shape = torch.Size(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,))
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = out.numel()
    if n:
        if not out.is_cuda and not interpreter_enabled():
            raise RuntimeError("uniforms: CPU tensors need TRITON_INTERPRET=1")
        block = block_for(n, out.is_cuda, 1024)
        _uniforms_kernel[(triton.cdiv(n, block),)](out, seed, n, BLOCK=block)
    return out


@triton.jit
def cast_out(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even, identically on GPU and in the interpreter.

    The interpreter's fp32->bf16 cast truncates (a GPU's ``cvt.rn.bf16.f32`` rounds to nearest
    even, as torch does), so bf16 is rounded here with integer ops: add ``0x7FFF + lsb`` to the fp32
    bits and keep the top 16 (torch's c10::BFloat16 rounding; exact for finite values and overflow).
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)
