"""The run's clock: "epochs or a step budget" decided once.

A run is either `trainer.epochs` (+ `fnt_epochs`) passes over the data, or a step budget
`trainer.max_steps` (+ `fnt_steps`) optimizer steps, the data cycled as needed. `Budget` turns
either into the same questions the loop asks — is the run done, is this step or epoch the start of
FNT, which phase is this, is this a checkpoint, evaluation or statistics point, what is the LR
factor — so no other code tests `max_steps` to decide what a step means.

With S steps per epoch (after `limit_batches`):
  epochs:      main = epochs·S low-precision steps, then fnt_epochs·S FNT steps; the run ends
               after epochs + fnt_epochs epochs; FNT starts before epoch `epochs`.
  step budget: main = max_steps, then fnt_steps; the run ends after max_steps + fnt_steps steps;
               FNT starts before step `max_steps` (inside whatever epoch holds it).
The LR factor (lowprec.optim.lr_factor) spans `main` and then the FNT phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from .optim import lr_factor


@dataclass(frozen=True)
class Budget:
    """What a run's length means, computed once from the trainer options and the steps per epoch."""
    steps_per_epoch: int
    epochs: int                # low-precision epochs (epochs mode)
    fnt_epochs: int
    max_steps: int             # > 0: a step budget
    fnt_steps: int
    checkpoint_every: int      # epochs between epoch-end checkpoints; 0: only at the end
    checkpoint_steps: int      # steps between mid-epoch checkpoints; 0: off
    eval_every: int            # steps between step evaluations; 0: at epoch ends only
    stats_every: int           # steps between gradient statistics; 0: off

    @classmethod
    def from_trainer(cls, t, steps_per_epoch: int) -> "Budget":
        return cls(steps_per_epoch=steps_per_epoch, epochs=t.epochs, fnt_epochs=t.fnt_epochs,
                   max_steps=t.max_steps, fnt_steps=t.fnt_steps,
                   checkpoint_every=t.checkpoint_every, checkpoint_steps=t.checkpoint_steps,
                   eval_every=t.eval_every, stats_every=t.stats_every)

    # ------------------------------------------------------------------ length
    @property
    def by_steps(self) -> bool:
        """True for a step budget (trainer.max_steps > 0)."""
        return bool(self.max_steps)

    @property
    def total_epochs(self) -> int:
        """Epochs of an epochs run (low precision + FNT); for a step budget, a bound nobody reads."""
        return self.epochs + self.fnt_epochs

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (skipped ones included)."""
        if self.by_steps:
            return self.max_steps + self.fnt_steps
        return self.total_epochs * self.steps_per_epoch

    @property
    def main_steps(self) -> int:
        """Steps of the low-precision phase; FNT starts at this step."""
        return self.max_steps if self.by_steps else self.epochs * self.steps_per_epoch

    def done(self, epoch: int, step: int) -> bool:
        """The run is over (`epoch` epochs and `step` steps taken)."""
        return step >= self.total_steps if self.by_steps else epoch >= self.total_epochs

    def epoch_full(self, step: int) -> bool:
        """Inside an epoch: the step budget is spent (an epochs run ends its epochs by count)."""
        return self.by_steps and step >= self.total_steps

    # ------------------------------------------------------------------ FNT
    def fnt_before_epoch(self, epoch: int, resumed_inside: bool) -> bool:
        """Enter FNT before `epoch` (epochs mode; not again when resuming inside that epoch)."""
        return not self.by_steps and epoch == self.epochs and not resumed_inside

    def fnt_before_step(self, step: int) -> bool:
        """Enter FNT before optimizer step `step` (step budget with fnt_steps)."""
        return self.by_steps and bool(self.fnt_steps) and step == self.max_steps

    def resumed_in_fnt(self, epoch: int, step: int, inside_epoch: bool) -> bool:
        """A checkpoint taken at (`epoch` epochs done, `step` steps, inside an epoch or not) lies
        after FNT began (at step max_steps, or before epoch `epochs`)."""
        if self.by_steps:
            return step > self.max_steps
        return epoch > self.epochs or (epoch == self.epochs and inside_epoch)

    def phase(self, epoch: int, step: int) -> str:
        """train | fnt, for an epoch starting at (epoch, step)."""
        if self.by_steps:
            return "train" if step < self.max_steps else "fnt"
        return "train" if epoch < self.epochs else "fnt"

    # ------------------------------------------------------------------ points
    def checkpoint_after_epoch(self, epochs_done: int, step: int) -> bool:
        """Write last.pt after an epoch: at the end of the run and every checkpoint_every epochs."""
        return self.done(epochs_done, step) or bool(
            self.checkpoint_every and epochs_done % self.checkpoint_every == 0)

    def checkpoint_at_step(self, step: int) -> bool:
        """Write a mid-epoch last.pt after optimizer step `step`."""
        return bool(self.checkpoint_steps) and step % self.checkpoint_steps == 0

    def eval_at_step(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0

    def stats_at_step(self, step: int) -> bool:
        return bool(self.stats_every) and step % self.stats_every == 0

    # ------------------------------------------------------------------ schedule, labels
    def lr_factor(self, sched, step: int) -> float:
        """The LR multiplier at optimizer step `step` (lowprec.optim.lr_factor)."""
        return lr_factor(sched, step, steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                         fnt_epochs=self.fnt_epochs, max_steps=self.max_steps,
                         fnt_steps=self.fnt_steps)

    def where_epoch(self, epoch: int, step: int) -> str:
        """The position printed at an epoch end: `step s/T` or `epoch e/E` (e 1-based)."""
        return f"step {step}/{self.total_steps}" if self.by_steps else f"epoch {epoch + 1}/{self.total_epochs}"

    def where_step(self, step: int) -> str:
        """The position printed at a step evaluation."""
        return f"step {step}/{self.total_steps if self.by_steps else '-'}"
