"""Translation, question answering and masked-LM through the trainer (lowprec.task_loop).

Guards: (1) each task trains end to end through run preparation (what run.py calls) on tiny local
files in the real formats (WMT-style parallel text and JSON lines, SQuAD v1.1 JSON, a text shard),
and summary.json and the index row carry its metric (BLEU, F1 with EM, MLM validation loss), its
direction and the degradation against the fp32 baseline trained first; (2) the evaluation's BLEU
and EM/F1 are the hand-computed values for a model that outputs the reference exactly; (3) MLM
training masks depend on (seed, step) only, so a resumed run draws the same ones, and validation
masks are fixed; (4) a model of the wrong arch for the task is one error line.
"""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

from test_dry_run import ROOT, SMALL_BERT, SMALL_MARIAN, _compose, _exp

EN = ["the cat sits on the mat", "a dog runs in the park", "the house is big", "i like green tea",
      "she reads a book", "we walk to school", "the sun is warm", "he drinks cold water"]
DE = ["die katze sitzt auf der matte", "ein hund rennt im park", "das haus ist gross", "ich mag gruenen tee",
      "sie liest ein buch", "wir gehen zur schule", "die sonne ist warm", "er trinkt kaltes wasser"]
CTX = ("Tokyo is the capital of Japan. It has about fourteen million people. "
       "The city hosted the Olympic Games in 1964 and in 2021.")
QS = [("What is the capital of Japan?", "Tokyo"), ("How many people live in Tokyo?", "about fourteen million"),
      ("When did Tokyo first host the Olympic Games?", "1964"), ("Which country is Tokyo the capital of?", "Japan")]


def _squad(items, tag):
    return {"version": "1.1", "data": [{"title": "Tokyo", "paragraphs": [{"context": CTX, "qas": [
        {"id": f"{tag}{i}", "question": q, "answers": [{"text": a, "answer_start": CTX.index(a)}]}
        for i, (q, a) in enumerate(items)]}]}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("taskdata")
    t = root / "wmt"
    t.mkdir()
    (t / "train.en").write_text("\n".join(EN) + "\n")
    (t / "train.de").write_text("\n".join(DE) + "\n")
    (t / "validation.jsonl").write_text("".join(json.dumps({"translation": {"en": e, "de": d}}) + "\n"
                                                for e, d in zip(EN[:3], DE[:3])))
    s = root / "squad"
    s.mkdir()
    (s / "train-v1.1.json").write_text(json.dumps(_squad(QS, "t")))
    (s / "dev-v1.1.json").write_text(json.dumps(_squad(QS[:3], "d")))
    m = root / "mlm"
    m.mkdir()
    (m / "shard0.txt").write_text("\n".join(EN + DE) * 2 + "\n")
    (m / "validation.txt").write_text("\n".join(EN[:6]) + "\n")
    return root


QA_MODEL = SMALL_BERT[:-1] + ",max_position_embeddings:64,vocab_size:200}"
ROWS = {
    "translation": (["experiment=full/luq_table/transformer_wmt_en_de_luq4", SMALL_MARIAN, "data.vocab_size=300",
                     "data.max_length=32", "data.max_target_length=32", "data.beam=2"], "wmt", "bleu"),
    "qa": (["experiment=full/mvue_table/bert_squad_mvue24", QA_MODEL, "model.path=null", "model.weights=false",
            "data.tokenizer=null", "data.vocab_size=200", "data.max_length=40", "data.doc_stride=8"], "squad", "f1"),
    "mlm": (["experiment=full/mvue_table/bert_mlm_wikipedia_mvue24", SMALL_BERT[:-1] + ",max_position_embeddings:64}",
             "data.tokenizer=null", "data.vocab_size=200", "data.max_length=16"], "mlm", "val_loss"),
}
COMMON = ["trainer.max_steps=3", "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.threads=1",
          "trainer.workers=0", "trainer.device=cpu", "optim.lr=1e-3", "logger.mode=disabled"]


@pytest.mark.parametrize("task", list(ROWS))
def test_task_trains_end_to_end(task, data, tmp_path):
    from lowprec.prepare import Session

    overrides, sub, metric = ROWS[task]
    out = tmp_path / "out"
    cfg, choices = _compose([*overrides, *COMMON, f"data.root={data / sub}", f"out_root={out}"])
    run_dir = out / "run"
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:  # as run.py's @hydra.main: the baseline's config is composed from conf/
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            Session().run(cfg, names=choices, run_dir=run_dir, name=choices["experiment"])
    finally:
        GlobalHydra.instance().clear()
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["metric"] == metric and s["task"] == task and s["steps"] == 3
    assert s["higher_is_better"] is (metric != "val_loss")
    assert math.isfinite(s["val_loss"]) and 0 <= s["final_top1"] <= 100
    if metric != "val_loss":
        assert 0 <= s[metric] <= 100 and s[f"baseline_{metric}"] is not None
        assert s["degradation"] == pytest.approx(s[f"baseline_{metric}"] - s[metric])
    else:
        assert s["degradation"] == pytest.approx(s["val_loss"] - s["baseline_val_loss"])
    if task == "qa":
        assert 0 <= s["exact_match"] <= s["f1"] + 1e-9
    assert s["baseline"] == "trained"
    con = sqlite3.connect(out / "runs.sqlite")
    rows = dict(con.execute("SELECT metric, degradation FROM runs WHERE run_dir = ?", (str(run_dir),)).fetchall())
    assert rows == {metric: pytest.approx(s["degradation"])}
    base = con.execute("SELECT metric, is_baseline FROM runs WHERE is_baseline = 1").fetchall()
    assert base == [(metric, 1)]


def _task_data(overrides, root):
    from lowprec.data import build_datasets
    return build_datasets(_exp([*overrides, f"data.root={root}"]).data)


class _Oracle(torch.nn.Module):
    """Outputs the validation references: seq2seq logits peaked on the next target token, or QA
    start/end logits peaked on the answer span."""

    def __init__(self, td):
        super().__init__()
        self.td = td

    def forward(self, x, y0=None, attention_mask=None, token_type_ids=None):
        td = self.td
        if td.task == "translation":
            row = [int((td.test.x[:, :x.shape[1]] == r).all(1).nonzero()[0]) for r in x]
            tgt = td.test.ys[1][row]
            nxt = tgt[:, :y0.shape[1]]
            if nxt.shape[1] < y0.shape[1]:
                nxt = torch.cat([nxt, torch.full((len(x), y0.shape[1] - nxt.shape[1]), td.ids["eos"])], 1)
            return torch.nn.functional.one_hot(nxt, td.num_classes).float().transpose(1, 2) * 10
        row = [int((td.test.x == r).all(1).nonzero()[0]) for r in x]
        s, e = td.test.ys[2][row], td.test.ys[3][row]
        L = x.shape[1]
        return (torch.nn.functional.one_hot(s, L).float() * 10, torch.nn.functional.one_hot(e, L).float() * 10)


def test_metrics_of_an_oracle_are_hand_computed(data):
    """A model that outputs the references: BLEU 100, EM 100, F1 100; the hand-computed val_loss of
    logits 10 on the target and 0 elsewhere is ln(1 + (V-1) e^-10)."""
    from torch.utils.data import DataLoader

    td = _task_data(ROWS["translation"][0], data / "wmt")
    m = td.evaluate(_Oracle(td), DataLoader(td.test, batch_size=2), device=torch.device("cpu"), bf16=False)
    V = td.num_classes
    assert m["bleu"] == pytest.approx(100.0) and m["top1"] == 100.0
    assert m["val_loss"] == pytest.approx(math.log(1 + (V - 1) * math.exp(-10)), rel=1e-3)  # float32 log-softmax
    td = _task_data(ROWS["qa"][0], data / "squad")
    m = td.evaluate(_Oracle(td), DataLoader(td.test, batch_size=2), device=torch.device("cpu"), bf16=False)
    assert m["exact_match"] == 100.0 and m["f1"] == 100.0


def test_mlm_masks_follow_seed_and_step_and_validation_masks_are_fixed(data):
    td = _task_data(ROWS["mlm"][0], data / "mlm")
    x = td.train.x[:4]
    seen = []

    def model(xm):
        seen.append(xm.clone())
        return torch.zeros(xm.shape[0], td.num_classes, xm.shape[1])
    for step in (5, 5, 6):
        td.loss(model, x, None, step, seed=1)
    td.loss(model, x, None, 5, seed=2)
    assert torch.equal(seen[0], seen[1])                 # same (seed, step): a resume repeats the masks
    assert not torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[3])
    assert (seen[0] == td.ids["mask"]).any()
    again = _task_data(ROWS["mlm"][0], data / "mlm")
    assert torch.equal(td.test.x, again.test.x) and torch.equal(td.test.ys[0], again.test.ys[0])


def test_wrong_arch_for_the_task_is_one_line(data):
    from lowprec.task_loop import check_task

    exp = _exp([*ROWS["qa"][0], "model.arch=masked-lm", f"data.root={data / 'squad'}"])
    td = _task_data(ROWS["qa"][0], data / "squad")
    with pytest.raises(ValueError, match="model.arch=question-answering") as e:
        check_task(exp, td)
    assert "\n" not in str(e.value)
    exp = _exp([*ROWS["qa"][0], "trainer.noise_every=2", "trainer.noise_window=4", f"data.root={data / 'squad'}"])
    with pytest.raises(ValueError, match="trainer.noise_window=4"):  # r_full's loss is classification CE
        check_task(exp, td)


def test_mlm_run_killed_after_a_mid_epoch_checkpoint_resumes_exactly(data, tmp_path):
    """The training masks come from (seed, step): a masked-LM run killed after a checkpoint inside
    an epoch and resumed ends with the weights and metrics of an uninterrupted run."""
    import signal

    from test_reliability_resume import finish, metrics, start

    overrides, sub, _ = ROWS["mlm"]
    args = [*overrides, *(a for a in COMMON if "max_steps" not in a), "trainer.max_steps=5",
            "trainer.checkpoint_steps=2", "trainer.baseline=skip",
            f"data.root={data / sub}"]
    res = finish([start(tmp_path / "s", *args, f"hydra.run.dir={tmp_path / 's' / 'run'}"),
                  start(tmp_path / "k", *args, f"hydra.run.dir={tmp_path / 'k' / 'run'}", LOWPREC_TEST_KILL_AT="step3")])
    assert res[0][0] == 0, res[0][2][-2000:]
    assert res[1][0] == -signal.SIGKILL, res[1][2][-2000:]
    rc, out, err = finish([start(tmp_path / "k", *args, f"trainer.resume={tmp_path / 'k' / 'run'}")])[0]
    assert rc == 0, (out[-2000:], err[-2000:])
    want, got = (json.loads((tmp_path / d / "run" / "summary.json").read_text()) for d in ("s", "k"))
    assert got["steps"] == 5 and got["weights_sha256"] == want["weights_sha256"]
    assert got["val_loss"] == want["val_loss"] and metrics(tmp_path / "k" / "run") == metrics(tmp_path / "s" / "run")


@pytest.mark.parametrize("metric", ["bleu", "f1"])
def test_summary_of_a_higher_is_better_score(metric):
    """degradation = baseline − run (points; > 0 worse), the baseline's score and val_loss read from
    its index row's summary (a JSON string) or, for the fp32 run itself, from its own result; no
    chance rule (baseline_quality null). Guards the sign and the reading, which the end-to-end test
    cannot (tiny models there often score 0 on both sides)."""
    from test_lm_run import _exp as _plain, _result

    from lowprec.summary import summarize

    res = _result(metric=metric, val_loss=2.5, num_classes=100, **{metric: 27.5})
    row = {"final_top1": 40.0, "run_dir": "/b", "summary": json.dumps({metric: 30.0, "val_loss": 2.0})}
    s = summarize(_plain(), res, row, "found")
    assert (s[f"baseline_{metric}"], s["baseline_val_loss"], s["baseline_top1"]) == (30.0, 2.0, 40.0)
    assert s["degradation"] == pytest.approx(2.5) and s["higher_is_better"] is True
    assert s["baseline_quality"] is None and s["baseline"] == "found"
    s = summarize(_plain(), res, None, "skipped")
    assert s[f"baseline_{metric}"] is None and s["degradation"] is None and s["baseline"] == "no baseline"
    s = summarize(_plain("grad=fp32"), res, None, "trained")
    assert (s[f"baseline_{metric}"], s["baseline_val_loss"], s["degradation"], s["baseline"]) == (27.5, 2.5, 0, "self")
