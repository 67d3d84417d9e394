"""Pre-flight checks of a finetune run, before anything is written: the pruned model, the data, the block size
against the model's context, the teacher, and what the output directory holds (a free directory, a run to
resume, a finished run, an earlier attempt that never trained, or a run that must not be overwritten).

Each check is a dict `{name, ok, detail, fix}`; the `preflight` record carries them to the console.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

from prunetune import rundir
from prunetune.data import TextSplit, load_text
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.data import EVAL_SPLIT, TRAIN_SPLIT
from prunetune.finetune.distill import DistillSpec
from prunetune.finetune.resume import METRICS, ResumePoint, changed_settings, checkpoints, finished_step
from prunetune.finetune.trainer import CHECKPOINT_STAGING
from prunetune.models import context_length, load_config, load_tokenizer
from prunetune.oserrors import link_problem
from prunetune.recovery import registry as recovery_methods
from prunetune.rundir import RUN_CONFIG, TRAIN_LOG
from prunetune.rundir.records import read_jsonl

COMMAND = "prunetune finetune"
# What a run writes into its directory besides its checkpoints: listed in the directory's marker before they are
# written (checkpoints as each is made), so --overwrite removes exactly these, nothing else.
RUN_FILES = (METRICS, TRAIN_LOG, RUN_CONFIG, "trainer_state.json", "all_results.json",
             "train_results.json", "eval_results.json", *recovery_methods.result_dirs(), CHECKPOINT_STAGING)
# Records that show a run trained: its directory is then never replaced without --overwrite.
_TRAINED_EVENTS = ("train_start", "log", "eval", "checkpoint")

Check = dict[str, Any]


def existing_run(out: Path) -> list[str]:
    """What an earlier run left in `out`, as the directory's marker lists it (empty for a free directory), or a
    UserError for a non-empty directory without one: its files are the user's, whatever they are called."""
    if not rundir.staging.content(out):
        return []
    listed = rundir.owned_files(out)
    if listed is None:
        rundir.check_output(out)  # raises: not empty, no prunetune output
    return sorted(name for name in listed or [] if (out / name).exists())


def ever_trained(out: Path) -> bool:
    """Whether the run in `out` reached training; an attempt that stopped before (a user error, a bad
    setting) leaves nothing worth keeping and never blocks the corrected rerun."""
    if checkpoints(out) or any((out / name).exists() for name in recovery_methods.result_dirs()):
        return True
    metrics = out / METRICS
    return metrics.is_file() and any(r.get("event") in _TRAINED_EVENTS for r in read_jsonl(metrics))


def remove_run(out: Path, existing: list[str]) -> None:
    for name in existing:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _check_pruned(cfg: FinetuneConfig) -> list[Check]:
    pruned = Path(cfg.pruned).expanduser()
    problem = link_problem(pruned)
    if problem:
        return [{"name": "pruned model", "ok": False, "detail": problem, "fix": "remove or fix the link"}]
    if not (pruned / "config.json").is_file():
        return [{
            "name": "pruned model", "ok": False, "detail": f"{pruned} is not a model directory (no config.json)",
            "fix": f"prunetune prune --model smollm2-135m --method wanda --sparsity 0.5 --out {shlex.quote(str(pruned))}",
        }]
    checks: list[Check] = [{"name": "pruned model", "ok": True, "detail": f"found {pruned}"}]
    context = context_length(load_config(str(pruned), log=lambda *_: None))
    if context is not None and cfg.block_size > context:
        checks.append({"name": "block size", "ok": False,
                       "detail": f"--block-size {cfg.block_size} exceeds the model's context of {context} tokens",
                       "fix": f"--block-size {context} or less"})
    return checks


def _check_data(cfg: FinetuneConfig) -> tuple[list[Check], dict[str, TextSplit]]:
    try:
        texts = {split: load_text(cfg.dataset, split, cfg.data_dir) for split in (TRAIN_SPLIT, EVAL_SPLIT)}
    except UserError as err:
        # The message is whole: it names the problem and its own fix (never cut at a colon it happens to hold).
        return [{"name": "dataset", "ok": False, "detail": str(err), "fix": None}], {}
    detail = f"{cfg.dataset}: train {texts[TRAIN_SPLIT].origin}; validation {texts[EVAL_SPLIT].origin}"
    return [{"name": "dataset", "ok": True, "detail": detail}], texts


def _check_out(cfg: FinetuneConfig, out: Path, resume: ResumePoint | None, existing: list[str]) -> Check:
    listed = ", ".join(existing[:4])
    name = "output directory"
    if out.exists() and not out.is_dir():
        return {"name": name, "ok": False, "detail": f"{out} is a file", "fix": "choose another --out"}
    if resume is not None:
        skipped = "".join(f"; skipped {line}" for line in resume.skipped)
        return {"name": name, "ok": True, "detail": f"{out}: resuming from {resume.path.name}{skipped}"}
    finished = finished_step(out) if existing else None
    if finished is not None and not cfg.overwrite:
        return {"name": name, "ok": False, "detail": f"{out} holds a finished run (step {finished}); it is never "
                "silently overwritten or restarted", "fix": "add --overwrite to train again (replaces it), or choose "
                "another --out"}
    if existing and not ever_trained(out):
        return {"name": name, "ok": True,
                "detail": f"{out}: an earlier attempt stopped before training ({listed}); its files are replaced"}
    if existing and cfg.resume_from_checkpoint == "auto":
        # Asked to continue, but the run stopped before its first checkpoint: starting over is all there is.
        return {"name": name, "ok": True,
                "detail": f"{out}: no checkpoint to resume from; the unfinished run ({listed}) is started over"}
    if existing and cfg.overwrite:
        return {"name": name, "ok": True, "detail": f"{out}: the previous run ({listed}) is replaced (--overwrite)"}
    if existing:
        return {"name": name, "ok": False,
                "detail": f"{out} already holds a run ({listed}); it is never silently overwritten",
                "fix": "add --resume_from_checkpoint auto to continue it, --overwrite to replace it, or choose "
                       "another --out"}
    return {"name": name, "ok": True, "detail": f"{out} is free"}


def _check_same_run(cfg: FinetuneConfig, out: Path) -> list[Check]:
    """A resume continues the run it finds: settings that decide the model or the data order may not change."""
    changed = changed_settings(cfg, out)
    if not changed:
        return []
    key, old, new = changed[0]
    flag = f"--{key.replace('_', '-')}"
    rest = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    command = (f"prunetune finetune --config {shlex.quote(str(out / RUN_CONFIG))} --resume_from_checkpoint auto")
    return [{"name": "resume", "ok": False,
             "detail": f"{flag} is {new!r} but the run in {out} trains with {old!r}{rest}; a resume continues "
                       "the same run",
             "fix": f"resume with the run's own settings: {command} (--lr may change), or start a new run with "
                    "another --out"}]


def preflight_checks(
    cfg: FinetuneConfig, out: Path, resume: ResumePoint | None, teacher_spec: str | None, is_main: bool
) -> tuple[list[Check], dict[str, TextSplit], list[str]]:
    """(checks, the train/validation texts, the earlier run's files to replace when the checks pass)."""
    checks = _check_pruned(cfg)
    data_checks, texts = _check_data(cfg)
    existing = existing_run(out) if is_main else []
    checks += data_checks + [_check_out(cfg, out, resume, existing)]
    if resume is not None:
        checks += _check_same_run(cfg, out)
    if cfg.distilling and not teacher_spec:
        checks.append({"name": "teacher", "ok": False, "detail": "--distill needs the dense model",
                       "fix": "give --teacher MODEL (the pruned dir has no prune.json naming it)"})
    elif cfg.distilling and checks[0]["ok"]:
        checks.append(check_teacher(cfg, teacher_spec))
    return checks, texts, existing if resume is None else []


def check_teacher(cfg: FinetuneConfig, teacher_spec: str) -> Check:
    """The teacher fits the student for what `--distill` compares, from the configs and tokenizers alone
    (before any weight loads or file is written): logits need the same vocabulary (size and token ids),
    layer-wise needs the same depth and hidden size, and both the teacher's context to cover a block."""
    spec = DistillSpec.from_config(cfg)
    name = "teacher"
    fix = "give --teacher the dense model the pruned model was made from (its base model)"
    try:
        teacher = load_config(teacher_spec, log=lambda *_: None)
        student = load_config(str(Path(cfg.pruned).expanduser()), log=lambda *_: None)
    except UserError as err:
        return {"name": name, "ok": False, "detail": f"{teacher_spec}: {err}", "fix": fix}
    problems = []
    if spec.logits and teacher.vocab_size != student.vocab_size:
        problems.append(f"its vocabulary has {teacher.vocab_size} tokens, the student's {student.vocab_size} "
                        "(logit distillation compares the two distributions token by token)")
    if spec.layerwise:
        for key, what in (("num_hidden_layers", "decoder layers"), ("hidden_size", "hidden size")):
            t, s = getattr(teacher, key, None), getattr(student, key, None)
            if t != s:
                problems.append(f"{what} {t} vs the student's {s} (layer-wise distillation compares the hidden "
                                "states layer by layer)")
    context = context_length(teacher)
    if context is not None and cfg.block_size > context:
        problems.append(f"its context is {context} tokens, shorter than --block-size {cfg.block_size}")
    if spec.logits and not problems:
        problems += _tokenizer_problems(teacher_spec, str(Path(cfg.pruned).expanduser()))
    if problems:
        return {"name": name, "ok": False, "detail": f"{teacher_spec} does not fit the student: "
                + "; ".join(problems), "fix": fix}
    what = f"{teacher.num_hidden_layers} layers, hidden {teacher.hidden_size}, vocabulary {teacher.vocab_size}"
    return {"name": name, "ok": True, "detail": f"{teacher_spec} ({what}) fits the student for --distill {spec.mode}"}


def _tokenizer_problems(teacher_spec: str, student_spec: str) -> list[str]:
    """Logit distillation needs the same token ids: the two tokenizers' vocabularies must be the same."""
    try:
        teacher, student = load_tokenizer(teacher_spec).get_vocab(), load_tokenizer(student_spec).get_vocab()
    except UserError as err:
        return [f"its tokenizer cannot be read ({err})"]
    if teacher == student:
        return []
    differ = sum(1 for token, index in student.items() if teacher.get(token) != index)
    return [f"its tokenizer differs from the student's ({differ} of {len(student)} tokens have another id; logit "
            "distillation needs the same token ids)"]


def raise_on_failure(checks: list[Check]) -> None:
    failed = [c for c in checks if not c["ok"]]
    if failed:
        first = failed[0]
        fix = f"; fix: {first['fix']}" if first.get("fix") else ""
        raise UserError(f"{first['name']}: {first['detail']}{fix}")
