"""`Run`: what every phase of one fine-tuning run shares (the engine builds it, the phases and the end of the run
read it). A module of its own so that the engine and `finish` both import it and neither imports the other."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunetune import rundir
from prunetune.data import TextSplit
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.console import RunLog
from prunetune.finetune.precision import Precision
from prunetune.finetune.resume import PriorRun, ResumePoint
from prunetune.recovery import registry as recovery_methods
from prunetune.recovery.base import RecoveryMethod


@dataclass
class Run:
    """What every phase of one run (one session of it, after a resume) shares."""

    cfg: FinetuneConfig
    out: Path
    runlog: RunLog
    is_main: bool
    started: float
    device: str
    precision: Precision
    pruned: rundir.PrunedInfo
    resume: ResumePoint | None
    teacher_spec: str | None
    texts: dict[str, TextSplit] = field(default_factory=dict)
    prior: PriorRun = field(default_factory=PriorRun)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_source: str = ""
    method_reason: str = ""
    """Why this training method (`--method auto` resolves by the pruned pattern)."""
    base_digest: str = ""
    """Fingerprint of the pruned base (rundir.base_digest), recorded with the adapter for `merge` to check."""
    planned_steps: int | None = None
    """The run's total optimizer steps (epochs or max_steps, cut by a time budget), known after the estimate."""

    @property
    def method(self) -> RecoveryMethod:
        """The recovery method of this run (`cfg.method` is concrete once `resolve_method` ran)."""
        return recovery_methods.get(self.cfg.method)

    @property
    def resume_step(self) -> int:
        return self.resume.step if self.resume else 0

    def resume_command(self) -> str:
        return (f"prunetune finetune --config {shlex.quote(str(self.out / rundir.RUN_CONFIG))} "
                "--resume_from_checkpoint auto")
