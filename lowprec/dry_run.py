"""Dry run (``trainer.dry_run=N``): an experiment's real model, recipes and optimizer driven for N
optimizer steps and one evaluation on synthetic inputs of the real shapes, to show before a cluster
job that a (full-scale) experiment runs, and what a step costs.

    python run.py experiment=full/luq_table/resnet50_imagenet_luq4 trainer.dry_run=2
    python run.py experiment=full/mvue_table/bert_squad_mvue24 trainer.dry_run=1 trainer.dry_run_batch=1

Real: the model, built as a run builds it (the data's image size and classes, the task's sequence
lengths and vocabulary; a ``model.path`` checkpoint that is not on this machine is replaced by its
architecture's default config, randomly initialized, and the output says so), ``convert`` with the
experiment's fwd/grad recipes and convert options, the optimizer (optim.*, gradient clipping), bf16
autocast, the task's loss and evaluation code. Synthetic: the inputs and targets (no data set is
read, so nothing needs downloading or preparing) and the batch: ``trainer.dry_run_batch``, or
automatically min(trainer.batch_size, 2), for training and evaluation alike. The learning rate is
optim.lr (the schedule's factor depends on the data set's size). An experiment with FNT
(fnt_epochs / fnt_steps) takes its last dry-run step, for N >= 2, with FNT's recipes
(``train.enter_fnt``). The noise monitor and adaptive precision are not run.

Inputs and loss per task (the data spec decides the task):

- classification: x ~ N(0, 1) [B, C, S, S] (ImageNet: 3 x 224 x 224, 1000 classes), uniform labels;
  ``F.cross_entropy`` as the trainer; evaluation: ``evaluation.evaluate`` (top-1/5, loss).
- lm (character LM): ids [B, T] uniform over the vocabulary (Shakespeare: 84 characters), the
  targets likewise; the trainer's loss and evaluation.
- translation: source [B, max_length] and target [B, max_target_length] ids (</s> last), decoder
  input = <s> + target[:-1]; ``translation.label_smoothed_nll_loss`` with data.label_smoothing;
  evaluation: that loss, ``translation.greedy_decode`` of DECODE_TOKENS tokens (and
  ``translation.beam_search`` of one row when data.beam > 1) and ``translation.bleu`` of the
  decoded ids against the target ids (full-length decoding would take max_target_length passes).
- qa: [CLS] question (QUESTION_TOKENS) [SEP] context [SEP] = max_length ids, token types 0 / 1, an
  answer span of at most max_answer_length context tokens; loss (CE(start) + CE(end)) / 2, the loss
  of transformers' ``BertForQuestionAnswering`` (``task_loop.qa_loss``, the trainer's); evaluation: that loss,
  ``squad.best_answer`` on a synthetic context (words w0 w1 ...) and ``squad.squad_metrics``.
- mlm: [CLS] ids [SEP] blocks of max_length, ``mlm.mask_tokens`` (data.mlm_probability, 80/10/10);
  cross-entropy over the selected tokens; evaluation: the MLM loss of another masked batch.

Token ids follow lowprec.tasks' trained-tokenizer layout: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3,
[MASK] 4, <s> 5, </s> 6, ordinary tokens from 7 up to the vocabulary size.

Printed: the converted-layer report, the parameter count, each step's loss and seconds, the
evaluation, the seconds per step (the mean over the steps after the first, which pays one-time
costs; the first alone when N = 1) and the peak memory: on CUDA ``torch.cuda.max_memory_allocated``
(reset at the start); on the CPU the process's peak resident set (VmHWM of /proc/self/status,
reset at the start through /proc/self/clear_refs where the kernel allows it, else getrusage's
ru_maxrss: the peak since the process began, which the output then says). Nothing is written: no
run dir (run preparation removes the one Hydra made), checkpoint, metrics, index row or baseline;
no logger is started.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import seed_everything
from .config import Experiment
from .convert import convert
from .optim import make_optimizer

__all__ = ["AUTO_BATCH", "Shapes", "dry_run", "shapes_of", "dry_model_spec", "build_dry_model", "auto_batch"]

AUTO_BATCH = 2          # trainer.dry_run_batch=0: min(trainer.batch_size, AUTO_BATCH)
DECODE_TOKENS = 2       # translation: tokens decoded in the evaluation
QUESTION_TOKENS = 16    # qa: question length in the synthetic [CLS] question [SEP] context [SEP]
PAD, UNK, CLS, SEP, MASK, BOS, EOS = range(7)  # lowprec.tasks' special tokens, in its order
FIRST_ID = 7
# Classes and channels of the image data sets (lowprec.data's; ImageNet-1k for imagenet).
IMAGE_CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
IMAGE_CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "imagenet": 3}
SHAKESPEARE_VOCAB = 84  # distinct characters of data=shakespeare_char (lowprec.text_data)


@dataclass(frozen=True)
class Shapes:
    """What the model is built for and the inputs are drawn at."""
    task: str              # classification | lm | translation | qa | mlm
    num_classes: int       # classes, or the vocabulary size
    in_channels: int
    size: int              # image side, or the (source) sequence length
    target_len: int = 0    # translation: target sequence length
    note: str = ""


def shapes_of(exp: Experiment) -> Shapes:
    """The task and shapes of ``exp``'s data spec, without reading the data."""
    from .data import DataSpec, TextDataSpec
    from .tasks import TaskDataSpec

    d = exp.data
    if isinstance(d, TaskDataSpec):
        return Shapes(d.task, d.vocab_size, 1, d.max_length,
                      d.max_target_length if d.task == "translation" else 0)
    if isinstance(d, TextDataSpec):
        if d.name == "shakespeare_char":
            return Shapes("lm", SHAKESPEARE_VOCAB, 1, d.block_size, note="84 characters, data=shakespeare_char's")
        from .tasks import require_local

        text = require_local(d.path, "data.path", "a UTF-8 text file").read_text(encoding="utf-8")
        return Shapes("lm", len(set(text)), 1, d.block_size, note=f"the distinct characters of {d.path}")
    if isinstance(d, DataSpec):
        return Shapes("classification", IMAGE_CLASSES[d.name], IMAGE_CHANNELS[d.name], d.image_size)
    raise ValueError(f"data={exp.names.get('data')}: a dry run does not know the data spec "
                     f"{type(d).__name__}")


def dry_model_spec(spec: Any) -> tuple[Any, str]:
    """``spec``, or (a Hugging Face spec whose model.path has no config.json here) the same spec
    built from the architecture's default config: the model_type the directory's name starts with
    (bert-base-uncased -> bert), else model.name; random weights. (spec, note)."""
    from .hf_models import HFModelSpec

    if not isinstance(spec, HFModelSpec) or spec.path is None \
            or (Path(str(spec.path)).expanduser() / "config.json").is_file():
        return spec, ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CONFIG_MAPPING

    base = Path(str(spec.path)).name.lower()
    types = [k for k in CONFIG_MAPPING.keys() if base == k or base.startswith((k + "-", k + "_"))]
    mt = max(types, key=len) if types else spec.name
    new = dataclasses.replace(spec, name=mt, path=None, weights=False, presets={})
    return new, (f"model.path={spec.path} is not on this machine: built from transformers' default "
                 f"{mt!r} config{' + model.config' if spec.config else ''} (the checkpoint's "
                 "architecture), randomly initialized")


def build_dry_model(exp: Experiment) -> tuple[nn.Module, str]:
    """The model a dry run of ``exp`` uses, unconverted, seeded from trainer.seed; (model, note)."""
    from .models import build_model

    sh = shapes_of(exp)
    spec, note = dry_model_spec(exp.model)
    seed_everything(exp.trainer.seed)
    return build_model(spec, num_classes=sh.num_classes, in_channels=sh.in_channels, image_size=sh.size), note


def auto_batch(exp: Experiment) -> tuple[int, str]:
    t = exp.trainer
    if t.dry_run_batch:
        return t.dry_run_batch, f"trainer.dry_run_batch={t.dry_run_batch}"
    b = min(t.batch_size, AUTO_BATCH)
    return b, f"automatic: min(trainer.batch_size={t.batch_size}, {AUTO_BATCH}); trainer.dry_run_batch=B sets it"


# ----------------------------------------------------------------------------- the tasks


@dataclass
class _Task:
    make: Callable[[torch.Generator], Any]          # a synthetic batch (on the device)
    loss: Callable[[nn.Module, Any], torch.Tensor]  # the task's training loss
    evaluate: Callable[[nn.Module, Any], dict]      # one evaluation on a batch
    shapes: str                                     # the inputs, in words
    loss_name: str


def _ids(g: torch.Generator, shape, vocab: int) -> torch.Tensor:
    return torch.randint(FIRST_ID, vocab, shape, generator=g)


def _vocab(model: nn.Module, sh: Shapes) -> int:
    """The model's own vocabulary when it has one (a QA checkpoint's), else the data's."""
    cfg = getattr(getattr(model, "hf", None), "config", None)
    return int(getattr(cfg, "vocab_size", sh.num_classes) or sh.num_classes)


def _task(exp: Experiment, sh: Shapes, model: nn.Module, B: int, dev: torch.device) -> _Task:
    d, t = exp.data, exp.trainer
    ac = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=t.bf16)

    if sh.task in ("classification", "lm"):
        from torch.utils.data import DataLoader, TensorDataset

        from .evaluation import evaluate

        S, C = sh.size, sh.num_classes
        if sh.task == "classification":
            def make(g):
                return (torch.randn(B, sh.in_channels, S, S, generator=g).to(dev),
                        torch.randint(C, (B,), generator=g).to(dev))
            what = f"images [{B}, {sh.in_channels}, {S}, {S}] ~ N(0,1), labels [{B}] over {C} classes"
        else:
            def make(g):
                return (torch.randint(C, (B, S), generator=g).to(dev), torch.randint(C, (B, S), generator=g).to(dev))
            what = f"character ids [{B}, {S}] and next-character targets [{B}, {S}] over {C} ({sh.note})"

        def ev(model, batch):
            return evaluate(model, DataLoader(TensorDataset(*batch), batch_size=B), device=dev,
                            bf16=t.bf16, limit=0)
        return _Task(make, lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), ev, what,
                     "cross-entropy (the trainer's)")

    V = _vocab(model, sh)
    L = sh.size
    if sh.task == "translation":
        from .translation import beam_search, bleu, greedy_decode, label_smoothed_nll_loss

        T, eps = sh.target_len, d.label_smoothing

        def make(g):
            src, tgt = _ids(g, (B, L), V), _ids(g, (B, T), V)
            src[:, -1], tgt[:, -1] = EOS, EOS
            dec = torch.cat([torch.full((B, 1), BOS, dtype=torch.long), tgt[:, :-1]], 1)
            return src.to(dev), dec.to(dev), tgt.to(dev)

        def loss(m, b):
            return label_smoothed_nll_loss(m(b[0], b[1]), b[2], eps, ignore_index=PAD)

        def ev(m, b):
            with torch.no_grad(), torch.autocast(**ac):
                val = float(loss(m, b))
                hyps = greedy_decode(m, b[0], decoder_start_id=BOS, eos_id=EOS, max_len=DECODE_TOKENS)
                if d.beam > 1:
                    beam_search(m, b[0][:1], decoder_start_id=BOS, eos_id=EOS, max_len=DECODE_TOKENS,
                                beam=d.beam, lenpen=d.lenpen)
            refs = [" ".join(map(str, r[:-1].tolist())) for r in b[2]]
            score = bleu([" ".join(map(str, h)) for h in hyps], refs)
            return {"val_loss": val, "bleu_synthetic": score, "decoded_tokens": DECODE_TOKENS,
                    "beam": d.beam}
        return _Task(make, loss, ev, f"source ids [{B}, {L}], decoder input and target ids [{B}, {T}] "
                     f"over a vocabulary of {V}", f"label-smoothed cross-entropy (eps {eps}, lowprec.translation)")

    if sh.task == "qa":
        from .squad import best_answer, squad_metrics
        from .task_loop import qa_loss  # the trainer's

        Q, A = min(QUESTION_TOKENS, L // 4), d.max_answer_length
        n_ctx = L - Q - 3
        words = [f"w{j}" for j in range(n_ctx)]
        context = " ".join(words)
        starts = [sum(len(w) + 1 for w in words[:j]) for j in range(n_ctx)]
        offsets = [None] * (Q + 2) + [(s, s + len(w)) for s, w in zip(starts, words)] + [None]

        def make(g):
            ids = _ids(g, (B, L), V)
            ids[:, 0], ids[:, Q + 1], ids[:, -1] = CLS, SEP, SEP
            types = torch.zeros(B, L, dtype=torch.long)
            types[:, Q + 2:] = 1
            s = torch.randint(Q + 2, L - 1, (B,), generator=g)
            e = torch.minimum(s + torch.randint(0, A, (B,), generator=g), torch.tensor(L - 2))
            return ids.to(dev), torch.ones(B, L, dtype=torch.long, device=dev), types.to(dev), s.to(dev), e.to(dev)

        def loss(m, b):
            return qa_loss(m(b[0], attention_mask=b[1], token_type_ids=b[2]), b[3], b[4])

        def ev(m, b):
            with torch.no_grad(), torch.autocast(**ac):
                start, end = m(b[0], attention_mask=b[1], token_type_ids=b[2])
                val = float(qa_loss((start, end), b[3], b[4]))
            preds, exs = {}, []
            for i in range(B):
                s, e = int(b[3][i]) - Q - 2, int(b[4][i]) - Q - 2
                exs.append({"id": str(i), "answers": [" ".join(words[s:e + 1])]})
                preds[str(i)] = best_answer(context, [start[i].cpu()], [end[i].cpu()], [offsets],
                                            max_answer_length=A)
            return {"val_loss": val, **{f"{k}_synthetic": v for k, v in squad_metrics(exs, preds).items()}}
        return _Task(make, loss, ev, f"[CLS] question ({Q}) [SEP] context ({n_ctx}) [SEP]: ids, attention "
                     f"mask and token types [{B}, {L}] over a vocabulary of {V}; answer spans <= {A} tokens",
                     "(CE(start) + CE(end)) / 2, transformers' BertForQuestionAnswering loss")

    if sh.task == "mlm":
        from .mlm import mask_tokens

        def make(g):
            ids = _ids(g, (B, L), V)
            ids[:, 0], ids[:, -1] = CLS, SEP
            x, y = mask_tokens(ids, vocab_size=V, mask_id=MASK, special_ids=tuple(range(FIRST_ID)),
                               probability=d.mlm_probability, generator=g)
            if not (y != -100).any():  # at least one prediction (tiny batches)
                y[:, 1] = ids[:, 1]
            return x.to(dev), y.to(dev)

        def loss(m, b):
            return F.cross_entropy(m(b[0]).float(), b[1], ignore_index=-100)

        def ev(m, b):
            with torch.no_grad(), torch.autocast(**ac):
                return {"val_loss": float(loss(m, b)), "masked_tokens": int((b[1] != -100).sum())}
        return _Task(make, loss, ev, f"[CLS] ids [SEP] blocks [{B}, {L}] over a vocabulary of {V}, "
                     f"{d.mlm_probability:.0%} masked (80/10/10, lowprec.mlm)",
                     "cross-entropy over the masked tokens (lowprec.mlm)")
    raise ValueError(f"data.task={sh.task!r}: a dry run knows classification, lm, translation, qa, mlm")


# ----------------------------------------------------------------------------- memory


def _reset_peak() -> str:
    """Reset the CPU peak (VmHWM) if the kernel allows it; the memory kind the output names."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "CPU peak resident set of the process during the dry run (VmHWM)"
    except OSError:
        return "CPU peak resident set of the process since it started (ru_maxrss; could not reset it)"


def _status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_peak() -> int:
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


# ----------------------------------------------------------------------------- the run


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dry_run(exp: Experiment, *, out: Callable[[str], None] | None = None,
            model: nn.Module | None = None, evaluate: bool = True) -> dict[str, Any]:
    """Run ``exp`` as a dry run of trainer.dry_run steps (module docstring); print the report
    through ``out`` (print by default) and return its numbers. ``model``: ``build_dry_model(exp)``'s
    model, built beforehand (a caller dry-running several rows of one model builds it once and
    passes copies); it is converted in place. ``evaluate=False`` leaves the evaluation out (a test
    that has evaluated another row of the same model: the same forward, under no_grad)."""
    from .train import enter_fnt

    say = out or (lambda s: print(s, flush=True))
    t = exp.trainer
    steps = t.dry_run
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trainer.dry_run={steps!r}: expected an integer >= 1 for a dry run")
    dev = _device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    B, why = auto_batch(exp)
    sh = shapes_of(exp)
    model_note = dry_model_spec(exp.model)[1]
    fnt = (t.fnt_steps if t.max_steps else t.fnt_epochs) > 0
    label = exp.name or f"model={exp.names['model']} data={exp.names['data']}"
    say(f"dry run: {label} (grad={exp.names['grad']} fwd={exp.names['fwd']}), task {sh.task}, "
        f"{steps} step(s) and one evaluation on synthetic inputs, device {dev}")
    if model_note:
        say(f"dry run: {model_note}")

    mem_kind = "CUDA max_memory_allocated" if dev.type == "cuda" else _reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else (_status("VmRSS") or 0)
    t0 = time.perf_counter()
    built_here = model is None
    if model is None:
        model = build_dry_model(exp)[0]
    seed_everything(t.seed)
    model = model.to(dev)
    report = convert(model, fwd=exp.fwd, grad=exp.grad, stats_every=t.stats_every, **exp.convert)
    build_s = time.perf_counter() - t0
    say(str(report))
    params = sum(p.numel() for p in model.parameters())
    task = _task(exp, sh, model, B, dev)
    say(f"dry run: {params:,} parameters; {report.num_converted} layers converted, "
        f"{report.num_skipped} kept in high precision; {'built and ' if built_here else ''}converted in {build_s:.1f} s")
    say(f"dry run: batch {B} ({why}); inputs: {task.shapes}")
    say(f"dry run: loss: {task.loss_name}; lr optim.lr={t.optim.lr:g} (no schedule)"
        + ("; the last step in FNT (exact δ, weights still quantized)" if fnt and steps >= 2 else ""))

    opt = make_optimizer(model, t.optim)
    g = torch.Generator().manual_seed(t.seed)
    model.train()
    losses, secs, phases = [], [], []
    for i in range(steps):
        phase = "main"
        if fnt and steps >= 2 and i == steps - 1:
            enter_fnt(model, exp)
            phase = "fnt"
        batch = task.make(g)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ts = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
            loss = task.loss(model, batch)
        loss.backward()
        if t.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.optim.clip_grad)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs.append(time.perf_counter() - ts)
        losses.append(float(loss.detach()))
        phases.append(phase)
        say(f"dry run: step {i + 1}/{steps} ({phase}) loss {losses[-1]:.4f} {secs[-1]:.2f} s")
    te = time.perf_counter()
    model.eval()
    ev = task.evaluate(model, task.make(g)) if evaluate else {"skipped": "evaluate=False"}
    model.train()
    eval_s = time.perf_counter() - te
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _cpu_peak()
    main = [s for s, p in zip(secs, phases) if p == "main"]  # FNT's exact-δ step is reported apart
    per_step = sum(main[1:]) / (len(main) - 1) if len(main) > 1 else main[0]
    say("dry run: evaluation (synthetic batch): "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items())
        + f" in {eval_s:.2f} s")
    say(f"dry run: {per_step:.3f} s per step at batch {B} "
        + (f"(mean of steps 2..{len(main)}; the first took {secs[0]:.2f} s)" if len(main) > 1
           else "(one step: includes one-time costs)")
        + (f"; the FNT step {secs[-1]:.2f} s" if phases[-1] == "fnt" else ""))
    say(f"dry run: peak memory {_gib(peak)} ({mem_kind}; {_gib(start_mem)} at its start)")
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    say(f"dry run: {'ok' if finite else 'NON-FINITE LOSS'}; nothing written (no run dir, checkpoint, "
        "index row or baseline)")
    return {"experiment": exp.name, "task": sh.task, "model": exp.names.get("model"), "device": str(dev),
            "model_note": model_note, "batch": B, "batch_note": why, "inputs": task.shapes,
            "loss_name": task.loss_name, "params": params, "converted": report.num_converted,
            "skipped": report.num_skipped, "report": str(report), "losses": losses,
            "final_loss": losses[-1], "finite": finite, "step_seconds": secs, "seconds_per_step": per_step,
            "build_seconds": build_s, "eval": ev, "eval_seconds": eval_s, "peak_memory_bytes": peak,
            "start_memory_bytes": start_mem,
            "memory_kind": mem_kind, "fnt_step": fnt and steps >= 2}
