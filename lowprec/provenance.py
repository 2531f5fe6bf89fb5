"""Where a result came from: the git commit of the code, the machine, and the launch log of a table's runs.

`git_commit` is the HEAD commit, with `-dirty` when lowprec/, conf/ or run.py (what a run executes)
differ from it. The launch log is `<out_root>/commands.jsonl`, one JSON object per launch
(table, scale, seeds, command, commit, started, env), appended by scripts/reproduce.py and read
by scripts/make_tables.py.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_LOG = "commands.jsonl"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for the machine line of a benchmark."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str | Path = REPO) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lowprec", "conf", "run.py"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_launch(out_root: str | Path, record: dict) -> None:
    """Append one launch record to <out_root>/commands.jsonl."""
    log = Path(out_root) / LAUNCH_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")


def launches(out_root: str | Path, table: str, scale: str) -> list[dict]:
    """The launch records of one table, oldest first; [] when there is no log."""
    p = Path(out_root) / LAUNCH_LOG
    if not p.exists():
        return []
    return [c for c in map(json.loads, p.read_text().splitlines())
            if c.get("table") == table and c.get("scale") == scale]
