"""A resumed run that asks for another learning rate trains with it: a training policy, so a callback of its own
(the monitor only observes). The Trainer restores the optimizer and schedule of the checkpoint; this rescales
them before the first resumed step (same schedule shape, new peak), and says so in a `message` record."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from prunetune.finetune.console import RunLog
from prunetune.fmt import fmt_lr


class ResumeLR(TrainerCallback):
    def __init__(self, runlog: RunLog, resume_lr: float) -> None:
        self.runlog = runlog
        self.resume_lr = resume_lr
        """The LR this session asks for: applied to the restored optimizer and schedule."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """A resumed run that asks for another LR trains with it: the restored schedule is rescaled (same shape,
        new peak) so the banner, run_config.json and the step lines all show the LR actually used."""
        scheduler, step = lr_scheduler, state.global_step
        base = getattr(scheduler, "base_lrs", None)
        if not base or optimizer is None or math.isclose(base[0], self.resume_lr, rel_tol=1e-9):
            return
        ratio = self.resume_lr / base[0]
        scheduler.base_lrs = [lr * ratio for lr in base]
        for group in optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.runlog.emit("message", step, kind="lr_changed", old_lr=base[0], new_lr=self.resume_lr,
                         message=f"LR changed on resume: peak {fmt_lr(base[0])} -> {fmt_lr(self.resume_lr)} "
                                 f"(the restored schedule keeps its shape)")
