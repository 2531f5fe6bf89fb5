"""trainer.dry_run (lowprec/dry_run.py): N steps and one evaluation of an experiment's real model on
synthetic inputs at its real shapes, writing nothing.

Guards: (1) through run preparation (prepare.Session, what run.py calls) a dry run prints the
converted-layer report, parameters, seconds per step and peak memory and leaves no run dir, index or
out_root file; (2) the key's values are checked (one `error:` line, exit 2); (3) each task kind
(classification, char LM, translation, QA, MLM) builds inputs of the stated shapes and a loss near
ln(classes) at initialization; (4) every full-scale experiment (conf/experiment/full/**) dry-runs
one step at its real shapes (batch 1; one model built per architecture and copied per row).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lowprec.config import experiment_from_cfg, register_resolvers

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "conf" / "experiment" / "full"
FULL_ROWS = sorted(str(p.relative_to(FULL).with_suffix("")) for p in FULL.rglob("*.yaml")
                   if not p.name.startswith("_"))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _exp(overrides: list[str], run_dir="/nonexistent/dry-run"):
    cfg, choices = _compose(overrides)
    return experiment_from_cfg(cfg, names=choices, run_dir=run_dir, name=choices.get("experiment"))


def test_dry_run_through_run_preparation_writes_nothing(tmp_path, capsys):
    from lowprec.prepare import Session

    out_root = tmp_path / "out"
    cfg, choices = _compose(["experiment=small/luq_table/luq4", "trainer.dry_run=2", f"out_root={out_root}",
                             "trainer.threads=1"])
    run_dir = out_root / "2026-01-01" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()  # what Hydra writes before the job: removed, nothing else is left
    (run_dir / ".hydra" / "config.yaml").write_text("{}\n")
    loss = Session().run(cfg, names=choices, run_dir=run_dir, name=choices["experiment"])
    out = capsys.readouterr().out
    assert math.isfinite(loss)
    for field in ("lowprec.convert: fwd=", "converted", "parameters", "s per step at batch 2", "peak memory",
                  "step 1/2", "step 2/2", "evaluation (synthetic batch): top1", "nothing written"):
        assert field in out, (field, out)
    assert "automatic: min(trainer.batch_size=" in out
    assert not list(out_root.rglob("*")), list(out_root.rglob("*"))  # no run dir, no index, no date dir


def test_run_py_dry_run_leaves_no_run_dir(tmp_path):
    """The command line: exit 0, the report, and no run dir (Hydra's) or index left behind."""
    out_root = tmp_path / "out"
    r = subprocess.run([sys.executable, "run.py", "experiment=small/luq_table/luq4", "trainer.dry_run=1",
                        "trainer.dry_run_batch=3", "trainer.threads=1", f"out_root={out_root}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch 3 (trainer.dry_run_batch=3)" in r.stdout and "peak memory" in r.stdout
    assert not [p for p in out_root.rglob("*")], list(out_root.rglob("*"))


@pytest.mark.parametrize("key,value", [("trainer.dry_run", "-1"), ("trainer.dry_run", "abc"),
                                       ("trainer.dry_run", "true"), ("trainer.dry_run", "1.5"),
                                       ("trainer.dry_run_batch", "-2")])
def test_bad_values_are_one_error_line(key, value, tmp_path, capsys):
    from lowprec.prepare import Session

    cfg, choices = _compose([f"{key}={value}", f"out_root={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as e:
        Session().main(cfg, names=choices, run_dir=tmp_path / "out" / "run")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}="), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))


def test_defaults_off():
    exp = _exp([])
    assert exp.trainer.dry_run == 0 and exp.trainer.dry_run_batch == 0
    assert "dry_run" not in exp.identity["trainer"]  # not part of what is trained


SMALL_BERT = "model.config={hidden_size:64,num_hidden_layers:1,num_attention_heads:2,intermediate_size:128}"
SMALL_MARIAN = ("model.config={d_model:32,encoder_layers:1,decoder_layers:1,encoder_ffn_dim:64,decoder_ffn_dim:64,"
                "encoder_attention_heads:2,decoder_attention_heads:2,share_encoder_decoder_embeddings:true,"
                "max_position_embeddings:64,scale_embedding:true}")


@pytest.mark.parametrize("overrides,task,shape,classes", [
    (["data=digits", "model=resnet20", "data.image_size=24"], "classification", "images [2, 1, 24, 24]", 10),
    (["experiment=small/lm_table/luq4"], "lm", "character ids [2, 64]", 84),
    (["experiment=full/luq_table/transformer_wmt_en_de_luq4", SMALL_MARIAN, "data.max_length=24",
      "data.max_target_length=20", "data.vocab_size=300"], "translation", "[2, 20] over a vocabulary of 300", 300),
    (["experiment=full/mvue_table/bert_squad_mvue24", SMALL_BERT, "data.max_length=40", "data.doc_stride=8"],
     "qa", "[2, 40] over a vocabulary of 30522", 40),
    (["experiment=full/mvue_table/bert_mlm_wikipedia_mvue24", SMALL_BERT, "data.max_length=32",
      "data.vocab_size=500"], "mlm", "[2, 32] over a vocabulary of 500", 500),
])
def test_each_task_kind(overrides, task, shape, classes):
    """Inputs of the stated shapes, the task's evaluation, and a first loss near ln(classes) (a
    randomly initialized model on uniform targets; QA: ln(sequence length), start/end over positions)."""
    from lowprec.dry_run import dry_run

    lines = []
    exp = _exp([*overrides, "trainer.dry_run=2", "trainer.threads=1", "trainer.device=cpu"])
    r = dry_run(exp, out=lines.append)
    assert r["task"] == task and shape in r["inputs"], r["inputs"]
    assert r["finite"] and len(r["step_seconds"]) == 2 and r["batch"] == 2
    assert 0.5 * math.log(classes) < r["losses"][0] < 2.0 * math.log(classes), r["losses"]
    assert r["converted"] > 0 and r["params"] > 0 and r["peak_memory_bytes"] > 0
    want = {"classification": "top1", "lm": "top1", "translation": "bleu_synthetic", "qa": "f1_synthetic",
            "mlm": "masked_tokens"}[task]
    assert want in r["eval"], r["eval"]
    if task == "qa":  # the checkpoint is not here: its architecture (bert) from the path's name
        assert "default 'bert' config" in r["model_note"]


def test_fnt_row_takes_its_last_step_in_fnt():
    from lowprec.dry_run import dry_run

    exp = _exp(["experiment=small/luq_table/luq4", "trainer.fnt_epochs=1", "trainer.dry_run=2",
                "trainer.threads=1"])
    lines = []
    r = dry_run(exp, out=lines.append)
    assert r["fnt_step"] and any("step 2/2 (fnt)" in ln for ln in lines), lines


# ----------------------------------------------------------------------------- every full row
# One step and the evaluation at batch 1 at the real shapes. Measured on the shared 2-core machine
# (1 thread): this test 84 s for the 53 rows at load ~2-3 (the slowest: Transformer-base with its
# decoding 7 s, BERT SQuAD at 384 tokens 4-6 s, ViT-B and BERT MLM ~4 s, ResNet-50 1-4 s), about 4.5 min
# at load 7-12; the whole file 91 s at load ~2-3. One
# model is built per architecture (BERT/Marian init ~5 s) and copied for each of its rows, and
# evaluated for its first row only (the evaluation is the training forward under no_grad: Transformer
# decoding and BERT at 384 tokens cost about a step each). A row
# whose composed config equals an earlier row's apart from the FNT length (which a one-step dry run
# never reaches: the fp32 rows shared by several tables, the FNT rows) is that row's dry run: it is
# skipped naming the row, so that the whole stays within a few minutes.

_MODELS: dict = {}
_SEEN: dict = {}
_EVALUATED: set = set()


def _same_step(exp) -> str:
    import json

    c = copy.deepcopy(exp.config)
    for k in ("fnt_epochs", "fnt_steps"):
        c["trainer"].pop(k, None)
    return json.dumps(c, sort_keys=True, default=str)


@pytest.mark.slow
@pytest.mark.parametrize("row", FULL_ROWS)
def test_every_full_row_dry_runs_one_step(row):
    import json

    from lowprec.dry_run import build_dry_model, dry_run

    exp = _exp([f"experiment=full/{row}", "trainer.dry_run=1", "trainer.dry_run_batch=1", "trainer.threads=1",
                "trainer.device=cpu"])
    same = _SEEN.setdefault(_same_step(exp), row)
    if same != row:
        pytest.skip(f"the same one-step dry run as full/{same} (equal configs but for the FNT length)")
    key = json.dumps([exp.identity["model"], exp.identity["data"]], sort_keys=True, default=str)
    if key not in _MODELS:
        _MODELS.clear()  # rows are sorted, so an architecture's rows mostly come together
        _MODELS[key] = build_dry_model(exp)[0]
    first = key not in _EVALUATED  # evaluated once per architecture: the same forward, no_grad
    _EVALUATED.add(key)
    r = dry_run(exp, model=copy.deepcopy(_MODELS[key]), out=lambda s: None, evaluate=first)
    assert r["finite"] and r["converted"] > 0 and r["params"] > 1_000_000, r
    assert ("skipped" in r["eval"]) != first, r["eval"]
    assert r["batch"] == 1
    if "imagenet" in row:
        assert "[1, 3, 224, 224]" in r["inputs"] and "1000 classes" in r["inputs"]
