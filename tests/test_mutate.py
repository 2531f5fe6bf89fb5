"""scripts/mutate.py on a throw-away git repository (a one-function package and its test): a planted
bug the test catches is `caught`, one it cannot see `SURVIVED`, a snippet that is gone `stale`; the
record names the commit and the kill rate; the repository's files are never touched (the mutants
live in a temporary clone), and a bad list is one error line with exit 2."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mutate.py"

PKG = "def add(a, b):\n    return a + b\n\n\ndef unused(a):\n    return a * 2\n"
TEST = "from pkg import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
MUTATIONS = """\
mutations:
  - {name: add_minus, area: estimators, file: pkg.py, original: "return a + b", replacement: "return a - b",
     tests: tests/test_pkg.py, means: adds the wrong way}
  - {name: unused_times_3, area: runner, file: pkg.py, original: "return a * 2", replacement: "return a * 3",
     tests: tests/test_pkg.py, means: nothing tests it}
  - {name: gone, area: twins, file: pkg.py, original: "return a / b", replacement: "return b / a",
     tests: tests/test_pkg.py, means: a snippet that is not there}
"""


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin:/usr/local/bin"})


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "pkg.py").write_text(PKG)
    (repo / "tests" / "test_pkg.py").write_text(TEST)
    _git("init", "-q", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("commit", "-q", "-m", "tiny package", cwd=repo)
    return repo


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_caught_survived_and_stale_in_a_clone_and_the_record(tmp_path):
    repo = _repo(tmp_path)
    muts = tmp_path / "m.yaml"
    muts.write_text(MUTATIONS)
    record = tmp_path / "record.md"
    p = _run("--repo", str(repo), "--mutations", str(muts), "--record", str(record), "--timeout", "60",
             cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    md = record.read_text()
    rows = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| ") and "`pkg.py`" in line}
    assert "| caught" in rows["add_minus"] and "test_pkg.py::test_add" in rows["add_minus"]
    assert "| SURVIVED" in rows["unused_times_3"]
    assert "| stale" in rows["gone"] and "found 0 times" in rows["gone"]
    assert "| estimators | 1/1 (100%) |" in md and "| runner | 0/1 (0%) |" in md and "| all | 1/2 (50%) |" in md
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert f"commit: `{head}`" in md and "(outside the repository)" in md
    assert (repo / "pkg.py").read_text() == PKG  # mutated only in the clone
    # --list says which snippets still apply, and writes nothing
    p = _run("--repo", str(repo), "--mutations", str(muts), "--list", cwd=tmp_path)
    assert p.returncode == 0 and "STALE" in p.stdout.splitlines()[2] and "ok" in p.stdout.splitlines()[0]


def test_bad_list_and_unknown_name_are_one_line(tmp_path):
    repo = _repo(tmp_path)
    muts = tmp_path / "m.yaml"
    muts.write_text(MUTATIONS.replace("area: runner", "area: nowhere"))
    p = _run("--repo", str(repo), "--mutations", str(muts), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "area='nowhere'" in p.stderr
    muts.write_text(MUTATIONS)
    p = _run("--repo", str(repo), "--mutations", str(muts), "--only", "nope", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: --only nope") and p.stderr.count("\n") == 1
    assert not (repo / "results").exists()
