"""scripts/archive_runs.py: a table's run index saved as text and loaded back, nothing lost."""

import json
from pathlib import Path

from lowprec import runs
from script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
A = load_script("archive_runs")


def _summary(run_dir: str, seed: int, loss: float) -> dict:
    return {"run_dir": run_dir, "baseline_run": run_dir, "model": "chargpt", "data": "shakespeare_char",
            "fwd": "fp32", "grad": "luq4", "epochs": 0, "fnt_epochs": 0, "seed": seed, "batch_size": 16,
            "is_baseline": False, "key": f"k{seed}", "final_top1": 50.0, "best_top1": 51.0,
            "baseline_top1": 52.0, "degradation": 0.01, "wall_time": 3.5, "metric": "val_loss",
            "val_loss": loss, "identity": {"trainer": {"seed": seed}}}


def test_save_then_load_round_trips_and_names_no_machine(tmp_path):
    src, dst = tmp_path / "a" / "small_x", tmp_path / "b" / "small_x"
    inside = str(ROOT / "outputs" / "small_x" / "run0")  # under the repository: stored relative
    outside = str(tmp_path / "elsewhere" / "run1")  # not under it: kept as is
    runs.insert(src / "runs.sqlite", _summary(inside, 0, 1.5))
    runs.insert(src / "runs.sqlite", _summary(outside, 1, 1.25))
    (src / "commands.jsonl").write_text('{"command": "python run.py -m x"}\n')
    curve = '{"step": 50, "val_loss": 2.5}\n{"step": 100, "val_loss": 2.25}\n'
    Path(outside).mkdir(parents=True)
    (Path(outside) / "metrics.jsonl").write_text(curve)
    arch = tmp_path / "arch" / "small_x.jsonl"
    assert A.main(["save", str(src), "--archive", str(arch)]) == 0
    gz = sorted((tmp_path / "arch" / "small_x").glob("*.metrics.jsonl.gz"))
    assert len(gz) == 1
    first = gz[0].read_bytes()
    assert A.main(["save", str(src), "--archive", str(arch)]) == 0 and gz[0].read_bytes() == first
    (Path(outside) / "metrics.jsonl").unlink()  # another machine: no run directory
    text = arch.read_text()
    assert str(ROOT) not in text and '"run_dir": "outputs/small_x/run0"' in text
    assert A.main(["load", str(dst), "--archive", str(arch)]) == 0
    assert A.main(["load", str(dst), "--archive", str(arch)]) == 0  # nothing twice
    a = {r["run_dir"]: r for r in runs.rows(src / "runs.sqlite")}
    b = {r["run_dir"]: r for r in runs.rows(dst / "runs.sqlite")}
    assert a.keys() == b.keys() == {inside, outside}
    for k in a:
        assert {c: v for c, v in a[k].items() if c not in ("id", "finished_at")} == {
            c: v for c, v in b[k].items() if c not in ("id", "finished_at")}
    assert (dst / "commands.jsonl").read_text().count("python run.py") == 1
    assert (Path(outside) / "metrics.jsonl").read_text() == curve  # the curve is back


def test_save_keeps_archived_runs_the_index_no_longer_has(tmp_path):
    arch = tmp_path / "small_x.jsonl"
    one, two = tmp_path / "one", tmp_path / "two"
    runs.insert(one / "runs.sqlite", _summary(str(tmp_path / "r0"), 0, 1.5))
    runs.insert(two / "runs.sqlite", _summary(str(tmp_path / "r1"), 1, 1.4))
    assert A.main(["save", str(one), "--archive", str(arch)]) == 0
    assert A.main(["save", str(two), "--archive", str(arch)]) == 0
    got = [json.loads(ln)["val_loss"] for ln in arch.read_text().splitlines()]
    assert got == [1.5, 1.4]


def test_missing_index_or_archive_is_one_error(tmp_path, capsys):
    assert A.main(["save", str(tmp_path / "none"), "--archive", str(tmp_path / "x.jsonl")]) == 2
    assert A.main(["load", str(tmp_path / "none"), "--archive", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert not (tmp_path / "none").exists()


def test_root_names_the_checkout_the_paths_are_relative_to(tmp_path):
    """Runs made in another checkout (a git worktree) are stored relative to it, loaded back under it."""
    wt = tmp_path / "worktree"
    run = wt / "outputs" / "small_x" / "run0"
    runs.insert(wt / "outputs" / "small_x" / "runs.sqlite", _summary(str(run), 0, 1.5))
    arch = tmp_path / "small_x.jsonl"
    assert A.main(["save", str(wt / "outputs" / "small_x"), "--archive", str(arch), "--root", str(wt)]) == 0
    assert json.loads(arch.read_text())["run_dir"] == "outputs/small_x/run0"
    other = tmp_path / "other"
    assert A.main(["load", str(other / "outputs" / "small_x"), "--archive", str(arch), "--root", str(other)]) == 0
    assert [r["run_dir"] for r in runs.rows(other / "outputs" / "small_x" / "runs.sqlite")] == [
        str(other / "outputs" / "small_x" / "run0")]


def test_a_run_made_through_a_link_into_the_root_is_stored_relative(tmp_path):
    """A second worktree whose outputs/ links to the first's writes run directories under its own
    path: saved with --root of the first, they are stored relative to it like the others."""
    wt, wt2 = tmp_path / "worktree", tmp_path / "worktree2"
    (wt / "outputs" / "small_x" / "run1").mkdir(parents=True)
    wt2.mkdir()
    (wt2 / "outputs").symlink_to(wt / "outputs")
    index = wt / "outputs" / "small_x" / "runs.sqlite"
    runs.insert(index, _summary(str(wt / "outputs" / "small_x" / "run0"), 0, 1.5))
    runs.insert(index, _summary(str(wt2 / "outputs" / "small_x" / "run1"), 1, 1.4))
    arch = tmp_path / "small_x.jsonl"
    assert A.main(["save", str(wt / "outputs" / "small_x"), "--archive", str(arch), "--root", str(wt)]) == 0
    assert [json.loads(ln)["run_dir"] for ln in arch.read_text().splitlines()] == [
        "outputs/small_x/run0", "outputs/small_x/run1"]
