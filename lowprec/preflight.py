"""Command-line checks made before Hydra creates a run dir (lowprec.prepare.Session.preflight
uses them): unknown `group=option`s with the closest match, `trainer.resume=<dir>` expanded,
every override composed once so a bad key or value is one line naming it, the LOWPREC_*
environment, and which exceptions are the user's (one `error:` line) rather than bugs.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from .recipes import config_options

CONF = Path(__file__).resolve().parents[1] / "conf"
# Config groups whose options are files under conf/<group>/ (Hydra's own groups are left to Hydra).
OUR_GROUPS = ("model", "data", "fwd", "grad", "optim", "sched", "trainer", "logger", "experiment")
TRUE = ("true", "yes", "on", "1")
_BOOL = (*TRUE, "false", "no", "off", "0", "null", "")


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for a bug (traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain = e
    while chain is not None:  # unwrap InstantiationException etc.
        if isinstance(chain, (ValueError, FileNotFoundError, FloatingPointError)):
            lines = str(chain).strip().splitlines()
            return lines[0] if lines else type(chain).__name__
        chain = chain.__cause__  # `raise ... from e` (Hydra's InstantiationException does)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return str(e).strip().splitlines()[0]
    return None


def check_group_options(argv: list[str], conf: Path = CONF) -> str | None:
    """One line naming an unknown `group=option` on the command line (with the valid options and
    the closest match), or None. Hydra would also refuse it, but in a dozen lines."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        if key not in OUR_GROUPS or any(c in value for c in "()[]{}$*"):
            continue  # a field override (grad.update.n=5), or Hydra sweep syntax: Hydra checks it
        valid = sorted({str(p.relative_to(conf / key))[:-5] for p in (conf / key).rglob("*.yaml")
                        if not p.name.startswith("_")} | set(config_options(key)))  # + recipes' ConfigStore
        for v in value.split(","):
            if v in ("null", "") or v in valid:
                continue
            close = difflib.get_close_matches(v, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            shown = ", ".join(valid) if len(valid) <= 20 else ", ".join(valid[:20]) + ", ..."
            return f"unknown {key} option {v!r}{hint}; valid: {shown}"
    return None


def check_env() -> None:
    """The LOWPREC_* settings a run reads later, checked before anything is written."""
    from . import allocator, dispatch
    from .kernels import native

    b = os.environ.get(dispatch.ENV_VAR)
    if b is not None and b not in dispatch.BACKENDS:
        raise ValueError(f"{dispatch.ENV_VAR}={b!r}: expected one of {', '.join(dispatch.BACKENDS)}")
    native.enabled()  # LOWPREC_CPU_NATIVE: a ValueError naming it when it is not 0 or 1
    allocator.mode()  # LOWPREC_MALLOC: keep or default


def value_of(argv: list[str], key: str) -> str | None:
    """The last value `key=...` has on the command line, or None."""
    vals = [a.split("=", 1)[1] for a in argv if "=" in a and a.lstrip("+~").split("=", 1)[0] == key]
    return vals[-1] if vals else None


def resume_form(argv: list[str]) -> list[str]:
    """`trainer.resume=<run dir>` -> `trainer.resume=true hydra.run.dir=<run dir>`."""
    v = value_of(argv, "trainer.resume")
    if v is None or v.strip("'\"").lower() in _BOOL:
        return argv
    path = v.strip("'\"")
    if not Path(path).is_dir():
        raise ValueError(f"trainer.resume={v}: no such run directory (true, false, or the "
                         "directory of the run to resume)")
    other = value_of(argv, "hydra.run.dir")
    if other is not None and Path(other).resolve() != Path(path).resolve():
        raise ValueError(f"trainer.resume={v} and hydra.run.dir={other}: two different run dirs")
    rest = [a for a in argv if a.lstrip("+~").split("=", 1)[0] not in ("trainer.resume",
                                                                       "hydra.run.dir")]
    return [*rest, "trainer.resume=true", f"hydra.run.dir={path}"]


def compose_error(e: BaseException, argv: list[str]) -> str:
    """One line for a Hydra composition error, naming the override (key and value)."""
    lines = []
    chain = e
    while chain is not None:
        text = [ln.strip() for ln in str(chain).strip().splitlines() if ln.strip()]
        lines += [ln for ln in text if not ln.startswith(("full_key", "object_type", "To append",
                                                           "Set the environment"))][:1]
        chain = chain.__cause__ or chain.__context__
    m = re.search(r"override '([^']+)'|[Kk]ey '([^']+)'", str(e))
    key = next((g for g in (m.groups() if m else ()) if g), None)
    arg = next((a for a in argv if key and a.lstrip("+~").split("=", 1)[0] == key), None)
    msg = "; ".join(dict.fromkeys(lines)) or type(e).__name__
    return f"{arg}: {msg}" if arg else msg


def compose_checked(argv: list[str]):
    """conf/ composed with `argv` (with the Hydra config, resolved), or a ValueError naming the
    override that breaks it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=argv)
        str(cfg.out_root), str(cfg.index)  # resolve them here: an interpolation error is input
        return cfg
    except Exception as e:  # Hydra/OmegaConf composition and interpolation errors
        raise ValueError(compose_error(e, argv)) from e
    finally:
        GlobalHydra.instance().clear()
