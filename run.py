#!/usr/bin/env python
"""lowprec: train with low-precision neural gradients and compare with the fp32 baseline.

    python run.py                                   # resnet20 on digits, grad=luq4, vs fp32
    python run.py model=resnet50 grad=mvue24 fwd=int4 trainer.epochs=4
    python run.py -m grad=fp32,luq4,mvue24          # sweep; every job finds its baseline
    python run.py ... trainer.resume=<dir of a killed run>      # = trainer.resume=true hydra.run.dir=<dir>
    torchrun --nproc_per_node=2 run.py ...          # DDP (gloo on CPU, nccl on CUDA)
    python run.py -m hydra/launcher=slurm ...       # SLURM via hydra-submitit-launcher

Each run dir gets .hydra/, resolved_config.yaml, metrics.jsonl, summary.json and
checkpoints/last.pt; every finished run appends a row to <out_root>/runs.sqlite.

Baselines (trainer.baseline): every run is compared with the fp32/fp32 run of the same model,
data, epochs (incl. FNT), seed, batch size and every other training setting (the experiment
identity, lowprec.config.Experiment.identity; its hash is the index's `key`). `auto` looks it up in the index and, when there is none, trains it first (in this
process, into <out_root>/baselines/<name>/) and then the requested run. Concurrent jobs (a
parallel sweep, SLURM arrays) coordinate through one flock per key: the job holding it either
is the fp32 run or trains the baseline; the others block on the lock, then find the row. A
holder that dies releases the lock (the kernel does it), and the next job resumes the
half-trained baseline from its checkpoint. So a luq4 job that starts before the fp32 job has
finished always gets a baseline, and the baseline is trained once.

Every run gets its own directory (the seed and a per-process tag are in its name) and holds an
exclusive lock on it (<run dir>/.lock) for its life: a second process finding it locked, or
finding a finished summary.json there without trainer.resume, stops before touching anything.

Exit status: 0 the run finished with status ok; 2 an input error (unknown option or key, a value
out of range, N > M, a missing dataset path, a corrupt checkpoint or index, an unwritable
out_root, a run dir in use...), one `error: ...` line naming the key or file, before any training
(LOWPREC_DEBUG=1 shows the traceback); 3 a run (the fp32 baseline trained first, or the requested
run) diverged (more than trainer.max_skip_frac of its steps skipped as non-finite, a non-finite
final validation loss, or a final training loss above 10 x ln classes; lowprec/summary.py) or failed on a non-finite
value: one `error:` line naming which, the index row has status diverged/failed; 1 anything else
during training, with its traceback (a bug). Resuming a finished run rewrites nothing.

The work is lowprec.prepare's (a Session per process); this file is the command line only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra

from lowprec.config import register_resolvers

register_resolvers()  # before Hydra composes conf/ (it uses ${lowprec_or:...})


def cli(argv: list[str]) -> None:
    """Preflight checks (one `error:` line, exit 2), then the Hydra job (lowprec.prepare)."""
    from lowprec.prepare import Session

    session = Session()
    try:
        sys.argv[1:] = session.preflight(argv)
    except ValueError as e:
        if os.environ.get("LOWPREC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"),
                config_name="config")
    def main(cfg) -> float:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return session.main(cfg, names=dict(hc.runtime.choices), run_dir=hc.runtime.output_dir,
                            name=hc.runtime.choices.get("experiment"))

    with session.keep:  # the run dir lock preflight took, held until the process ends
        main()


if __name__ == "__main__":
    cli(sys.argv[1:])
