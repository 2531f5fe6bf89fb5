"""Where a run's numbers go: metrics.jsonl in the run directory, and Weights & Biases.

One small interface (`Logger`); the training loop calls it and knows nothing about W&B. The base
class is the no-op (non-zero DDP ranks, logger.mode=disabled, or W&B failed to start). W&B never
crashes or blocks a run: a failed import or init, or a failed log call, prints one warning and
turns W&B off for the rest of the run; with no WANDB_API_KEY the default mode is offline.
Online mode is checked once per process (`wandb_online_ok`: the key and the server, at most
WANDB_CHECK_TIMEOUT_S seconds); when the check fails every run of the process (a baseline trained
first, then the requested run) logs offline, after one warning.

metrics.jsonl is strict JSON: a non-finite number (a NaN loss of an epoch whose steps were all
skipped) is written as null.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runs import dumps

MODES = ("auto", "online", "offline", "disabled")


@dataclass(frozen=True)
class LoggerConfig:
    """conf/logger/*.yaml. mode=auto: $WANDB_MODE if set, else online when WANDB_API_KEY is set,
    else offline (never a login prompt)."""
    mode: str = "auto"
    project: str = "lowprec"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    dir: str | None = None          # None: the run directory (W&B files live beside the run)
    histogram_every: int = 5        # epochs between per-layer-stat histograms (0: never)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"logger.mode={self.mode!r}; expected one of {MODES}")
        object.__setattr__(self, "tags", tuple(self.tags or ()))


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Logger:
    """No-op base; subclasses override what they record."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """One epoch's record (epoch, phase, train_loss, top1, top5, lr, epoch_time, and
        layer_stats {layer: {stat: mean over the epoch}} when stats are on)."""

    def log_layer_stats(self, stats: dict[str, dict[str, float]], step: int) -> None:
        """Per-layer gradient statistics collected at one step."""

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object per epoch, appended and flushed at once."""

    def __init__(self, path: str | os.PathLike, *, keep_until_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None:
            self._truncate(keep_until_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh (non-resumed) run starts a fresh file

    def _truncate(self, step: int) -> None:
        """On resume: drop the records of steps after the checkpoint's (they are trained again)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log_metrics(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(dumps({**metrics, "step": step}, sort_keys=True) + "\n")


class WandbLogger(Logger):
    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, name: str, mode: str):
        import wandb  # ImportError (or anything it raises) is handled by make_logger

        self.wandb = wandb
        self.histogram_every = cfg.histogram_every
        self._epochs_logged = 0
        # A stable id from the run directory: a resumed run continues the same W&B run.
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
            name=name, dir=str(cfg.dir or run_dir), mode=mode, id=run_id, resume="allow",
            settings=wandb.Settings(init_timeout=30 if mode == "online" else 10, console="off",
                                    silent=True),
        )
        print(f"logger: W&B {mode} run {self.run.id} in {self.run.dir}", flush=True)

    def _safe(self, fn, *args, **kw):
        if self.run is None:
            return
        try:
            fn(*args, **kw)
        except Exception as e:  # W&B must never end a training run
            warnings.warn(f"W&B logging failed ({type(e).__name__}: {e}); W&B off for this run")
            self.run = None

    def log_config(self, config):
        self._safe(self.run.config.update, config, allow_val_change=True)

    def log_metrics(self, metrics, step):
        flat = {k: v for k, v in metrics.items() if k != "layer_stats" and _is_number(v)}
        flat["phase_is_fnt"] = int(metrics.get("phase") == "fnt")
        self._safe(self.run.log, flat, step=step)
        stats = metrics.get("layer_stats")
        self._epochs_logged += 1
        if stats and self.histogram_every and self._epochs_logged % self.histogram_every == 0:
            # Occasionally: the spread of each statistic across layers, one histogram per stat.
            per_stat: dict[str, list[float]] = {}
            for layer_stats in stats.values():
                for k, v in layer_stats.items():
                    if _is_number(v):
                        per_stat.setdefault(k, []).append(float(v))
            hist = {f"layer_hist/{k}": self.wandb.Histogram(v) for k, v in per_stat.items()}
            self._safe(self.run.log, hist, step=step)

    def log_layer_stats(self, stats, step):
        # One line plot per (layer, stat): "stats/<layer>/<stat>".
        flat = {f"stats/{layer}/{k}": v for layer, s in stats.items() for k, v in s.items()
                if _is_number(v)}
        self._safe(self.run.log, flat, step=step)

    def log_summary(self, summary):
        def upd():
            for k, v in summary.items():
                if _is_number(v) or isinstance(v, str):
                    self.run.summary[k] = v
        self._safe(upd)

    def finish(self):
        self._safe(self.run.finish)
        self.run = None


class MultiLogger(Logger):
    def __init__(self, *loggers: Logger):
        self.loggers = loggers

    def log_config(self, config):
        for lg in self.loggers:
            lg.log_config(config)

    def log_metrics(self, metrics, step):
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_layer_stats(self, stats, step):
        for lg in self.loggers:
            lg.log_layer_stats(stats, step)

    def log_summary(self, summary):
        for lg in self.loggers:
            lg.log_summary(summary)

    def finish(self):
        for lg in self.loggers:
            lg.finish()


WANDB_CHECK_TIMEOUT_S = 5.0
# {"result": None (online works) or why not}: filled by the one check of this process.
ONLINE_CHECK: dict[str, str | None] = {}


def probe_wandb() -> None:
    """Raise unless the W&B server answers and accepts the key (one GraphQL round trip)."""
    import wandb

    wandb.Api(timeout=max(1, int(WANDB_CHECK_TIMEOUT_S))).viewer  # noqa: B018 (the request)


def wandb_online_ok() -> str | None:
    """None when online W&B works, else why not. Checked once per process, in a daemon thread
    given WANDB_CHECK_TIMEOUT_S seconds (a bad key or an unreachable server must not stall
    every run for W&B's own 60-s timeouts)."""
    if "result" not in ONLINE_CHECK:
        box: list[BaseException | None] = []

        def probe():
            try:
                probe_wandb()
                box.append(None)
            except BaseException as e:  # noqa: BLE001 (reported, never raised)
                box.append(e)

        th = threading.Thread(target=probe, daemon=True, name="wandb-check")
        th.start()
        th.join(WANDB_CHECK_TIMEOUT_S)
        if not box:
            why = f"no answer within {WANDB_CHECK_TIMEOUT_S:g} s"
        elif box[0] is not None:
            e = box[0]
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        else:
            why = None
        ONLINE_CHECK["result"] = why
        if why is not None:
            print(f"logger: W&B online check failed ({why[:200]}); logging offline "
                  "(`wandb sync` the run dir later)", file=sys.stderr, flush=True)
    return ONLINE_CHECK["result"]


def make_wandb(cfg: LoggerConfig, *, run_dir: Path, name: str) -> Logger:
    """A WandbLogger, or the no-op Logger when W&B is disabled or cannot start."""
    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        return Logger()
    if mode == "online" and wandb_online_ok() is not None:
        mode = "offline"
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("logger: mode=online without WANDB_API_KEY; wandb may use a stored login",
              file=sys.stderr)
    try:
        return WandbLogger(cfg, run_dir=run_dir, name=name, mode=mode)
    except BaseException as e:  # ImportError, UsageError (no login), timeouts, ...
        if isinstance(e, KeyboardInterrupt):
            raise
        print(f"logger: W&B off ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
              file=sys.stderr)
        return Logger()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

