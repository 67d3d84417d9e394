"""RULES.md, generated from the code: `python -m prunetune.analysis.rules_doc > src/prunetune/analysis/RULES.md`."""

from __future__ import annotations

import ast
import inspect
import json
from dataclasses import dataclass

from prunetune.analysis.anomaly import ANOMALY_KINDS, KIND_DOCS
from prunetune.analysis.corpus import SCORES, markdown
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
         "flat_identical_points", "flat_converged_loss", "slow_max_rel_drop"),
        "Judged after the warm-up against the run's own noise: the window medians within the standard error of "
        "their difference (the noise read at lag 1 and 2, windows of an even count, so a high/low alternation of "
        "batches is not noise), no steady trend in the rank test of every pair of points (Mann-Kendall |z| < 2: a "
        "slow fall two windows miss), the first logged losses not beyond their own larger standard error (a fall "
        "at the very start then a plateau is learning that levelled off), and only when that noise would have "
        "shown a healthy fall (`slow_max_rel_drop`; a run still going: the share of it its plan has reached); "
        "exact repeats (losses, zero grad norms, identical evaluations, a later epoch replaying an earlier one "
        "value for value) are a frozen model unless they sit near zero after a much higher start (a loss at "
        "exactly 0.0 from its second log on is no such descent: frozen). A run that ended inside its warm-up "
        "(the LR rose all run) is judged on its whole curve.",
        ("foreign/flat_quiet/console.log", "heldout/graduate_agent_llamafactory_loss_zero_jsonl/trainer_log.jsonl", "foreign/flat_noisy/trainer_state.json", "logs/flat/console.log",
         "real/trace_llama3_identical_epochs_issue/console.log", "real/qwen05b_frozen_tiers_flat_jsonl",
         "real/olmo20m_zero_grad_flat_console/train_fresh.log", "real/token_compressor_flat_state/trainer_state.json"),
        ("foreign/converged_rounded/trainer_state.json", "foreign/noisy_healthy_batch1/trainer_state.json",
         "real/llama2_qlora_sawtooth_then_oom_notebook/output.txt", "real/luojiu7b_3epochs_state/trainer_state.json")),
    "loss_slow": RuleDoc(
        ("slow_max_rel_drop", "slow_eval_still_factor", "slow_eval_max_rel_drop", "slow_min_late_share",
         "slow_min_significance"),
        "A small fall from the run's first losses (read to the precision its noise allows, so a warm-up drop counts) "
        "is only 'LR too low' while the curve after warm-up still falls at its initial pace per unit of LR (a "
        "decaying LR slows the fall without a plateau) and the eval loss has not bottomed; a run still going is "
        "judged on the drop it reaches by its planned last step at its latest pace (what it has left to gain), "
        "and an eval loss that levelled off is a floor, not an LR limit; never beside overfitting. Under a decaying "
        "LR that leaves the second half too little exposure for its pace to show beyond the noise, the pace per "
        "unit of LR decides; a run that ended inside its warm-up is judged on its whole curve.",
        ("foreign/slow_constant_lr/trainer_log.jsonl", "heldout/cas4133_lr1e-5_2ep_slow_state/trainer_state.json",
         "heldout/codette_50steps_warmup_whole_run_state/trainer_state.json", "logs/lr_low/trainer_state.json",
         "real/mistral7b_dolly_batch1_slow_state/trainer_state.json",
         "real/rugpt3small_lora_lr1e-4_slow_notebook/output.txt"),
        ("foreign/llamafactory_sft/trainer_log.jsonl", "foreign/eval_bump/trainer_state.json",
         "real/lorapruner_5b_lr1e-4_maybewrong_recovery_console/finetune_log_5B_1e-4_maybewrong.txt",
         "real/gemma3_4b_medqa_state/trainer_state.json")),
    "loss_oscillating": RuleDoc(
        ("osc_min_log_jump", "osc_min_large_jumps", "osc_min_rel_amplitude", "osc_min_sign_changes",
         "osc_max_progress", "osc_min_level", "osc_recent_points", "min_train_points"),
        "Decided on the log scale of the data itself (75th percentile of detrended log-loss jumps between "
        "consecutive points, however many steps they span), so the lr 5e-3 run jumping 1.3 <-> 3.4 fires and "
        "batch-1 noise of +-10-20% does not; never from one outlying batch (it makes two large jumps: three are "
        "needed), never near zero; a regular saw-tooth without progress fires at smaller amplitude; a loss that "
        "reaches zero or below is read against its level only. At the end of a run the live rule is replayed "
        "over it: an oscillation that calmed later is still reported (a finetune run raised it then).",
        ("foreign/oscillating_lr5e-3/console.log", "real/llama3_cita_grit_per_step_noise_notebook/output.txt",
         "real/bert_squad_dllogger_step_loss_issue/console.log",
         "real/simpletransformers_running_loss_per_step_issue/console.log",
         "real/llama3_cita_custom_loss_runaway_notebook/output.txt"),
        ("foreign/noisy_healthy_batch1/trainer_state.json", "foreign/converged_rounded/trainer_state.json",
         "real/qwen05b_frozen_tiers_flat_jsonl", "real/vit_beans_10epochs_state/trainer_state.json")),
    "loss_diverging": RuleDoc(
        ("diverge_min_rel_rise", "diverge_noise_multiple", "diverge_min_undone", "diverge_grad_growth",
         "blowup_factor", "blowup_points", "blowup_noise_multiple"),
        "A train loss that went to +Inf and never came back diverged; a blow-up (three consecutive losses 1.5x "
        "above the level before them, beyond the relative noise) is a divergence however the curve drifts "
        "afterwards, and so is a climb at every log since the run's low to 1.5x it (beyond the relative noise: a "
        "sparse log whose windows average the fall and the rise); otherwise the last window's median against the "
        "best window median or the first losses, beyond the standard error of the difference (so the low points "
        "of an oscillation are not read as a rise) and giving back a tenth of the run's fall at least (a "
        "memorised or multi-epoch run's creep gives back a few percent: no LR fault), or with the gradient norm "
        "grown tenfold (independent evidence of the instability); with two or three points (per-epoch tables), "
        "train and eval loss both 1.5x above their first values.",
        ("logs/lr_high/console.log", "heldout/entrenar_qwen3_qlora_diverge_after_220_issue/console.log",
         "heldout/text_simplification_end_rise_state/trainer_state.json", "real/mlx_lora_blowup_then_drift_issue/console.log",
         "real/llama2_custom_batch1_rising_state/trainer_state.json",
         "real/fastai_transformerxl_epoch2_blowup_issue/console.log",
         "real/crystal_llm_13b_lr5e-4_rises_issue/console.log", "real/vicuna_lora_loss_inf_nan_issue/console.log"),
        ("foreign/noisy_healthy_batch1/trainer_state.json", "foreign/eval_bump/trainer_state.json",
         "real/qwen05b_frozen_tiers_flat_jsonl", "real/chatglm_ptuning_131epochs_memorise_state/trainer_state.json",
         "heldout/stanford_alpaca_full_ft_staircase_state/trainer_state.json")),
    "overfitting": RuleDoc(
        ("overfit_min_evals", "overfit_consecutive_rises", "overfit_min_rel_rise", "overfit_sustained_rel_rise",
         "overfit_train_max_rel_change", "overfit_memorise_loss", "memorise_negative_tolerance", "overfit_memorise_drop"),
        "After the eval minimum: consecutive rises, or every evaluation since staying clearly above it, while the "
        "train loss does not rise over the same span since the best (both rising is divergence; with an eval at "
        "every step the last two span only batch noise); a transient bump that comes back to a new best is "
        "not enough. Judged per eval set; the best step is named. A language-model train loss that reached near zero "
        "(its lowest running median, a hair below zero counting as zero) from a first logged loss ten times higher "
        "is memorisation, also when it creeps back up, but only where it holds there (the low tail of a noisy "
        "curve is not a level).",
        ("foreign/llamafactory_overfit", "heldout/qa_unsloth_eval_every_step_rises_state/trainer_state.json",
         "heldout/unsloth_60_steps_loss_to_zero_nan_grad_state/trainer_state.json", "foreign/eval_sets/trainer_state.json",
         "foreign/converged_rounded/trainer_state.json", "logs/overfitting/console.log",
         "real/qwen7b_medical_llamafactory_dir", "real/mistral7b_chatdoctor_epoch2_overfit_notebook/output.txt",
         "real/phi4_lora_20epochs_llamafactory_console/training_v3.log",
         "real/gpt_100epochs_memorise_state/trainer_state.json"),
        ("foreign/eval_bump/trainer_state.json", "foreign/wanda_block/lora_training.log",
         "real/llama3_unsloth_dpo_per_step_notebook/output.txt",
         "heldout/qwen25vl_chartqa_string_dicts_notebook/output.txt")),
    "eval_far_above_train": RuleDoc(
        ("far_min_gap", "far_min_ratio", "far_consecutive_evals"),
        "A gap of more than 2x in perplexity at consecutive evaluations: a healthy LoRA run's held-out loss sits "
        "0.3-0.6 nats above its train loss.",
        ("foreign/far_above/trainer_state.json",
         "real/lorapruner_4.5b_lr1e-4_recovery_console/finetune_log_4.5B_1e-4.txt"),
        ("foreign/wanda_block/lora_training.log", "foreign/eval_sets/trainer_state.json")),
    "nan_inf": RuleDoc(
        (), "Any non-finite loss, grad norm or eval loss, in step logs or in the end-of-run metrics; a loss of 0.0 "
            "beside a NaN grad norm (the fp16 overflow signature) or fp16 precision names the precision first.",
        ("foreign/trainer_blocks_nan/train.log", "logs/nan/console.log",
         "heldout/insightface_fp16_scale_zero_loss_nan_issue/console.log",
         "real/timemoe_loss_zero_gradnorm_nan_issue/console.log"), ("foreign/trainer_blocks_only/train.log",)),
    "out_of_memory": RuleDoc((), "An error record or an out-of-memory traceback in the console, at the last step the "
                                 "progress bar showed (0 when training was announced and no step ran); after steps "
                                 "that fit, the fixes are for what grows during a run.",
                             ("logs/oom/console.log", "real/unsloth_gemma_oom_first_step_issue/console.log"),
                             ("foreign/interrupted_traceback/console.log",)),
    "no_eval": RuleDoc((), "A note (severity info), not an alarm: a run without evaluation is a choice, not a fault, "
                           "but it cannot show overfitting, so the reader is told. End of run only, and only for a run "
                           "whose end the log shows (an excerpt or an interrupted run may simply not show its "
                           "evaluations).",
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
              "formats' published descriptions; `logs/` by real tiny Trainer runs, `make_logs.py`; `real/` is the "
              "corpus of real logs written by other people, labelled by hand before any rule ran on them); "
              "`tests/test_foreign_logs.py` checks every row.", "",
              "| kind | thresholds (default) | reason | fires on | stays quiet on |", "|---|---|---|---|---|"]
    for kind in ANOMALY_KINDS:
        rule = RULES[kind]
        names = ", ".join(f"`{n}`={getattr(DEFAULTS, n)}" for n in rule.thresholds) or "-"
        pins = "<br>".join(f"`{p}`" for p in rule.fires_on)
        quiet = "<br>".join(f"`{p}`" for p in rule.quiet_on) or "-"
        lines.append(f"| `{kind}` | {names} | {rule.reason} | {pins} | {quiet} |")
    lines += _corpus_section()
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


def _corpus_section() -> list[str]:
    """Per-kind precision and recall over each labelled corpus, as `corpus_scores.json` recorded them."""
    if not SCORES.is_file():
        return []
    recorded = json.loads(SCORES.read_text(encoding="utf-8"))
    real, heldout = recorded["real"], recorded["heldout"]
    return ["", "## Precision and recall on the real-log corpora (`tests/fixtures/real`, `tests/fixtures/heldout`)", "",
            f"`real`: {real['cases']} real logs written by other people, labelled by hand before any rule ran on them; "
            "split into a dev half and a test half by a fixed hash of each log's name (`analysis.corpus.split`). The "
            "first round tuned on the dev half only (its test-half numbers, in `bench/RESULTS.md`, were the honest "
            "estimate); the second round studied the misses of both halves, so neither half is held out any more. "
            f"`heldout`: {heldout['cases']} more logs collected and labelled apart; the first run of round 2's rules "
            "on it (kept in `bench/RESULTS.md`) is the honest estimate for logs nobody tuned for. Round 3 studied its "
            "misses, so its numbers below are dev numbers too. A kind is a true positive where the "
            "label requires it and the report says it, a false positive where the report says it and the label "
            "neither requires nor allows it; notes (`no_eval`) are information, not scored. Recorded by "
            "`python -m prunetune.analysis.corpus --record`; `tests/test_corpus_scores.py` fails when any number "
            "drops below it.", "", "### `real`", "", markdown(real).rstrip(), "", "### `heldout`", "",
            markdown(heldout).rstrip()]


if __name__ == "__main__":
    print(describe(), end="")
