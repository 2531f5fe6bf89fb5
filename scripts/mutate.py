"""Plant one bug at a time and see whether the tests that should catch it do (mutation testing by list).

    .venv/bin/python scripts/mutate.py                 # every mutation; writes results/mutation.md
    .venv/bin/python scripts/mutate.py --list          # names, areas, files; whether each still applies
    .venv/bin/python scripts/mutate.py --only luq_c_level_index --only ckpt_resume_skipped

The mutations are listed in ``scripts/mutations.yaml``: each names a file, an exact snippet of it
(it must occur exactly once), its replacement, the tests to run (pytest arguments: files, ``-k``),
the area it counts in (estimators, twins, runner) and what the planted bug means.

Nothing in the working tree is touched: the commit under test (``--rev``, default HEAD; uncommitted
changes are not part of it) is cloned into a temporary directory (``git clone --shared``), and each
mutation is written there, its tests run with ``OMP_NUM_THREADS=1 pytest -x -q`` under a time limit,
and the file restored. The copy's own package is imported (``PYTHONPATH``; checked before the first
run), no bytecode is written (a restored file must not run a mutant's stale ``.pyc``), and the C
twins are built into cache directories of the run's own (a mutated C source into an empty one, so
it is rebuilt whatever the cache key hashes; a mutant that does not compile is reported as such,
since the torch cores would otherwise run silently in its place).

Outcomes: ``caught`` (a selected test failed or errored), ``timeout`` (counted as caught: the suite
does not pass), ``SURVIVED`` (every selected test passed), ``stale`` (the snippet is not in the file,
or occurs more than once: refresh the list; never silently skipped), ``no tests`` (the selection
collected nothing), ``does not build`` and ``baseline fails`` (the selection fails without any
mutation: the outcome would mean nothing). The kill rate per area is caught / (caught + survived).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_LIST = HERE / "mutations.yaml"
FIELDS = ("name", "area", "file", "original", "replacement", "tests", "means")
AREAS = ("estimators", "twins", "runner")
NATIVE_CHECK = ("from lowprec.kernels import native\n"
                "native.set_enabled(True)\n"
                "assert native.library() is not None, native.status()\n")
COUNTED = ("caught", "timeout", "SURVIVED")


def load_mutations(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())
    muts = data["mutations"] if isinstance(data, dict) else data
    names = set()
    for i, m in enumerate(muts):
        missing = [f for f in FIELDS if not m.get(f)]
        if missing:
            raise ValueError(f"mutation #{i + 1} ({m.get('name')}) lacks {', '.join(missing)}")
        if m["area"] not in AREAS:
            raise ValueError(f"mutation {m['name']}: area={m['area']!r}, expected one of {AREAS}")
        if m["original"] == m["replacement"]:
            raise ValueError(f"mutation {m['name']}: the replacement equals the original")
        if m["name"] in names:
            raise ValueError(f"mutation name {m['name']!r} appears twice")
        names.add(m["name"])
    return muts


def list_state(path: Path, repo: Path, commit: str) -> str:
    """Where the list came from: as committed in `commit`, or with changes not in it."""
    path = path.resolve()
    try:
        rel = path.relative_to(repo)
    except ValueError:
        return f"`{path}` (outside the repository)"
    same = subprocess.run(["git", "diff", "--quiet", commit, "--", str(rel)], cwd=repo).returncode == 0
    tracked = subprocess.run(["git", "cat-file", "-e", f"{commit}:{rel}"], cwd=repo,
                             capture_output=True).returncode == 0
    return f"`{rel}` " + ("as committed in this commit" if same and tracked else "WITH CHANGES NOT IN THIS COMMIT")


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def applies(m: dict, root: Path) -> tuple[bool, str]:
    """(applies, why not): the snippet occurs exactly once in the file under `root`."""
    path = root / m["file"]
    if not path.is_file():
        return False, f"{m['file']} does not exist"
    n = path.read_text().count(m["original"])
    return (True, "") if n == 1 else (False, f"snippet found {n} times in {m['file']}")


def run_limited(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str, float]:
    """(returncode or None on timeout, output, seconds); the whole process group is killed on timeout."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = None
    return rc, out, time.monotonic() - t0


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0].split(" ", 1)[1].strip()
    return ""


def pytest_cmd(tests: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(tests)]


def outcome_of(rc: int | None) -> str:
    if rc is None:
        return "timeout"
    return {0: "SURVIVED", 5: "no tests"}.get(rc, "caught")


def kill_rates(results: list[dict]) -> dict[str, tuple[int, int]]:
    """{area: (caught, caught + survived)}, with "all" over every area."""
    rates = {}
    for area in (*AREAS, "all"):
        rs = [r for r in results if (area == "all" or r["area"] == area) and r["outcome"] in COUNTED]
        rates[area] = (sum(r["outcome"] != "SURVIVED" for r in rs), len(rs))
    return rates


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "0/0"


def render(results: list[dict], *, command: str, commit: str, subject: str, started: str, seconds: float,
           timeout: float, list_state: str) -> str:
    rates = kill_rates(results)
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "# Mutation record",
        "",
        "Bugs planted one at a time by `scripts/mutate.py` (the list: `scripts/mutations.yaml`), each in a",
        "temporary clone of the commit below, with the listed tests run as",
        f"`OMP_NUM_THREADS=1 pytest -x -q <tests>` (limit {timeout:.0f} s each). `caught`: a test failed;",
        "`SURVIVED`: every selected test passed; `stale`: the snippet no longer occurs exactly once.",
        "",
        f"- command: `{command}`",
        f"- commit: `{commit}` ({subject})",
        f"- list: {list_state}",
        f"- date: {started} UTC, {seconds / 60:.1f} min, {platform.node() or 'this machine'}, "
        f"Python {platform.python_version()}",
        "",
        "## Kill rate",
        "",
        "| area | caught / counted |",
        "|---|---|",
        *[f"| {a} | {pct(*rates[a])} |" for a in (*AREAS, "all")],
        "",
    ]
    other = [r for r in results if r["outcome"] not in COUNTED]
    if other:
        lines += ["Not counted: " + ", ".join(f"{r['name']} ({r['outcome']})" for r in other) + ".", ""]
    lines += ["## Mutations", "",
              "| # | name | area | file | the bug | tests | outcome | caught by | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        what = f"`{r['original'].strip()}` → `{r['replacement'].strip()}`: {r['means']}"
        lines.append(f"| {i} | {r['name']} | {r['area']} | `{r['file']}` | {cell(what)} | `{cell(r['tests'])}` "
                     f"| {r['outcome']}{(': ' + cell(r['detail'])) if r['detail'] else ''} "
                     f"| {cell(r['caught_by'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run this mutation only (repeatable; comma-separated names too)")
    ap.add_argument("--list", action="store_true", help="list the mutations and whether each applies at --rev")
    ap.add_argument("--mutations", type=Path, default=DEFAULT_LIST, help="the list (YAML)")
    ap.add_argument("--repo", type=Path, default=None, help="the git repository (default: this script's)")
    ap.add_argument("--rev", default="HEAD", help="the commit to mutate (default HEAD)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per test run (default 240)")
    ap.add_argument("--record", type=Path, default=None,
                    help="markdown record to write (default: results/mutation.md for a full run, none with --only)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running each selection once without mutation first")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    a = ap.parse_args(argv)

    repo = Path(git("rev-parse", "--show-toplevel", cwd=a.repo or HERE))
    try:
        muts = load_mutations(a.mutations)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        print(f"error: --mutations {a.mutations}: {e}", file=sys.stderr)
        return 2
    only = [n for o in a.only for n in o.split(",") if n]
    unknown = sorted(set(only) - {m["name"] for m in muts})
    if unknown:
        print(f"error: --only {','.join(unknown)}: no such mutation in {a.mutations}", file=sys.stderr)
        return 2
    if only:
        muts = [m for m in muts if m["name"] in only]
    if a.timeout <= 0:
        print(f"error: --timeout {a.timeout}: expected seconds > 0", file=sys.stderr)
        return 2
    commit = git("rev-parse", "--verify", a.rev + "^{commit}", cwd=repo)
    subject = git("log", "-1", "--format=%s", commit, cwd=repo)
    record = a.record if a.record is not None else (None if only or a.list else repo / "results" / "mutation.md")

    tmp = Path(tempfile.mkdtemp(prefix="lowprec-mutate-"))
    try:
        copy = tmp / "repo"
        git("clone", "-q", "--shared", "--no-checkout", str(repo), str(copy), cwd=tmp)
        git("checkout", "-q", "--detach", commit, cwd=copy)
        if a.list:
            for m in muts:
                ok, why = applies(m, copy)
                print(f"{m['name']:32s} {m['area']:10s} {m['file']:36s} {'ok' if ok else 'STALE: ' + why}")
            return 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1",
               "LOWPREC_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
        env.pop("LOWPREC_CPU_NATIVE", None)
        if (copy / "lowprec").is_dir():  # the copy's package, not the editable install's
            where = subprocess.run([sys.executable, "-c", "import lowprec; print(lowprec.__file__)"], cwd=copy,
                                   env=env, capture_output=True, text=True).stdout.strip()
            if not where.startswith(str(copy)):
                print(f"error: the copy imports lowprec from {where!r}, not from {copy}", file=sys.stderr)
                return 1
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        t_start = time.monotonic()
        print(f"mutating {commit[:12]} ({subject[:60]}) in {copy}", flush=True)

        baseline: dict[str, str] = {}
        if not a.no_baseline:
            for tests in dict.fromkeys(m["tests"] for m in muts if applies(m, copy)[0]):
                rc, out, s = run_limited(pytest_cmd(tests), copy, env, a.timeout)
                baseline[tests] = "" if rc == 0 else (f"{outcome_of(rc)} {first_failure(out)}".strip())
                print(f"baseline  {tests}: {'passes' if rc == 0 else baseline[tests]} ({s:.0f} s)", flush=True)
                if rc not in (0, None):
                    print(out[-1500:], flush=True)

        results = []
        for m in muts:
            r = {**m, "outcome": "", "detail": "", "caught_by": "", "seconds": 0.0}
            ok, why = applies(m, copy)
            path = copy / m["file"]
            if not ok:
                r.update(outcome="stale", detail=why)
            elif baseline.get(m["tests"]):
                r.update(outcome="baseline fails", detail=baseline[m["tests"]])
            else:
                text = path.read_text()
                path.write_text(text.replace(m["original"], m["replacement"]))
                menv = env
                try:
                    if m["file"].endswith((".c", ".h")) and (copy / "lowprec").is_dir():
                        # an empty cache of its own: the mutant is built whatever the cache key hashes
                        shutil.rmtree(tmp / "cache-mutant", ignore_errors=True)
                        menv = {**env, "LOWPREC_CACHE_DIR": str(tmp / "cache-mutant")}
                        b = subprocess.run([sys.executable, "-c", NATIVE_CHECK], cwd=copy, env=menv,
                                           capture_output=True, text=True)
                        if b.returncode:
                            r.update(outcome="does not build", detail=(b.stderr.strip().splitlines() or [""])[-1])
                    if not r["outcome"]:
                        rc, out, s = run_limited(pytest_cmd(m["tests"]), copy, menv, a.timeout)
                        r.update(outcome=outcome_of(rc), caught_by=first_failure(out), seconds=s)
                finally:
                    path.write_text(text)
                if git("status", "--porcelain", "--untracked-files=no", cwd=copy):
                    raise RuntimeError(f"the copy is not clean after restoring {m['file']}")
            results.append(r)
            print(f"{r['outcome']:14s} {m['name']:32s} {r['seconds']:5.0f} s  {r['caught_by'] or r['detail']}",
                  flush=True)

        rates = kill_rates(results)
        print("kill rate: " + ", ".join(f"{k} {pct(*v)}" for k, v in rates.items()))
        if record is not None:
            command = "python scripts/mutate.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(render(results, command=command, commit=commit, subject=subject, started=started,
                                     seconds=time.monotonic() - t_start, timeout=a.timeout,
                                     list_state=list_state(a.mutations, repo, commit)))
            print(f"record: {record}")
        return 0
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
