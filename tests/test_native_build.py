"""How the C twins are built and trusted (lowprec.kernels.native): the ctypes prototypes equal the C
ones; the build ladder falls back from -march=native and caches each rung (successes and failures);
the cache is private and a cache or library not owned by the user, writable by others, a symbolic
link or missing a function is refused with one warning (the torch cores then give the same
numbers); backend_info says which backend runs the estimators."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import subprocess
import warnings

import pytest
import torch

from lowprec.kernels import cpu, native
from lowprec.luq import luq as luq_ref
from stat_utils import heavy_tailed

CC = native._compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

C_TYPES = {"float*": ctypes.c_void_p, "const float*": ctypes.c_void_p, "uint32_t*": ctypes.c_void_p,
           "const int64_t*": ctypes.POINTER(ctypes.c_int64),
           "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "int": ctypes.c_int, "float": ctypes.c_float}


def c_prototypes() -> dict:
    """Every exported (non-static) function of the C sources: name -> (return type, [parameter types])."""
    protos = {}
    for path in native.SOURCES:
        text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
        for ret, name, params in re.findall(r"^(void|int|float)\s+(\w+)\s*\(([^)]*)\)\s*\{", text, flags=re.M):
            types = [re.sub(r"\s*\*\s*", "* ", re.sub(r"\s+\w+$", "", p.strip())).strip() for p in params.split(",")]
            assert name not in protos, f"{name} defined twice"
            protos[name] = (ret, types)
    return protos


def test_ctypes_signatures_match_the_c_prototypes():
    """A parameter added, dropped, reordered or re-typed on one side only (say int for int64_t, which
    ctypes would pass as garbage in the high bits) fails here, not in a run."""
    protos = c_prototypes()
    assert set(protos) == set(native.SIGNATURES), set(protos) ^ set(native.SIGNATURES)
    for name, (ret, params) in protos.items():
        restype, argtypes = native.SIGNATURES[name]
        assert restype == {"void": None, "int": ctypes.c_int, "float": ctypes.c_float}[ret], name
        assert len(params) == len(argtypes), (name, params)
        for i, (p, a) in enumerate(zip(params, argtypes)):
            assert C_TYPES[p] == a, f"{name} parameter {i}: C {p!r}, ctypes {a}"


def test_sources_split_by_family_and_installed():
    names = {p.name for p in native.SOURCES}
    assert {"cpu_common.c", "cpu_luq.c", "cpu_nm.c", "cpu_fp4.c", "cpu_baselines.c", "cpu_hadamard.c"} <= names
    assert [p.name for p in native.HEADERS] == ["cpu_common.h", "cpu_fwht.h", "cpu_nm_block.h"]
    text = (native.HERE.parents[1] / "pyproject.toml").read_text()
    assert '"*.c"' in text and '"*.h"' in text  # package data: the sources install with the package


def _fake_cc(tmp_path, refuse: tuple[str, ...], prebuilt):
    """A "compiler" that rejects the flags in ``refuse`` and otherwise copies ``prebuilt`` to its -o
    target (a real portable build takes minutes on a busy machine; the ladder logic is what is tested)."""
    script = tmp_path / "fakecc"
    cases = "|".join(refuse) or "__never__"
    script.write_text(f"""#!/bin/sh
[ "$1" = --version ] && {{ echo fakecc 1.0; exit 0; }}
out=""
prev=""
for a in "$@"; do
  case "$a" in {cases}) echo "error: unsupported option '$a'" >&2; exit 1;; esac
  [ "$prev" = -o ] && out="$a"
  prev="$a"
done
cp {prebuilt} "$out"
""")
    script.chmod(0o755)
    return str(script)


def _built():
    """The library this process loads (built or cached in the user's cache)."""
    native.set_enabled(None)
    assert native.library() is not None
    return native.cache_dir() / native._state["path"]


def _seeded(root):
    """A private cache under ``root`` holding a copy of the library this process built (a real build
    takes tens of seconds on a busy machine; what these tests check is the trust, not the compiler)."""
    built = _built()
    d = root / "native"
    d.mkdir(parents=True, mode=0o700)
    shutil.copy2(built, d / built.name)
    os.chmod(d / built.name, 0o700)
    return root


def _fresh(monkeypatch, cache, cc=None):
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    if cc is not None:
        monkeypatch.setenv("CC", cc)
    native.set_enabled(None)


@needs_cc
def test_build_ladder_falls_back_from_march_native_and_caches_each_rung(monkeypatch, tmp_path):
    """An Apple-clang-like compiler that rejects -march=native and -mcpu=native: the library comes from
    the -mtune=native rung, the failed rungs leave notes that a second process does not retry."""
    native.set_enabled(None)
    assert native.library() is not None
    prebuilt = native.cache_dir() / native._state["path"]
    try:
        cc = _fake_cc(tmp_path, ("-march=native", "-mcpu=native"), prebuilt)
        _fresh(monkeypatch, tmp_path / "c1", cc)
        assert native.library() is not None
        info = native.build_info()
        assert info["cores"] == "c" and info["rung"] == "mtune-native" and "-march" not in info["flags"], info
        d = tmp_path / "c1" / "native"
        assert len(list(d.glob("*.fail"))) == 4 and len(list(d.glob("*.so"))) == 1
        # the notes are read, not rebuilt: a compiler that now accepts everything still gets the cached rung
        native.set_enabled(None)
        assert native.library() is not None and native.build_info()["rung"] == "mtune-native"
        cc = _fake_cc(tmp_path, ("-march=native", "-mcpu=native", "-mtune=native", "-fopenmp"), prebuilt)
        _fresh(monkeypatch, tmp_path / "c2", cc)
        assert native.library() is not None
        assert native.build_info() == {"cores": "c", "rung": "portable", "flags": "",
                                       "library": native._state["path"]}
        cc = _fake_cc(tmp_path, ("-O3",), prebuilt)  # nothing compiles: one warning, the torch cores
        _fresh(monkeypatch, tmp_path / "c3", cc)
        with pytest.warns(RuntimeWarning, match="every rung"):
            assert native.library() is None
        assert native.build_info()["cores"] == "torch"
    finally:
        monkeypatch.undo()
        native.set_enabled(None)


def _one_warning_then_torch(match: str):
    """library() refuses with exactly one warning; the twins then equal the torch cores' numbers."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert native.library() is None
        assert native.library() is None  # the refusal is remembered: still one warning
        x = heavy_tailed((16, 8), seed=2)
        y = cpu.luq(x, generator=torch.Generator().manual_seed(0))
    msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
    assert len(msgs) == 1 and re.search(match, msgs[0]), msgs
    assert native.build_info()["cores"] == "torch"
    u = cpu.uniforms(cpu.draw_seed(torch.Generator().manual_seed(0)), x.shape)
    assert torch.equal(y, luq_ref(x, noise=u))


@needs_cc
def test_cache_is_created_private(monkeypatch, tmp_path):
    try:
        _fresh(monkeypatch, tmp_path / "new", _fake_cc(tmp_path, (), _built()))
        assert native.library() is not None
        d = tmp_path / "new" / "native"
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for so in d.glob("*.so"):
            assert not so.stat().st_mode & 0o077
        # an existing cache of ours that is merely readable by others (an older version's) is tightened
        os.chmod(d, 0o755)
        native.set_enabled(None)
        assert native.library() is not None and stat.S_IMODE(d.stat().st_mode) == 0o700
    finally:
        monkeypatch.undo()
        native.set_enabled(None)


@needs_cc
@pytest.mark.parametrize("attack", ["dir writable by others", "dir owned by another user", "dir is a symlink",
                                    "library writable by others", "library owned by another user",
                                    "library is a symlink"])
def test_untrusted_cache_or_library_is_refused(monkeypatch, tmp_path, attack):
    """A planted library runs its constructor at dlopen: never load one that someone else could have
    written. Each case: one warning, the torch cores, the same numbers."""
    native.set_enabled(None)
    assert native.library() is not None
    good = native.cache_dir() / native._state["path"]
    try:
        _fresh(monkeypatch, _seeded(tmp_path / "c"))
        assert native.library() is not None  # the copy of the real library, trusted
        d = tmp_path / "c" / "native"
        so = next(d.glob("*.so"))
        uid = os.getuid()
        if attack == "dir writable by others":
            os.chmod(d, 0o777)
        elif attack == "library writable by others":
            os.chmod(so, 0o766)
        elif attack == "library is a symlink":
            so.unlink()
            so.symlink_to(good)
        elif attack == "dir is a symlink":
            real = tmp_path / "elsewhere"
            shutil.move(str(d), str(real))
            d.symlink_to(real, target_is_directory=True)
        else:  # another owner: pretend to be someone else rather than chown (needs root)
            monkeypatch.setattr(native.os, "getuid", lambda: uid + 4242)
            if attack == "library owned by another user":  # the directory check must pass: it is ours
                real_lstat = os.lstat
                monkeypatch.setattr(native.os, "lstat", lambda p, *a, **k: _as_owner(real_lstat(p, *a, **k), uid + 4242)
                                    if os.fspath(p) == os.fspath(d) else real_lstat(p, *a, **k))
        native.set_enabled(None)
        _one_warning_then_torch("refusing the C (cache|library)")
    finally:
        monkeypatch.undo()
        native.set_enabled(None)


def _as_owner(st, uid):
    return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid, st.st_gid, st.st_size,
                           st.st_atime, st.st_mtime, st.st_ctime))


@needs_cc
def test_library_missing_a_function_falls_back(monkeypatch, tmp_path):
    """A stale or foreign library at the expected name (private, ours) that lacks a function: one
    warning naming it, the torch cores; no AttributeError in the middle of a backward."""
    try:
        _fresh(monkeypatch, tmp_path / "c")
        d = tmp_path / "c" / "native"
        d.mkdir(parents=True, mode=0o700)
        stub = tmp_path / "stub.c"
        stub.write_text("#include <stdint.h>\nvoid lp_uniforms(uint64_t k, int64_t n, float* o) { (void)k; (void)n; "
                        "(void)o; }\n")
        target = next(native.candidates(CC))[2]
        r = subprocess.run([CC, "-shared", "-fPIC", "-o", str(target), str(stub)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        os.chmod(target, 0o700)
        _one_warning_then_torch("lacks lp_")
    finally:
        monkeypatch.undo()
        native.set_enabled(None)


def test_backend_info_names_the_backend(monkeypatch):
    """What a run records: the C twins (with their rung), the torch cores (and why), the references,
    or the Triton kernels."""
    try:
        native.set_enabled(False)
        assert cpu.backend_info() == {"estimators": "torch", "why": f"{native.ENV}=0"}
        native.set_enabled(None)
        info = cpu.backend_info()
        if native.library() is not None:
            assert info["estimators"] == "c" and info["rung"] in dict(native.RUNGS) and info["library"]
        else:
            assert info["estimators"] == "torch" and info["why"]
        monkeypatch.setenv("LOWPREC_BACKEND", "reference")
        assert cpu.backend_info()["estimators"] == "reference"
        monkeypatch.setenv("LOWPREC_BACKEND", "auto")
        triton = cpu.backend_info("cuda")["estimators"]
        assert triton == ("triton" if __import__("lowprec.kernels").kernels.triton_available() else "reference")
    finally:
        native.set_enabled(None)


@needs_cc
def test_reloading_does_not_leak_descriptors():
    """set_enabled(None) forgets the library and the next call loads it again (tests do this hundreds
    of times): the same file must not cost a new open descriptor each time."""
    native.set_enabled(None)
    assert native.library() is not None
    before = len(native._FDS)
    for _ in range(20):
        native.set_enabled(None)
        assert native.library() is not None
    assert len(native._FDS) == before
