"""RULES.md, generated from the code: `python -m prunetune.analysis.rules_doc > src/prunetune/analysis/RULES.md`."""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass

from prunetune.analysis.anomaly import ANOMALY_KINDS, KIND_DOCS
from prunetune.analysis.thresholds import DEFAULTS, Thresholds


@dataclass(frozen=True)
class RuleDoc:
    """How one anomaly kind is decided and what pins it."""

    thresholds: tuple[str, ...]
    """The `Thresholds` fields the rule compares against."""
    reason: str
    """Why the rule is decided that way."""
    fires_on: tuple[str, ...]
    """Fixtures (under tests/fixtures) the rule must fire on."""
    quiet_on: tuple[str, ...] = ()
    """Near-miss fixtures it must stay quiet on."""


RULES: dict[str, RuleDoc] = {
    "loss_flat": RuleDoc(
        ("min_train_points", "min_train_steps", "flat_max_rel_change", "flat_noise_multiple",
         "flat_identical_points", "flat_converged_loss"),
        "Judged against the run's own noise (standard error of window medians), so a noisy flat run is flat and a "
        "quiet one that moved 1% is not; exact repeats are a frozen model unless they sit near zero after a much "
        "higher start (memorisation printed with 4 decimals).",
        ("foreign/flat_quiet/console.log", "foreign/flat_noisy/trainer_state.json", "logs/flat/console.log"),
        ("foreign/converged_rounded/trainer_state.json", "foreign/noisy_healthy_batch1/trainer_state.json")),
    "loss_slow": RuleDoc(
        ("slow_max_rel_drop", "slow_eval_still_factor", "slow_eval_max_rel_drop", "slow_min_late_share",
         "slow_min_significance"),
        "A small drop is only 'LR too low' while the curve is still falling at its initial pace (no plateau); "
        "up to 16% when the eval loss barely moves either.",
        ("foreign/slow_constant_lr/trainer_log.jsonl", "logs/lr_low/trainer_state.json"),
        ("foreign/llamafactory_sft/trainer_log.jsonl", "foreign/eval_bump/trainer_state.json")),
    "loss_oscillating": RuleDoc(
        ("osc_min_log_jump", "osc_min_rel_amplitude", "osc_min_sign_changes", "osc_max_progress", "osc_min_level",
         "osc_recent_points"),
        "Decided on the log scale of the data itself (75th percentile of detrended log-loss jumps), so the "
        "lr 5e-3 run jumping 1.3 <-> 3.4 fires and batch-1 noise of +-10-20% does not; a regular saw-tooth "
        "without progress fires at smaller amplitude.",
        ("foreign/oscillating_lr5e-3/console.log",),
        ("foreign/noisy_healthy_batch1/trainer_state.json", "foreign/converged_rounded/trainer_state.json")),
    "loss_diverging": RuleDoc(
        ("diverge_min_rel_rise", "diverge_noise_multiple"),
        "The last window's median against the best window median (or the untrained first loss), beyond the "
        "noise, so the low points of an oscillation are not read as a rise.",
        ("logs/lr_high/console.log",),
        ("foreign/noisy_healthy_batch1/trainer_state.json", "foreign/eval_bump/trainer_state.json")),
    "overfitting": RuleDoc(
        ("overfit_min_evals", "overfit_consecutive_rises", "overfit_min_rel_rise", "overfit_train_max_rel_change",
         "overfit_memorise_loss", "overfit_memorise_drop"),
        "Consecutive eval rises while the train loss does not rise (both rising is divergence); one transient "
        "bump is not enough. Judged per eval set. A train loss converged near zero is memorisation.",
        ("foreign/llamafactory_overfit", "foreign/eval_sets/trainer_state.json",
         "foreign/converged_rounded/trainer_state.json", "logs/overfitting/console.log"),
        ("foreign/eval_bump/trainer_state.json", "foreign/wanda_block/lora_training.log")),
    "eval_far_above_train": RuleDoc(
        ("far_min_gap", "far_min_ratio", "far_consecutive_evals"),
        "A gap of more than 2x in perplexity at consecutive evaluations: a healthy LoRA run's held-out loss sits "
        "0.3-0.6 nats above its train loss.",
        ("foreign/far_above/trainer_state.json",),
        ("foreign/wanda_block/lora_training.log", "foreign/eval_sets/trainer_state.json")),
    "nan_inf": RuleDoc(
        (), "Any non-finite loss, grad norm or eval loss, in step logs or in the end-of-run metrics.",
        ("foreign/trainer_blocks_nan/train.log", "logs/nan/console.log"), ("foreign/trainer_blocks_only/train.log",)),
    "out_of_memory": RuleDoc((), "An error record or an out-of-memory traceback in the console.",
                             ("logs/oom/console.log",), ("foreign/interrupted_traceback/console.log",)),
    "no_eval": RuleDoc((), "End of run only: a finished run that never evaluated cannot show overfitting.",
                       ("logs/no_eval/console.log",), ("foreign/trainer_blocks_only/train.log",)),
}


def describe() -> str:
    """Markdown of the anomaly vocabulary and every threshold with its default and meaning, read from this
    module's source so the documentation cannot drift from the code (RULES.md is this text)."""
    lines = ["# Diagnosis rules (`prunetune.analysis.rules`)", "",
             "Generated by `python -m prunetune.analysis.rules_doc`; used live by `prunetune finetune` and by "
             "`prunetune report`.", "", "## Anomaly kinds", "", "| kind | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {KIND_DOCS[k]} |" for k in ANOMALY_KINDS]
    lines += ["", "## How each rule decides, and the fixtures that pin it", "",
              "Fixtures are under `tests/fixtures` (`foreign/` is written by `make_foreign_logs.py` from the "
              "formats' published descriptions; `logs/` by real tiny Trainer runs, `make_logs.py`); "
              "`tests/test_foreign_logs.py` checks every row.", "",
              "| kind | thresholds (default) | reason | fires on | stays quiet on |", "|---|---|---|---|---|"]
    for kind in ANOMALY_KINDS:
        rule = RULES[kind]
        names = ", ".join(f"`{n}`={getattr(DEFAULTS, n)}" for n in rule.thresholds) or "-"
        pins = "<br>".join(f"`{p}`" for p in rule.fires_on)
        quiet = "<br>".join(f"`{p}`" for p in rule.quiet_on) or "-"
        lines.append(f"| `{kind}` | {names} | {rule.reason} | {pins} | {quiet} |")
    lines += ["", "## Thresholds (`Thresholds` fields; override with `--threshold NAME=VALUE` in report, "
              "`--alert-threshold NAME=VALUE` in finetune)", "", "| name | default | meaning |", "|---|---|---|"]
    body = ast.parse(inspect.getsource(Thresholds)).body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = body[i + 1] if i + 1 < len(body) else None
            text = doc.value.value if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) else ""
            text = " ".join(str(text).split()).replace("|", "\\|")
            lines.append(f"| `{node.target.id}` | {ast.unparse(node.value)} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(describe(), end="")
