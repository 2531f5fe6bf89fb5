"""Many run.py command lines from one warm interpreter (a test helper, not a test).

Every `python run.py ...` spends ~4 CPU-seconds starting Python and importing torch, Hydra and
lowprec before it reads its first override; the input-error tests check a few dozen command
lines that each stop within a second after that. This driver imports run.py once, then forks one
child per case: the child takes the case's environment and working directory, sends its stdout and
stderr to files, and calls run.py's `cli` as `python run.py <argv>` does (the same preflight, the
same Hydra job, the same exit status), then exits without returning to the driver.

    python tests/forkrun.py < cases.json > results.json
    cases:   [{"argv": [...], "env": {...}, "cwd": "..."}, ...]
    results: [{"rc": int, "out": str, "err": str}, ...]   (rc < 0: killed by that signal)

From a test: `run_many(cases)` -> [(rc, stdout, stderr)]; or `Case`s (a command line not yet
run) and `finish`, which runs them together beside real processes. POSIX only (os.fork).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)  # sys.exit("message"): what the interpreter would print
    return 1


def _child(cli, case: dict, out: Path, err: Path) -> None:
    code = 1
    try:
        try:
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.environ.clear()
            os.environ.update(case["env"])
            os.chdir(case["cwd"])
            sys.argv = [str(ROOT / "run.py"), *case["argv"]]
            cli(case["argv"])
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, exit 1
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:  # never back into the driver's loop
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_many(cases: list[dict], timeout: float = 600) -> list[tuple[int, str, str]]:
    """(rc, stdout, stderr) of every case, each as `python run.py <argv>` in its cwd and env."""
    p = subprocess.run([sys.executable, __file__], input=json.dumps(cases), capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"tests/forkrun.py failed:\n{p.stderr[-3000:]}")
    return [(r["rc"], r["out"], r["err"]) for r in json.loads(p.stdout)]


@dataclass(frozen=True)
class Case:
    """`python run.py out_root=<out_root> <args>` in <out_root>, with `env` added to the test's
    environment; run (with every other Case of the same `finish`) when `finish` is called."""
    out_root: Path
    args: tuple[str, ...]
    env: dict = field(default_factory=dict)


def finish(items: list, env_of: Callable[..., dict], timeout: float = 300) -> list[tuple[int, str, str]]:
    """(rc, stdout, stderr) per item: the Cases forked together from one warm interpreter (their
    environment `env_of(**case.env)`), then each subprocess.Popen (already running) waited for."""
    cases = [c for c in items if isinstance(c, Case)]
    for c in cases:
        c.out_root.mkdir(parents=True, exist_ok=True)
    got = iter(run_many([{"argv": [f"out_root={c.out_root}", *c.args], "env": env_of(**c.env),
                          "cwd": str(c.out_root)} for c in cases], timeout) if cases else [])
    return [next(got) if isinstance(p, Case) else _wait(p, timeout) for p in items]


def _wait(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)  # before returncode: it is set by the wait
    return p.returncode, out, err


def main() -> int:
    cases = json.load(sys.stdin)
    spec = importlib.util.spec_from_file_location("run_cli", ROOT / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    import lowprec.prepare  # noqa: F401 - what `cli` imports first: warm it once, before forking

    sys.stdout.flush()
    # mkdtemp, not TemporaryDirectory: a child runs the exit handlers it inherits (as the real
    # process runs those its imports registered), and a TemporaryDirectory's would delete this.
    tmp = Path(tempfile.mkdtemp(prefix="forkrun"))
    try:
        files = [(tmp / f"{i}.out", tmp / f"{i}.err") for i in range(len(cases))]
        pids = []
        for case, (out, err) in zip(cases, files):
            pid = os.fork()
            if pid == 0:
                _child(run.cli, case, out, err)
            pids.append(pid)
        rcs = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        results = [{"rc": rc, "out": out.read_text() if out.exists() else "",
                    "err": err.read_text() if err.exists() else ""} for rc, (out, err) in zip(rcs, files)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
