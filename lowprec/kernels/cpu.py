"""CPU twins of the references: the same results, bit for bit given the same uniforms, in one pass.

The references (:mod:`lowprec.luq`, :mod:`lowprec.nm`, :mod:`lowprec.fp4`) are written to be read;
on a CPU their cost is the number of passes over the tensor and ``torch.rand``, not the arithmetic
(``luq`` ran ~25 full-size temporaries, an N:M call ~500 small operations). The twins keep the
argument checks here and run a *core* per call:

- the C twins of :mod:`lowprec.kernels.native` (LUQ, N:M MVUE / approximate MVUE / MSE, NVFP4,
  MXFP4, block LUQ, radix4, fp4_rdn, int_sr, the block RHT's FWHT; one pass, any strided layout,
  uniforms drawn in the pass, the non-finite test inside it) for fp32 work (fp32, fp16 and bf16
  inputs) when a C compiler is found; N:M then LUQ (:func:`nm_luq`) in two passes, not three;
- else the torch cores below (the block formats, the baselines and the FWHT: their references, fed
  the same hashed uniforms), returning the C twins' memory layout (:func:`_in_c_layout`: the next
  GEMM's summation order follows it, so a run's numbers do not depend on whether a compiler was found):
  :func:`luq_core`, LUQ with ``2^e`` read from the exponent field
  (``clamp(y, 1)`` with its mantissa bits cleared) instead of ``frexp``/``ldexp`` and the two
  stochastic decisions folded into one count: with ``r = (|x| - l)/l`` (negative below α, where
  ``l = α``), ``|Q(x)| = l·([u < y] + [u < r])``, because ``u < 1 <= y`` above α (same operations on
  the same operands as the reference, so the same floats); and :func:`lowprec.nm.nm_core`, the
  reference's own N:M core.

Randomness: one seed per call from ``generator`` (:func:`draw_seed`; None: torch's global RNG, so
``torch.manual_seed`` reproduces a run), and uniforms ``U(key, i)`` from a counter-based hash of it
(:func:`uniforms`; the definition is in :mod:`lowprec.kernels.native`), ``i`` the position in the
reference's ``noise=`` layout. The C twin and the torch fallback draw the same numbers, so a run's
results do not depend on whether a compiler was found; they differ from the references'
``torch.rand`` draws (same distribution), as the Triton kernels' do. Given :func:`uniforms` as ``noise=``, the references
reproduce the twins exactly.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .._common import check_float, check_nonfinite_mode, nonfinite_guard, tiny_exponent, work_dtype
from .._common import uniforms as given_uniforms
from .. import baselines, fp4, hadamard
from ..fp4 import block_dims, check_rounding
from ..intq import check_bits
from ..luq import check_luq_args, luq_alpha, luq_levels
from ..nm import check_nm, from_blocks, nm_core, nm_noise_shape, to_blocks
from ..nm import nm_prune as nm_reference
from . import native, native_calls

_EXP_MASK = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A per-call seed in ``[0, 2^62)`` from ``generator`` (None: torch's global CPU RNG). 62 bits, not the
    Triton kernels' 31: a long run makes millions of calls, and two calls with one seed would share
    their uniforms (with 31 bits, ~1000 such pairs in 2M calls; with 62, none to be expected)."""
    return int(torch.randint(2 ** 62, (), generator=generator))


def key_of(seed: int) -> int:
    """The 64-bit hash key of a per-call seed."""
    return _mix64(seed & _MASK64)


def _i64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch integer ops wrap around)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniforms(seed: int, shape) -> Tensor:
    """The uniforms the twins draw for ``seed`` in C order of ``shape`` (fp32, in [0, 1 - 2^-24]):
    ``U(key, i)`` of :mod:`lowprec.kernels.native`, here with torch int64 ops (wrapping products)."""
    shape = torch.Size(shape)
    z = torch.arange(1, shape.numel() + 1, dtype=torch.int64) * _i64(_GOLDEN) + _i64(key_of(seed))
    z = (z ^ _srl(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _i64(0x94D049BB133111EB)
    z = z ^ _srl(z, 31)
    return (_srl(z, 40).to(torch.float32) * 2.0 ** -24).reshape(shape)


def backend_info(device="cpu") -> dict:
    """Which backend runs the estimators on ``device`` (what a run records in its summary):
    ``{"estimators": "c", "rung": ..., "flags": ..., "library": ...}`` (the C twins, built at that rung
    of :mod:`lowprec.kernels.native`'s ladder), ``{"estimators": "torch", "why": ...}`` (the torch
    cores), ``{"estimators": "reference", "why": ...}`` or ``{"estimators": "triton"}`` (CUDA). Reads
    ``$LOWPREC_BACKEND`` as :mod:`lowprec.dispatch` does; builds or loads the C library when needed."""
    requested = os.environ.get("LOWPREC_BACKEND", "auto").strip() or "auto"
    if requested == "reference":
        return {"estimators": "reference", "why": "LOWPREC_BACKEND=reference"}
    if torch.device(device).type == "cuda" or requested == "triton":
        from . import triton_available
        if triton_available():
            return {"estimators": "triton"}
        return {"estimators": "reference", "why": "triton is not importable"}
    info = native.build_info()
    return {"estimators": info.pop("cores"), **info}


def _is_dense(t: Tensor) -> bool:
    """Whether ``t``'s memory is one dense block in some order (then ``empty_like`` keeps its strides)."""
    return _is_dense_of(tuple(t.shape), t.stride())


def _is_dense_of(shape: tuple, stride: tuple) -> bool:
    expect = 1
    for size, st in sorted((d for d in zip(shape, stride) if d[0] != 1), key=lambda d: d[1]):
        if st != expect:
            return False
        expect *= size
    return True


def _dense(t: Tensor) -> Tensor:
    """``t`` itself when its memory is one dense block (so ``empty_like`` keeps its strides), else a copy."""
    return t if _is_dense(t) else t.contiguous()


def _in_c_layout(out: Tensor, x: Tensor, dim: int) -> Tensor:
    """``out`` (x's shape) in the memory layout the C twin gives for ``x`` blocked along ``dim``: x's
    own strides when x moved to blocks-last is dense, else that moved view made contiguous. The next
    GEMM's summation order depends on its operands' layout, so the C twins and the torch cores must
    agree on it for a run's numbers not to depend on whether a compiler was found."""
    xt = x.movedim(dim, -1)
    like = (torch.empty_like(xt, dtype=out.dtype) if _is_dense(xt) else
            torch.empty(xt.shape, dtype=out.dtype, device=out.device)).movedim(-1, dim)
    return out if like.stride() == out.stride() else like.copy_(out)


def _absmax(x: Tensor) -> Tensor:
    """max|x| from two vectorized reductions and no |x| temporary (NaN -> NaN, ±inf -> inf);
    ``vector_norm(x, inf)`` is many times slower on a CPU."""
    return torch.maximum(x.amax(), -x.amin())


def luq_core(x: Tensor, u: Tensor, m: Tensor, alpha: Tensor) -> Tensor:
    """LUQ of ``x`` (working precision, finite) with uniforms ``u``, top level ``m`` and ``α`` (see module docstring)."""
    itype, mask = _EXP_MASK[x.dtype]
    a = torch.minimum(x.abs(), m)
    y = a / alpha
    lo = torch.clamp(y, min=1.0).view(itype).bitwise_and(mask).view(x.dtype) * alpha  # α·2^floor(log2 y)
    r = (a - lo) / lo
    count = (u < y).to(x.dtype) + (u < r).to(x.dtype)
    return torch.copysign(lo * count, x)


def c_lib(x: Tensor, length: int = 0, m: int = 1):
    """The C library when it takes ``x`` (fp32 work on the CPU; blocks of ``m`` dividing ``length``), else None."""
    if work_dtype(x.dtype) != torch.float32 or x.device.type != "cpu" or m > native.MAX_M or length % m:
        return None
    return native.library()


def zeros_for_nonfinite(rc: int, x: Tensor, nonfinite: str, who: str) -> bool:
    """After a C twin: True when it read a NaN/Inf (rc 1) and ``nonfinite='skip'`` (zeros); raises for 'raise'."""
    return rc == 1 and nonfinite_guard(x, torch.tensor(float("nan")), nonfinite, who)


def draw(generator, noise: Tensor | None, shape, who: str) -> tuple[Tensor | None, int]:
    """(the given uniforms, contiguous, or None; the per-call seed, drawn only when none were given)."""
    if noise is not None:
        return given_uniforms(shape, "cpu", None, noise, who).contiguous(), 0
    return None, draw_seed(generator)


def luq(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None, generator: torch.Generator | None = None,
        noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.luq.luq` (same arguments; the same result given ``noise``)."""
    L = check_luq_args(x, bits, levels, max_abs, nonfinite)
    if x.numel() == 0:
        return x.clone()
    wt = work_dtype(x.dtype)
    xw = _dense(x.detach().to(wt))
    u, seed = draw(generator, noise, x.shape, "luq")
    lib = c_lib(x)
    if lib is not None:  # max, checks, α and the quantization in C
        top = None if max_abs is None else float(torch.as_tensor(max_abs).to(wt))
        rc, out = native_calls.run_luq(lib, xw, u, key_of(seed), top, torch.finfo(x.dtype).max, L, tiny_exponent(x.dtype))
        return torch.zeros_like(x) if rc == 2 or zeros_for_nonfinite(rc, x, nonfinite, "luq") else out.to(x.dtype)
    amax = _absmax(xw)
    if nonfinite_guard(x, amax, nonfinite, "luq"):
        return torch.zeros_like(x)
    m = amax if max_abs is None else torch.as_tensor(max_abs, device=x.device).to(wt).reshape(())
    m = torch.clamp(m, max=torch.finfo(x.dtype).max)
    if not bool(m > 0):
        return torch.zeros_like(x)
    u = uniforms(seed, x.shape) if u is None else u
    return luq_core(xw, u, m, luq_alpha(m, L, x.dtype)).to(x.dtype)


def nm_prune(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.nm.nm_prune` (mse: the C twin, else the reference)."""
    check_float(x, "nm_prune")
    check_nm(n, m, method)
    check_nonfinite_mode(nonfinite)
    if x.dim() == 0 or not -x.dim() <= dim < x.dim() or x.numel() == 0 or n == m:
        return nm_reference(x, n, m, method=method, dim=dim, generator=generator, noise=noise, nonfinite=nonfinite)
    xt = x.detach().movedim(dim, -1)
    lib = c_lib(x, xt.shape[-1], m)
    ushape = nm_noise_shape(x.shape, n, m, method, dim)
    big = torch.finfo(x.dtype).max
    u, seed = draw(generator, noise, ushape, "nm_prune") if method != "mse" else (None, 0)
    if lib is not None:  # blocks read and written in place, in any layout; the finite check in the pass
        xw = _dense(xt.to(torch.float32))
        if method == "mse":  # biased, deterministic: keep the n largest |x|
            rc, out = native_calls.run_mse(lib, xw, n, m)
        else:
            rc, out = native_calls.run_nm(lib, xw, u, key_of(seed), n, m, method == "mvue_approx", big)
        if zeros_for_nonfinite(rc, x, nonfinite, "nm_prune"):
            return torch.zeros_like(x)
        return out.movedim(-1, dim).to(x.dtype)
    if method == "mse":
        return _in_c_layout(nm_reference(x, n, m, method=method, dim=dim, nonfinite=nonfinite), x, dim)
    blocks, length = to_blocks(x, m, dim)
    if nonfinite_guard(x, _absmax(blocks), nonfinite, "nm_prune"):
        return torch.zeros_like(x)
    u = uniforms(seed, ushape) if u is None else u
    out = from_blocks(nm_core(blocks, u, n, method, big), x, length, dim)
    return out if length % m else _in_c_layout(out, x, dim)  # padded blocks: no C twin, nothing to match


def nm_luq(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1, bits: int = 4, levels: int | None = None,
           generator: torch.Generator | None = None, nonfinite: str = "raise") -> Tensor:
    """``luq(nm_prune(x, n, m, ...), bits, ...)`` of this module, the same result and the same draws from
    ``generator`` (the prune's seed, then LUQ's after the prune's checks), in two passes over fp32 δ where
    the C twins run (the pruned values and their max in one, LUQ over them in place in the other: the
    two steps read δ three times and write it twice); else those two steps (MSE, other dtypes, no C)."""
    check_float(x, "nm_prune")
    check_nm(n, m, method)
    check_nonfinite_mode(nonfinite)
    fused = (method != "mse" and x.dtype == torch.float32 and x.dim() > 0 and -x.dim() <= dim < x.dim()
             and x.numel() > 0 and n != m)
    xt = x.detach().movedim(dim, -1) if fused else None
    lib = c_lib(x, xt.shape[-1], m) if fused else None
    if lib is None:
        y = nm_prune(x, n, m, method=method, dim=dim, generator=generator, nonfinite=nonfinite)
        return luq(y, bits, levels=levels, generator=generator, nonfinite=nonfinite)
    seed = draw_seed(generator)
    big = torch.finfo(torch.float32).max
    rc, out, top = native_calls.run_nm(lib, _dense(xt), None, key_of(seed), n, m, method == "mvue_approx", big, True)
    skip = zeros_for_nonfinite(rc, x, nonfinite, "nm_prune")  # raises before LUQ's draw, as nm_prune does
    y = torch.zeros_like(x) if skip else out.movedim(-1, dim)
    L = check_luq_args(y, bits, levels, None, nonfinite)
    seed = draw_seed(generator)
    if skip or not top > 0:
        return torch.zeros_like(y)
    _, q = native_calls.run_luq(lib, y, None, key_of(seed), None, big, L, tiny_exponent(x.dtype), top=top, inplace=True)
    return q


# ----------------------------------------------------------------------------- block FP4 (lowprec.fp4)


def _fp4(fmt: str, reference, x: Tensor, *, dim: int, size: int, block_2d: bool, sr: bool, levels_minus_1: int,
         generator, noise, nonfinite: str, ref_kwargs: dict) -> Tensor:
    """The C twin of a block format, else its reference given the same (hashed) uniforms."""
    check_float(x, fmt)
    check_nonfinite_mode(nonfinite)
    if x.numel() == 0:
        return x.clone()
    if block_2d:
        outer, length, inner = x.shape[0], x.numel() // x.shape[0], 1
    else:
        outer, length, inner = block_dims(x, dim)
    u, seed = draw(generator, noise, x.shape, fmt) if sr else (None, 0)
    lib = c_lib(x)
    view = None if block_2d else _blocked_view(x, dim)
    if lib is None:
        if sr and u is None:
            u = uniforms(seed, x.shape)
        out = reference(x, **ref_kwargs, noise=u if sr else None, nonfinite=nonfinite)
        # the C twin's layout (see _in_c_layout: the next GEMM must see the same one)
        if view is None:
            return out.contiguous()
        return out if out.stride() == x.stride() else torch.empty_like(x).copy_(out)
    if view is None:
        rc, out = native_calls.run_fp4(lib, x.detach().float().contiguous(), u, key_of(seed), fmt, outer, length, inner,
                                 size, 16 if block_2d else 1, sr, levels_minus_1)
        out = out.view(x.shape)
    else:  # x read and written in its own memory order (a transposed Linear δ: no transposing copy)
        (outer, length, inner), us = view
        rc, out = native_calls.run_fp4(lib, x.detach().float(), u, key_of(seed), fmt, outer, length, inner, size, 1, sr,
                                 levels_minus_1, us)
    return torch.zeros_like(x) if zeros_for_nonfinite(rc, x, nonfinite, fmt) else out.to(x.dtype)


def _blocked_view(x: Tensor, dim: int):
    """``((outer, length, inner), uniform strides)`` when x's memory is one dense block whose dims, in
    memory order, read as ``[outer, length = x.shape[dim], inner]`` with the uniform index (x's logical C
    order) affine in inner and in outer, or in two levels of outer (cpu_fp4.c's row_u); None otherwise
    (the caller copies to contiguous)."""
    return blocked_view_of(tuple(x.shape), x.stride(), dim)


def contiguous_strides(shape) -> list[int]:
    """The strides of a contiguous tensor of ``shape`` (C order), i.e. each element's logical index steps."""
    stride = [1] * len(shape)
    for k in range(len(shape) - 2, -1, -1):
        stride[k] = stride[k + 1] * shape[k + 1]
    return stride


@functools.lru_cache(maxsize=1024)  # a model has a few dozen (shape, layout, dim); this ran ~10 us every call
def blocked_view_of(shape: tuple, stride: tuple, dim: int):
    if not _is_dense_of(shape, stride) or len(shape) == 0:
        return None
    n = len(shape)
    d = dim % n
    logical = contiguous_strides(shape)
    order = sorted((k for k in range(n) if shape[k] != 1 and k != d), key=lambda k: -stride[k])
    outer_dims = [k for k in order if shape[d] == 1 or stride[k] > stride[d]]
    inner_dims = [k for k in order if k not in outer_dims]

    def fold(group):  # the group's flat memory index -> (count, uniform stride), or None when not affine
        count, ustride = 1, 0
        for k in reversed(group):  # innermost first
            if count == 1:
                count, ustride = shape[k], logical[k]
            elif logical[k] == ustride * count:
                count *= shape[k]
            else:
                return None
        return count, ustride

    o, i = fold(outer_dims), fold(inner_dims)
    if i is None:
        return None
    if o is not None:  # rows one affine run: row_u(o) = o·us[0] (cpu_fp4.c)
        return (o[0], shape[d], i[0]), (o[1], logical[d], i[1], max(o[0], 1), o[0] * o[1])
    # rows in two affine levels (a convolution's [C_out, N, H·W] token view read in NCHW order)
    hi, lo = fold(outer_dims[:1]), fold(outer_dims[1:])
    if lo is None:
        return None
    return (hi[0] * lo[0], shape[d], i[0]), (lo[1], logical[d], i[1], lo[0], hi[1])


def nvfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False,
          generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.fp4.nvfp4`."""
    check_rounding(rounding)
    return _fp4("nvfp4", fp4.nvfp4, x, dim=dim, size=fp4.NVFP4_BLOCK, block_2d=block_2d, sr=rounding == "sr",
                levels_minus_1=0, generator=generator, noise=noise, nonfinite=nonfinite,
                ref_kwargs=dict(dim=dim, rounding=rounding, block_2d=block_2d))


def mxfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", generator: torch.Generator | None = None,
          noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.fp4.mxfp4`."""
    check_rounding(rounding)
    return _fp4("mxfp4", fp4.mxfp4, x, dim=dim, size=fp4.MXFP4_BLOCK, block_2d=False, sr=rounding == "sr",
                levels_minus_1=0, generator=generator, noise=noise, nonfinite=nonfinite,
                ref_kwargs=dict(dim=dim, rounding=rounding))


def block_luq(x: Tensor, bits: int = 4, *, block: int = 16, dim: int = -1, levels: int | None = None,
              generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.fp4.block_luq`."""
    fp4.check_block(block)
    L = luq_levels(bits, levels)
    return _fp4("block_luq", fp4.block_luq, x, dim=dim, size=block, block_2d=False, sr=True, levels_minus_1=L - 1,
                generator=generator, noise=noise, nonfinite=nonfinite,
                ref_kwargs=dict(bits=bits, block=block, dim=dim, levels=levels))


# ----------------------------------------------------------------------------- baselines (lowprec.baselines)


def _elem(kind: str, reference, x: Tensor, param: int, *, stochastic: bool, generator, noise, nonfinite: str,
          ref_kwargs: dict) -> Tensor:
    """The C twin of a per-tensor-scaled baseline, else its reference given the same (hashed) uniforms."""
    check_float(x, kind)
    check_nonfinite_mode(nonfinite)
    if x.numel() == 0:
        return x.clone()
    u, seed = draw(generator, noise, x.shape, kind) if stochastic else (None, 0)
    lib = c_lib(x)
    if lib is None:
        if stochastic:
            ref_kwargs = dict(ref_kwargs, noise=uniforms(seed, x.shape) if u is None else u)
        return reference(x, **ref_kwargs, nonfinite=nonfinite)
    xw = _dense(x.detach().to(torch.float32))
    rc, out = native_calls.run_elem(lib, kind, xw, u, key_of(seed), param, torch.finfo(x.dtype).max, tiny_exponent(x.dtype))
    return torch.zeros_like(x) if rc == 2 or zeros_for_nonfinite(rc, x, nonfinite, kind) else out.to(x.dtype)


def radix4(x: Tensor, *, levels: int = 7, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.baselines.radix4`."""
    baselines.check_radix4_levels(levels)
    return _elem("radix4", baselines.radix4, x, levels, stochastic=False, generator=None, noise=None,
                 nonfinite=nonfinite, ref_kwargs=dict(levels=levels))


def fp4_rdn(x: Tensor, bits: int = 4, *, levels: int | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.baselines.fp4_rdn`."""
    L = luq_levels(bits, levels)
    return _elem("fp4_rdn", baselines.fp4_rdn, x, L, stochastic=False, generator=None, noise=None,
                 nonfinite=nonfinite, ref_kwargs=dict(bits=bits, levels=levels))


def int_sr(x: Tensor, bits: int = 4, *, generator: torch.Generator | None = None, noise: Tensor | None = None,
           nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.baselines.int_sr` (the same result given ``noise``)."""
    check_bits(bits)
    return _elem("int_sr", baselines.int_sr, x, 2 ** (bits - 1) - 1, stochastic=True, generator=generator, noise=noise,
                 nonfinite=nonfinite, ref_kwargs=dict(bits=bits))


# ----------------------------------------------------------------------------- block RHT (lowprec.hadamard)


def is_transposed_matrix(x: Tensor) -> bool:
    """Whether ``x`` is the transpose of a contiguous matrix (a Linear's δ as its [C_out, tokens] view)."""
    return x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride() == (1, x.shape[0])


def block_rht(x: Tensor, signs: Tensor, dim: int, *, inverse: bool = False) -> Tensor:
    """CPU twin of :func:`lowprec.hadamard.block_rht`: the same FWHT in one C pass (bit-identical),
    else the torch version itself."""
    check_float(x, "block_rht")
    n = signs.numel()
    hadamard.check_rht_size(n)
    if is_transposed_matrix(x):
        # a transposed matrix (a Linear δ as [out, T]): rotate its contiguous transpose along the other
        # dim (the same numbers: each block's values and operations do not depend on the layout), no
        # transposing copy; the result keeps the transposed layout, with or without the C twin
        return block_rht(x.t(), signs, 1 - dim % 2, inverse=inverse).t()
    lib = c_lib(x)
    if lib is None or x.requires_grad and torch.is_grad_enabled():
        return hadamard.block_rht(x, signs, dim, inverse=inverse)
    outer, length, inner = hadamard.rht_dims(x, dim)
    xc = x.detach().to(torch.float32).contiguous()
    s = signs.detach().to(device="cpu", dtype=torch.float32).contiguous()
    out = native_calls.run_fwht(lib, xc, s, outer, length, inner, n, inverse)
    d = dim % x.dim()
    return out.view(*x.shape[:d], out.shape[1], *x.shape[d + 1:]).to(x.dtype)


def im2col(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """The im2col matrix ``[N·Ho·Wo, C·kh·kw]`` of ``x`` ``[N, C, H, W]`` (pairs of ints): one C pass
    on fp32 CPU tensors (no ``[N, K, L]`` intermediate, no transposing copy; data movement only, so
    the same numbers), else ``F.unfold`` and the transposing copy."""
    lib = native.library() if x.dtype == torch.float32 and x.device.type == "cpu" else None
    if lib is not None and not (x.requires_grad and torch.is_grad_enabled()):
        return native_calls.run_im2col(lib, x.detach().contiguous(), kernel, stride, padding, dilation)
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def contiguous(x: Tensor) -> Tensor:
    """``x.contiguous()``; a transposed fp32 CPU matrix (a Linear's δ as ``[C_out, tokens]``) copied
    in one C pass (data movement only, so the same tensor; torch's transposing copy was ~3x slower)."""
    if (is_transposed_matrix(x) and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())):
        lib = native.library()
        if lib is not None:
            return native_calls.run_transpose(lib, x.t())
    return x.contiguous()


def im2col_rht(x: Tensor, kernel, stride, padding, dilation, signs: Tensor) -> Tensor:
    """``block_rht(im2col(x, ...), signs, 0)``, the same numbers: on fp32 CPU tensors one C pass that
    gathers the im2col rows straight into the FWHT (the matrix is never written), else those two calls."""
    lib = native.library() if x.dtype == torch.float32 and x.device.type == "cpu" else None
    if lib is None or x.requires_grad and torch.is_grad_enabled():
        return block_rht(im2col(x, kernel, stride, padding, dilation), signs, 0)
    s = signs.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return native_calls.run_im2col_fwht(lib, x.detach().contiguous(), kernel, stride, padding, dilation, s)

