"""The C twins of the CPU cores (the ``cpu_*.c`` files here): built once per machine with the system C compiler,
loaded with ctypes, used by :mod:`lowprec.kernels.cpu` when available.

Why C: on a CPU an estimator's cost is its passes over δ and its random numbers. ``torch.rand``
costs ~3 ns per fp32 draw on one core, more than the whole estimator may cost (issue 9's budget for
a ResNet-20 step is ~5 ns per δ element), and an N:M block's ~150 scalar operations do not
vectorize as torch operations or under ``torch.compile`` (strided block columns). The C twins make
one pass over δ, read and write it in place in any strided layout (no transposes), draw their
uniforms from a counter-based hash (below), and skip the water-filling rounds that cannot change
anything (a round that caps no new entry would repeat itself bit for bit).

Bit-exactness: each C function (LUQ; N:M MVUE, approximate MVUE and MSE; NVFP4, MXFP4, block LUQ;
radix4, fp4_rdn, int_sr; the block RHT's fast Walsh–Hadamard transform)
mirrors its reference (through the torch core of :mod:`lowprec.kernels.cpu` where there is one)
operation for operation in fp32: IEEE division, no FMA contraction (``-ffp-contract=off``), no
fast-math, sums left to right; ``-fno-trapping-math`` only lets guarded divisions be vectorized (IEEE
results unchanged, traps are masked anyway). So given the same uniforms the outputs equal the
references' (``tests/test_native.py``, ``tests/test_native_baselines.py``,
``tests/test_twin_boundaries.py``; the layout of the output too: ``tests/test_twin_layouts.py``).

Uniforms: ``U(key, i)`` = the top 24 bits of ``splitmix64(key + (i+1)·0x9E3779B97F4A7C15)`` times
``2^-24`` (torch.rand's fp32 grid), ``i`` the uniform's index in the reference's ``noise=`` layout,
``key = splitmix64(seed)`` with a 62-bit ``seed`` drawn from torch's generator per call
(:func:`lowprec.kernels.cpu.draw_seed`). SplitMix64 passes BigCrush; :func:`lowprec.kernels.cpu.uniforms`
computes the same numbers with torch integer ops, so the torch fallback draws exactly what the C
twin draws and a run's numbers do not depend on whether a compiler was found.

Build: every ``cpu_*.c`` of this folder (one file per family: ``cpu_common`` the uniforms,
``cpu_luq``, ``cpu_nm``, ``cpu_fp4``, ``cpu_baselines``, ``cpu_hadamard``; shared inline helpers in
``cpu_common.h``, the N:M per-block math in ``cpu_nm_block.h``, a column block's FWHT in
``cpu_fwht.h``) into one library with ``$CC`` (else ``cc``/``gcc``/``clang``), ``-O3
-ffp-contract=off`` and, down a ladder of rungs until one compiles, ``-march=native``,
``-mcpu=native`` (Apple clang and other compilers that reject ``-march=native``), ``-mtune=native``,
then nothing (portable code; the N:M twins' GCC/Clang vector types still compile, to whatever vector
width the target has), each with OpenMP when the compiler takes ``-fopenmp`` (threads:
``torch.get_num_threads()``; every element's result is the same whatever the thread count). The
rungs change speed, never results: the flags above fix the arithmetic. Each rung's library (or its
failure, a ``.fail`` note, so a later process does not retry it) is cached in
``$LOWPREC_CACHE_DIR/native`` (default ``~/.cache/lowprec/native``) under a name hashing the sources,
the compiler, the flags and the CPU's flags (``-march=native`` code must not run on another CPU),
written to a temporary file and renamed (concurrent processes are safe). About a second, once.

Trust: the cache directory is created private (0700); a cache directory, or a library in it, that
is not owned by the user, is writable by group or others, or is a symbolic link is refused (one
warning, the torch cores run), and so is a library that lacks one of the functions of
:data:`SIGNATURES` (the ctypes prototypes, checked against the C sources by ``tests/test_native.py``).
The library is loaded from the very file that was checked (its open descriptor, where
``/proc/self/fd`` exists; elsewhere its absolute path inside the checked private directory).
``LOWPREC_CPU_NATIVE=0`` turns the C twins off; without a compiler, or when every rung fails, one
warning and the torch cores run instead (:func:`status` says why, :func:`build_info` which rung ran).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

ENV = "LOWPREC_CPU_NATIVE"
CACHE_ENV = "LOWPREC_CACHE_DIR"
HERE = Path(__file__).parent
SOURCES = tuple(sorted(HERE.glob("cpu_*.c")))
HEADERS = tuple(sorted(HERE.glob("cpu_*.h")))
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c99",
         "-Wno-psabi"]
RUNGS = (("march-native", ["-march=native"]), ("mcpu-native", ["-mcpu=native"]), ("mtune-native", ["-mtune=native"]),
         ("portable", []))
MAX_M = 8

_P, _I64P = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
_U64, _I64, _INT, _F32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# Every exported C function: (restype, argtypes). tests/test_native.py parses the C prototypes and
# checks them against this table (a wrong width here would pass garbage, not fail).
SIGNATURES = {
    "lp_uniforms": (None, [_U64, _I64, _P]),
    "lp_luq_f32": (None, [_P, _P, _P, _U64, _I64P, _I64P, _I64P, _F32, _F32, _INT]),
    "lp_luq_auto_f32": (_INT, [_P, _P, _P, _U64, _I64P, _I64P, _I64P, _F32, _F32, _INT, _INT, _INT]),
    "lp_luq_top_f32": (_INT, [_P, _P, _P, _U64, _I64P, _I64P, _I64P, _F32, _F32, _INT, _INT, _INT]),
    "lp_nm_f32": (_INT, [_P, _P, _P, _U64, _I64P, _I64P, _I64P, _I64, _INT, _INT, _INT, _F32, _INT, _P]),
    "lp_mse_f32": (_INT, [_P, _P, _I64P, _I64P, _I64, _INT, _INT, _INT]),
    "lp_fp4_f32": (_INT, [_P, _P, _P, _U64, _I64P, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _INT, _INT]),
    "lp_rht_nvfp4_f32": (_INT, [_P, _P, _P, _P, _U64, _I64P, _I64, _I64, _I64, _INT, _INT, _INT]),
    "lp_elem_f32": (_INT, [_P, _P, _P, _U64, _I64P, _I64P, _I64P, _INT, _INT, _F32, _INT, _INT]),
    "lp_fwht_f32": (_INT, [_P, _P, _P, _I64, _I64, _I64, _INT, _INT, _INT]),
    "lp_im2col_f32": (_INT, [_P, _P, _I64P, _INT]),
    "lp_im2col_fwht_f32": (_INT, [_P, _P, _I64P, _P, _INT, _INT]),
    "lp_transpose_f32": (_INT, [_P, _P, _I64, _I64, _INT]),
}

_state: dict = {"lib": None, "failed": None, "enabled": None, "rung": None, "path": None}
_I64x3 = ctypes.c_int64 * 3
_I64x5 = ctypes.c_int64 * 5
_FDS: list[int] = []
_LOADED: dict[tuple, ctypes.CDLL] = {}


def set_enabled(enabled: bool | None) -> None:
    """Use the C twins (True), the torch cores (False), or what ``$LOWPREC_CPU_NATIVE`` says (None);
    forgets the loaded library and an earlier failure (the next call builds or loads it again)."""
    _state.update(enabled=enabled, lib=None, failed=None, rung=None, path=None)


def enabled() -> bool:
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    v = os.environ.get(ENV, "1").strip().lower()
    if v not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
        raise ValueError(f"{ENV}={v!r}: expected 0 or 1")
    return v not in ("0", "false", "no", "off")


def status() -> str:
    """One line: whether the estimators' CPU cores run as C, and if not, why."""
    if not enabled():
        return f"torch cores ({ENV}=0)"
    lib = library()
    return (f"C twins ({_state['path']}, {' '.join(_state['rung'][1]) or _state['rung'][0]})" if lib is not None
            else f"torch cores (C twins unavailable: {_state['failed']})")


def build_info() -> dict:
    """Which CPU cores run: ``{"cores": "c", "rung": ..., "flags": ..., "library": ...}`` or
    ``{"cores": "torch", "why": ...}`` (builds or loads the library first)."""
    if not enabled():
        return {"cores": "torch", "why": f"{ENV}=0"}
    if library() is None:
        return {"cores": "torch", "why": _state["failed"]}
    name, flags = _state["rung"]
    return {"cores": "c", "rung": name, "flags": " ".join(flags), "library": _state["path"]}


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lowprec") / "native"


def untrusted(path: Path, *, directory: bool, st: os.stat_result | None = None) -> str | None:
    """Why ``path`` (``st``: its stat, else lstat'ed here) must not be trusted, None if it may: a
    symbolic link, not a directory / regular file, owned by another user, writable by group or others."""
    try:
        st = os.lstat(path) if st is None else st
    except OSError as e:
        return f"{path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        return f"{path} is not a {'directory' if directory else 'regular file'}"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_cache() -> Path:
    """The cache directory, created 0700 (an existing one of ours tightened to 0700); RuntimeError
    when it cannot be trusted."""
    cache = cache_dir()
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache.mkdir(mode=0o700)
    except FileExistsError:
        pass
    why = untrusted(cache, directory=True)
    if why:
        raise RuntimeError(f"refusing the C cache: {why}")
    if stat.S_IMODE(os.lstat(cache).st_mode) != 0o700:
        os.chmod(cache, 0o700)  # ours and not writable by others: make it private as a new one is
    return cache


def candidates(cc: str):
    """``(rung name, rung flags, library path)`` for each rung of the build ladder, in order."""
    src = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in SOURCES + HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    cache = cache_dir()
    for name, arch in RUNGS:
        for omp in (["-fopenmp"], []):
            flags = FLAGS + arch + omp
            tag = hashlib.sha256(b"\0".join([src, cc.encode(), version.encode(), " ".join(flags).encode(),
                                             platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:20]
            yield name, arch + omp, cache / f"lowprec_cpu_{tag}.so"


def _build(cc: str) -> tuple[Path, tuple[str, list[str]]]:
    """The first rung's library that exists or compiles: (path, (rung name, rung flags))."""
    cache = _private_cache()
    errors = []
    for name, extra, path in candidates(cc):
        fail = path.with_suffix(".fail")
        if os.path.lexists(path):
            return path, (name, extra)
        if fail.exists():  # this rung failed before with this compiler: do not pay for it again
            errors.append(fail.read_text()[:200])
            continue
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            # generous: a quiet build takes well under a minute, but on a loaded machine one took
            # over 300 s, and a timeout here means the slow torch cores for the whole process
            r = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True,
                               text=True, timeout=1200)
            if r.returncode == 0:
                os.chmod(tmp, 0o700)
                os.replace(tmp, path)
                return path, (name, extra)
            msg = ((r.stderr or r.stdout).strip().splitlines() or ["failed"])[-1]
            errors.append(f"{name}{' -fopenmp' if '-fopenmp' in extra else ''}: {msg}")
            fail.write_text(errors[-1])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} failed on every rung: {errors[-1][:200] if errors else 'no rung'}")


def _load(path: Path):
    """dlopen ``path`` after checking it (and its directory), through the descriptor of the checked file."""
    why = untrusted(path.parent, directory=True) or untrusted(path, directory=False)
    if why:
        raise RuntimeError(f"refusing the C library: {why}")
    proc = Path("/proc/self/fd")
    if not proc.is_dir() or not hasattr(os, "O_NOFOLLOW"):  # the checked private directory keeps the path ours
        return ctypes.CDLL(str(path.resolve()))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        why = untrusted(path, directory=False, st=st)  # the file now open is the one loaded
        if why:
            raise RuntimeError(f"refusing the C library: {why}")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _LOADED:  # this very file is loaded already (a reload after set_enabled)
            os.close(fd)
            return _LOADED[key]
        lib = ctypes.CDLL(str(proc / str(fd)))
    except BaseException:
        os.close(fd)
        raise
    # kept open (one per distinct library, which is never unloaded anyway): a later dlopen of a reused
    # /proc/self/fd/N name would be answered with the library already loaded under that name
    _FDS.append(fd)
    _LOADED[key] = lib
    return lib


def _bind(lib) -> None:
    """Set every function's ctypes prototype; RuntimeError naming the first missing one."""
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise RuntimeError(f"the C library lacks {name} (stale or foreign library)") from None
        fn.argtypes, fn.restype = argtypes, restype


def library():
    """The loaded C library, or None (disabled, or not buildable/trusted: one warning per process)."""
    if not enabled() or _state["failed"]:
        return None
    if _state["lib"] is None:
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC)")
            path, rung = _build(cc)
            lib = _load(path)
            _bind(lib)
            _state["lib"], _state["path"], _state["rung"] = lib, path.name, rung
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"
            warnings.warn(f"lowprec CPU estimators: C twins unavailable ({_state['failed']}); running the torch cores",
                          RuntimeWarning, stacklevel=2)
            return None
    return _state["lib"]


def nest(t: Tensor, m: int):
    """``t``'s blocks of ``m`` along its last dim as three loops (outermost first) of (count, x offset
    step, uniform-index step in blocks), and the element step inside a block; None when the layout
    needs more than three loops (the caller copies ``t`` to contiguous first). The uniform index is
    the block's position in C order of ``t``'s logical shape, as the references lay out ``noise=``."""
    return _nest(tuple(t.shape), t.stride(), m)


@functools.lru_cache(maxsize=1024)  # a model has a few dozen (shape, layout) pairs; this runs every call
def _nest(shape: tuple, stride: tuple, m: int):
    nb = shape[-1] // m
    dims, ustep = [(nb, stride[-1] * m, 1)], nb
    for size, s in zip(reversed(shape[:-1]), reversed(stride[:-1])):
        dims.append((size, s, ustep))
        ustep *= size
    dims = sorted((d for d in dims if d[0] != 1), key=lambda d: -abs(d[1]))
    merged: list[tuple[int, int, int]] = []
    for d in dims:  # an outer loop that continues the inner one exactly folds into it
        if merged and merged[-1][1] == d[1] * d[0] and merged[-1][2] == d[2] * d[0]:
            o = merged.pop()
            d = (o[0] * d[0], d[1], d[2])
        merged.append(d)
    if len(merged) > 3:
        return None
    merged = [(1, 0, 0)] * (3 - len(merged)) + merged
    return tuple(zip(*merged)), stride[-1]


def _nested(t: Tensor, m: int):
    loops = nest(t, m)
    if loops is None:
        t = t.contiguous()
        loops = nest(t, m)
    (size, xs, us), es = loops
    return t, (_I64x3(*size), _I64x3(*xs), _I64x3(*us)), es


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def run_luq(lib, x: Tensor, u: Tensor | None, key: int, max_abs: float | None, fmax: float, levels: int,
            e_tiny: int, *, top: float | None = None, inplace: bool = False) -> tuple[int, Tensor]:
    """``(status, out)``: LUQ of fp32 ``x`` (dense) as :func:`lowprec.kernels.cpu.luq` computes it, into a
    tensor with ``x``'s strides (a contiguous one when they need more than three loops). ``u``:
    contiguous uniforms in ``x``'s logical order, or None to draw them from ``key``; ``max_abs``: the
    given top level (None: max|x|); ``fmax``/``e_tiny``: the input dtype's largest finite value and
    smallest normal exponent. Status 0: done; 1: x holds a NaN/Inf; 2: the top level is 0. ``top``:
    max|x| already known (x finite): no pass for it. ``inplace``: written over x (or its contiguous copy)."""
    x, (size, xs, us), _ = _nested(x, 1)
    out = x if inplace else torch.empty_like(x)
    if top is not None:
        return lib.lp_luq_top_f32(_ptr(x), _ptr(out), _ptr(u), key, size, xs, us, top, fmax, levels, e_tiny,
                                  _threads()), out
    rc = lib.lp_luq_auto_f32(_ptr(x), _ptr(out), _ptr(u), key, size, xs, us, -1.0 if max_abs is None else max_abs,
                             fmax, levels, e_tiny, _threads())
    return rc, out


def run_nm(lib, blocks: Tensor, u: Tensor | None, key: int, n: int, m: int, approx: bool,
           big: float, out_max: bool = False):
    """``(status, out)``: N:M of fp32 ``blocks`` (dense, last dim a multiple of m) into a tensor with its
    strides; status 1 when a NaN/Inf was read (``out`` is then not meaningful). ``out_max``: also
    max|out| (a float, read in the same pass), as a third item."""
    blocks, (size, xs, us), es = _nested(blocks, m)
    out = torch.empty_like(blocks)
    omax = ctypes.c_uint32(0) if out_max else None
    rc = lib.lp_nm_f32(_ptr(blocks), _ptr(out), _ptr(u), key, size, xs, us, es, n, m, int(approx), big, _threads(),
                       None if omax is None else ctypes.byref(omax))
    if rc < 0:
        raise ValueError(f"lp_nm_f32: unsupported n={n}, m={m}")
    if omax is None:
        return rc, out
    return rc, out, ctypes.c_float.from_buffer_copy(omax).value


def run_mse(lib, blocks: Tensor, n: int, m: int) -> tuple[int, Tensor]:
    """``(status, out)``: the MSE (keep the n largest) mask of fp32 ``blocks`` as in :func:`run_nm`."""
    blocks, (size, xs, _), es = _nested(blocks, m)
    out = torch.empty_like(blocks)
    rc = lib.lp_mse_f32(_ptr(blocks), _ptr(out), size, xs, es, n, m, _threads())
    if rc < 0:
        raise ValueError(f"lp_mse_f32: unsupported n={n}, m={m}")
    return rc, out


FP4_FORMATS = {"nvfp4": 0, "mxfp4": 1, "block_luq": 2}


def run_fp4(lib, x: Tensor, u: Tensor | None, key: int, fmt: str, outer: int, length: int, inner: int,
            size: int, rows: int = 1, sr: bool = False, levels_minus_1: int = 0,
            ustrides: tuple[int, int, int] | None = None) -> tuple[int, Tensor]:
    """``(status, out)``: a block FP4 format of :mod:`lowprec.fp4` on fp32 ``x`` (its memory one dense
    ``[outer, length, inner]`` block, blocks of ``size`` along length, ``rows`` > 1: 2-D tiles) into a
    tensor with x's strides; status 1 when x holds a NaN/Inf. ``ustrides``: the uniform index of element
    (o, l, i) is row_u(o) + l·us[1] + i·us[2], row_u(o) = (o // us[3])·us[4] + (o % us[3])·us[0] (None:
    x contiguous, C order); ``u``: contiguous uniforms in x's logical order, or None to draw them from ``key``."""
    out = torch.empty_like(x)
    us = _I64x5(*(ustrides or (length * inner, inner, 1, max(outer, 1), outer * length * inner)))
    rc = lib.lp_fp4_f32(_ptr(x), _ptr(out), _ptr(u), key, us, outer, length, inner, size, rows, FP4_FORMATS[fmt],
                        int(sr), levels_minus_1, _threads())
    return rc, out


def run_rht_nvfp4(lib, x: Tensor, signs: Tensor, u: Tensor | None, key: int, outer: int, n_in: int, inner: int,
                  n: int, sr: bool, ustrides: tuple[int, int, int]) -> tuple[int, Tensor]:
    """``(status, out)``: NVFP4 (blocks along the middle dim) of :func:`run_fwht`'s rotation of fp32 ``x``
    (contiguous ``[outer, n_in, inner]``, inner > 1) in one C call, the rotated tensor never written;
    ``out`` contiguous ``[outer, ceil(n_in/n)·n, inner]``, ``ustrides`` its elements' uniform strides;
    status 1 when the rotation holds a NaN/Inf."""
    out = torch.empty((outer, -(-n_in // n) * n, inner), dtype=torch.float32)
    rc = lib.lp_rht_nvfp4_f32(_ptr(x), _ptr(out), _ptr(signs), _ptr(u), key, _I64x5(*ustrides), outer, n_in, inner, n,
                              int(sr), _threads())
    if rc < 0:
        raise ValueError(f"lp_rht_nvfp4_f32: unsupported block size {n} or inner {inner}")
    return rc, out


ELEM_KINDS = {"radix4": 0, "fp4_rdn": 1, "int_sr": 2}


def run_elem(lib, kind: str, x: Tensor, u: Tensor | None, key: int, param: int, fmax: float,
             e_tiny: int) -> tuple[int, Tensor]:
    """``(status, out)``: a per-tensor-scaled baseline of :mod:`lowprec.baselines` on fp32 ``x`` (dense)
    into a tensor with its strides (``param``: radix4's levels, fp4_rdn's L, int_sr's qmax). Status 0:
    done; 1: x holds a NaN/Inf; 2: max|x| = 0 (the caller returns zeros)."""
    x, (size, xs, us), _ = _nested(x, 1)
    out = torch.empty_like(x)
    rc = lib.lp_elem_f32(_ptr(x), _ptr(out), _ptr(u), key, size, xs, us, ELEM_KINDS[kind], param, fmax, e_tiny,
                         _threads())
    if rc < 0:
        raise ValueError(f"lp_elem_f32: unknown kind {kind!r}")
    return rc, out


def run_fwht(lib, x: Tensor, signs: Tensor, outer: int, n_in: int, inner: int, n: int, inverse: bool) -> Tensor:
    """The block RHT of :func:`lowprec.hadamard.block_rht` on fp32 ``x`` (contiguous, seen as
    ``[outer, n_in, inner]``, rotated along the middle dim in blocks of ``n``, the tail zero-padded)
    into a new contiguous ``[outer, ceil(n_in/n)·n, inner]`` tensor."""
    out = torch.empty((outer, -(-n_in // n) * n, inner), dtype=torch.float32)
    rc = lib.lp_fwht_f32(_ptr(x), _ptr(out), _ptr(signs), outer, n_in, inner, n, int(inverse), _threads())
    if rc < 0:
        raise ValueError(f"lp_fwht_f32: unsupported block size {n}")
    return out


def run_im2col(lib, x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """The im2col matrix ``[N·Ho·Wo, C·kh·kw]`` of fp32 ``x`` (contiguous ``[N, C, H, W]``) for a 2-d
    convolution (``kernel``, ``stride``, ``padding``, ``dilation``: pairs), as
    ``F.unfold(x, ...).transpose(1, 2).reshape(-1, C·kh·kw)`` in one pass."""
    n, c, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = torch.empty((n * ho * wo, c * kernel[0] * kernel[1]), dtype=torch.float32)
    g = (ctypes.c_int64 * 14)(n, c, h, w, *kernel, *stride, *padding, *dilation, ho, wo)
    lib.lp_im2col_f32(_ptr(x), _ptr(out), g, _threads())
    return out


def run_im2col_fwht(lib, x: Tensor, kernel, stride, padding, dilation, signs: Tensor) -> Tensor:
    """``run_fwht`` along dim 0 of ``run_im2col``'s matrix (the same numbers) in one pass: a
    ``[ceil(T/n)·n, C·kh·kw]`` view of a new contiguous ``[C·kh·kw, ceil(T/n)·n]`` tensor (each block of
    tokens contiguous, as the block formats along tokens read it), n = ``signs.numel()``."""
    n, c, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    t, m = n * ho * wo, signs.numel()
    out = torch.empty((c * kernel[0] * kernel[1], -(-t // m) * m), dtype=torch.float32)
    g = (ctypes.c_int64 * 14)(n, c, h, w, *kernel, *stride, *padding, *dilation, ho, wo)
    if lib.lp_im2col_fwht_f32(_ptr(x), _ptr(out), g, _ptr(signs), m, _threads()) < 0:
        raise ValueError(f"lp_im2col_fwht_f32: unsupported block size {m}")
    return out.t()


def run_transpose(lib, x: Tensor) -> Tensor:
    """``x.t().contiguous()`` of fp32 ``x`` (contiguous ``[R, C]``) in one pass."""
    out = torch.empty((x.shape[1], x.shape[0]), dtype=torch.float32)
    lib.lp_transpose_f32(_ptr(x), _ptr(out), x.shape[0], x.shape[1], _threads())
    return out


def fill_uniforms(lib, key: int, shape) -> Tensor:
    """The C twin's uniforms ``U(key, i)`` for ``i`` in C order of ``shape`` (tests compare them with torch's)."""
    out = torch.empty(shape, dtype=torch.float32)
    lib.lp_uniforms(key, out.numel(), _ptr(out))
    return out
