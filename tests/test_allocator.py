"""lowprec.allocator: with freed memory kept, a step that frees and reallocates its tensors faults no
pages in again (under glibc's defaults a step's large blocks start on fresh mmap'd pages and, as the
heap's layout allows, go back to the OS at the end of the step, to be faulted in again); LOWPREC_MALLOC
chooses, a bad value is an error naming it (the summary's record of the setting: test_reliability_resume).
Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import ctypes, json, mmap, resource, torch
from lowprec import allocator
info = allocator.keep_freed_memory()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycles = []
for c in range(13):  # what a training step does to its activations: 8 x 8 MiB allocated, touched, freed
    mapped, f0 = libc.mallinfo2().hblkhd, minflt()
    ts = [torch.empty(2 << 20).fill_(1.0) for _ in range(8)]
    mapped = libc.mallinfo2().hblkhd - mapped
    del ts
    cycles.append({"mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks, "faults": minflt() - f0})
control = mmap.mmap(-1, 4 << 20)  # 1,024 fresh pages: does this kernel count minor faults at all?
f0 = minflt()
for i in range(0, 4 << 20, 4096):
    control[i] = 1
print(json.dumps({"info": info, "cycles": cycles, "counted": minflt() - f0}))
"""


def _probe(mode: str | None):
    env = {k: v for k, v in os.environ.items() if k != "LOWPREC_MALLOC"}
    if mode is not None:
        env["LOWPREC_MALLOC"] = mode
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: elsewhere keep_freed_memory is a no-op")
def test_kept_memory_is_not_faulted_in_again():
    kept, default = (json.loads(_probe(m).stdout) for m in (None, "default"))
    assert kept["info"] == {"malloc": "keep", "mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}
    assert default["info"] == {"malloc": "default", "why": "LOWPREC_MALLOC=default"}
    # glibc's defaults serve the first step's 8 MiB blocks from fresh mmap'd pages (its threshold starts at
    # 128 KiB); where it goes from there depends on the heap's layout. Kept: every block comes from the heap
    # and its 64 MiB stays there, free, for the next step.
    assert default["cycles"][0]["mapped"] >= 64 << 20
    assert all(c["mapped"] == 0 and c["free_in_heap"] >= 64 << 20 for c in kept["cycles"])
    if kept["counted"] < 1000:
        pytest.skip("this kernel does not count minor page faults (the heap's record above held)")
    assert default["cycles"][0]["faults"] > 10_000  # fresh pages, each faulted in on first touch
    assert max(c["faults"] for c in kept["cycles"][3:]) < 50


def test_bad_mode_is_an_error_naming_it():
    r = _probe("sometimes")
    assert r.returncode != 0 and "LOWPREC_MALLOC='sometimes': expected one of keep, default" in r.stderr
