"""The C twins of the CPU cores (the ``cpu_*.c`` files here): built once per machine with the system C compiler,
loaded with ctypes, called through :mod:`lowprec.kernels.native_calls` by :mod:`lowprec.kernels.cpu` when
available.

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
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path


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
    "lp_im2col_rht_nvfp4_f32": (_INT, [_P, _P, _I64P, _P, _P, _U64, _I64P, _INT, _INT, _INT]),
    "lp_transpose_f32": (_INT, [_P, _P, _I64, _I64, _INT]),
}

_state: dict = {"lib": None, "failed": None, "enabled": None, "rung": None, "path": None}
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
