"""lowprec.allocator: with freed memory kept, a step that frees and reallocates its tensors faults no
pages in again (under glibc's defaults the same cycle faults ~4,000 pages each time); LOWPREC_MALLOC
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
import json, resource, torch
from lowprec import allocator
info = allocator.keep_freed_memory()
def cycle():  # what a training step does to its activations: 8 x 2 MiB allocated, touched, freed
    ts = [torch.empty(512 * 1024).fill_(1.0) for _ in range(8)]
    del ts
for _ in range(3):
    cycle()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(json.dumps({"info": info, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10}))
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
    assert default["faults"] > 1000  # glibc gave the 16 MiB back and faults it in again, page by page
    assert kept["faults"] < 50


def test_bad_mode_is_an_error_naming_it():
    r = _probe("sometimes")
    assert r.returncode != 0 and "LOWPREC_MALLOC='sometimes': expected one of keep, default" in r.stderr
