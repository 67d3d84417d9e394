"""The classes of mistake issue 20 found on real logs, each rebuilt as the log a user hands to `prunetune report`
(a Trainer console or a trainer_state.json written to disk and read through the report's own path): the shape
of the curve, the run's real status and steps, fixes that quote only the log's facts, headline numbers that say
what they are."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from prunetune.analysis.report import ReportConfig, analyse
from prunetune.analysis.sources import load_source
from prunetune.cli import main as cli_main


def report(path: Path, **kw) -> dict:
    return analyse(load_source(path), ReportConfig(source=path, **kw))


def kinds(data: dict) -> set[str]:
    return {a["kind"] for a in data["anomalies"]}


def state_file(tmp_path: Path, history: list[dict], name: str = "trainer_state.json", **fields) -> Path:
    state = {"global_step": max((h["step"] for h in history), default=0), "max_steps": 0, "logging_steps": 10,
             "eval_steps": 100, "train_batch_size": 8, "log_history": history, **fields}
    path = tmp_path / name
    path.write_text(json.dumps(state))
    return path


def train_logs(losses, every=10, lr=None, grad=None, epochs_total=None, max_steps=None):
    out = []
    for i, loss in enumerate(losses):
        step = every * (i + 1)
        entry = {"loss": round(loss, 4), "learning_rate": lr(step) if callable(lr) else (lr or 1e-4),
                 "grad_norm": grad(step) if callable(grad) else 1.0, "step": step}
        if epochs_total and max_steps:
            entry["epoch"] = round(step / max_steps * epochs_total, 4)
        out.append(entry)
    return out


def console(entries, total: int, header: str = "", tail: str = "") -> str:
    """A Trainer console: each dict printed by tqdm.write, the training bar redrawn after it at its step."""
    lines = [header] if header else []
    for e in entries:
        step = e.get("step")
        d = {k: v for k, v in e.items() if k != "step"}
        lines.append(repr(d).replace("nan", "nan"))
        if step is not None:
            lines.append(f" {step * 100 // total:3d}%|#         | {step}/{total} [00:10<00:30,  1.00it/s]")
    return "\n".join(lines) + "\n" + tail


# -------------------------------------------------------------------------------------------------------------
# 1. The shape of the curve


def test_a_blow_up_after_the_first_update_is_diverging_however_it_drifts_later(tmp_path):
    # 3.0 -> 14-15 at the first updates (grad norms 200-340), then a long drift down from the peak
    losses = [3.0, 14.6, 15.1, 14.2] + [14.0 * math.exp(-i / 12) + 2.6 for i in range(40)]
    grads = lambda s: 340.0 if s <= 40 else 4.0  # noqa: E731
    path = state_file(tmp_path, train_logs(losses, grad=grads), max_steps=440, global_step=440)
    data = report(path)
    assert "loss_diverging" in kinds(data)
    div = next(a for a in data["anomalies"] if a["kind"] == "loss_diverging")
    assert div["evidence"]["first_loss"] == 3.0 and div["evidence"]["peak_loss"] >= 14.6
    assert "blew up" in div["message"]
    assert data["verdicts"]["train_loss"]["label"] == "rising"
    assert "suits" not in json.dumps(data["verdicts"])


def test_eval_that_bottomed_then_rose_through_epoch_3_is_overfitting_and_never_asks_for_a_higher_lr(tmp_path):
    rng = random.Random(3)
    # three epochs of 400 steps; the train loss falls within each epoch and drops at each epoch boundary
    losses = []
    for epoch in range(3):
        base = [2.4, 1.75, 1.35][epoch]
        losses += [base - 0.15 * i / 40 + rng.gauss(0, 0.01) for i in range(40)]
    history = train_logs(losses, every=10, lr=lambda s: 1e-4 * (1 - s / 1200), epochs_total=3, max_steps=1200)
    evals = [2.6, 2.45, 2.37, 2.32, 2.28, 2.25, 2.23, 2.21, 2.24, 2.29, 2.35, 2.42]
    for i, ev in enumerate(evals):
        history.append({"eval_loss": ev, "step": 100 * (i + 1), "epoch": (i + 1) / 4})
    history.sort(key=lambda h: (h["step"], "eval_loss" in h))
    data = report(state_file(tmp_path, history, max_steps=1200, global_step=1200))
    found = kinds(data)
    assert "overfitting" in found and "loss_slow" not in found
    over = next(a for a in data["anomalies"] if a["kind"] == "overfitting")
    assert over["evidence"]["best_eval_step"] == 800 and "step 800" in over["message"]
    assert "step 800" in over["fix"]
    assert data["verdicts"]["eval_loss"]["label"] == "rising"
    assert not any("raise" in a["fix"] and "learning_rate" in a["fix"] for a in data["anomalies"])


def test_a_healthy_sft_run_whose_warm_up_drop_is_most_of_its_fall_is_not_slow(tmp_path):
    rng = random.Random(4)
    n = 60
    warm = 6

    def lr(step):
        return 2e-5 * min(1.0, step / (warm * 10)) * (0.5 + 0.5 * math.cos(math.pi * min(1.0, step / (n * 10))))

    losses = [3.91 - (3.91 - 2.05) * min(1.0, i / warm) ** 0.7 + rng.gauss(0, 0.02) for i in range(warm)]
    losses += [2.05 - 0.21 * (i / (n - warm)) + rng.gauss(0, 0.02) for i in range(n - warm)]
    data = report(state_file(tmp_path, train_logs(losses, lr=lr), max_steps=600, global_step=600))
    assert "loss_slow" not in kinds(data)
    verdict = data["verdicts"]["train_loss"]
    assert verdict["label"] == "decreasing steadily"
    assert int(re.search(r"fell (\d+)%", verdict["reason"]).group(1)) >= 40  # not the 9.7% of two late windows


def test_a_lora_run_that_fell_8_percent_at_a_decaying_lr_still_falling_is_slow(tmp_path):
    rng = random.Random(5)
    total = 125

    def lr(step):
        return 1e-5 * (1 - step / total)

    # the loss falls in proportion to the LR it is given: LR-limited all run long
    exposure = [sum(lr(s) for s in range(1, 5 * (i + 1) + 1)) for i in range(25)]
    losses = [2.5 - 0.19 * e / exposure[-1] + rng.gauss(0, 0.003) for e in exposure]
    path = state_file(tmp_path, train_logs(losses, every=5, lr=lr), max_steps=total, global_step=total,
                      logging_steps=5)
    data = report(path)
    assert "loss_slow" in kinds(data), data["anomalies"]
    slow = next(a for a in data["anomalies"] if a["kind"] == "loss_slow")
    assert "--learning_rate from 9.6e-6" in slow["fix"]  # the peak the log reports (no config in it)
    assert any("peak learning rate the log reports" in b for b in slow["basis"])


def test_a_30_step_run_whose_loss_rose_is_never_decreasing(tmp_path):
    losses = [6.247 + 0.0004 * i + (0.01 if i % 2 else -0.01) for i in range(30)]
    data = report(state_file(tmp_path, train_logs(losses, every=1), max_steps=30, global_step=30, logging_steps=1))
    verdict = data["verdicts"]["train_loss"]
    assert verdict["symbol"] != "✅" and "decreasing" not in verdict["label"].replace("not decreasing", "")
    assert "+0." in verdict["reason"] or "too few" in verdict["label"]


# -------------------------------------------------------------------------------------------------------------
# 2. The run's real status and the step of its events


def test_trainer_state_that_stops_short_of_max_steps_but_says_it_stopped_is_finished(tmp_path):
    losses = [2.0 * math.exp(-i / 20) + 1.0 for i in range(33)]
    history = train_logs(losses, every=30)  # the last log at 990 of 1000
    control = {"TrainerControl": {"args": {"should_training_stop": True}, "attributes": {}}}
    data = report(state_file(tmp_path, history, max_steps=1000, global_step=1000, logging_steps=30,
                             stateful_callbacks=control))
    assert data["summary"]["status"] == "finished"
    assert not any("did not finish" in n for n in data["notes"])


def test_a_traceback_after_training_completed_is_a_finished_run_with_a_note(tmp_path):
    entries = [{"loss": 3.0 - 0.02 * i, "learning_rate": 1e-4, "epoch": i / 50, "step": 10 * i} for i in range(1, 51)]
    entries.append({"train_runtime": 100.0, "train_samples_per_second": 8.0, "train_steps_per_second": 5.0,
                    "train_loss": 2.5, "epoch": 1.0, "step": 500})
    tail = ("Training completed. Do not forget to share your model on huggingface.co/models =)\n\n"
            "***** train metrics *****\n  epoch = 1.0\n  train_loss = 2.5\n  train_runtime = 0:01:40.00\n"
            "Traceback (most recent call last):\n  File \"train.py\", line 90, in <module>\n"
            "    trainer.push_to_hub()\nrequests.exceptions.ConnectionError: HTTPSConnectionPool(host='huggingface.co')\n")
    log = tmp_path / "console.log"
    log.write_text(console(entries, 500, tail=tail))
    data = report(log)
    assert data["summary"]["status"] == "finished" and data["summary"]["steps"] == 500
    assert any("traceback came after training had ended" in n and "ConnectionError" in n for n in data["notes"])


def test_training_completed_far_before_its_plan_without_early_stopping_was_stopped_on_request(tmp_path):
    # a web UI's Abort sets should_training_stop: the Trainer prints "Training completed." at step ~2100 of 17000
    entries = [{"loss": round(2.3 * math.exp(-i / 30) + 0.01, 4), "learning_rate": 5e-5, "epoch": i / 17,
                "step": 5 * i} for i in range(1, 421)]
    tail = "Training completed. Do not forget to share your model on huggingface.co/models =)\n"
    log = tmp_path / "console.log"
    log.write_text(console(entries, 17000, tail=tail))
    data = report(log)
    assert data["summary"]["status"] == "interrupted" and data["summary"]["stopped_reason"] == "stopped on request"
    # the same end after evaluations that stopped improving is early stopping: a finished run
    evals = [{"eval_loss": v, "epoch": i / 4, "step": 500 * i} for i, v in enumerate([1.9, 1.7, 1.75, 1.8], 1)]
    ordered = sorted(entries + evals, key=lambda e: (e["step"], "eval_loss" in e))
    log.write_text(console(ordered, 17000, tail=tail))
    assert report(log)["summary"]["status"] == "finished"
    # a run that ends a few steps short of its printed total (a last, partial accumulation dropped) finished
    short = [{"loss": round(2.0 - 0.001 * i, 4), "learning_rate": 5e-5, "epoch": i / 100, "step": i}
             for i in range(1, 99)]
    log.write_text(console(short, 100, tail=tail))
    assert report(log)["summary"]["status"] == "finished"


def test_a_notebook_trainer_progress_line_is_the_training_bar(tmp_path):
    rows = "".join(f"<tr><td>{10 * i}</td><td>{2.8 - 0.04 * i:.6f}</td></tr>" for i in range(1, 31))
    table = f"<table><thead><tr><th>Step</th><th>Training Loss</th></tr></thead><tbody>{rows}</tbody></table>"
    outer = "Training characters:   0%|          | 0/1 [00:00<?, ?it/s]\n"  # the user's loop around train()
    log = tmp_path / "output.txt"
    log.write_text(outer + "<progress value='300' max='300'></progress>\n[300/300 2:26:36, Epoch 3/3]\n" + table)
    data = report(log)
    assert data["summary"]["max_steps"] == 300 and data["summary"]["status"] == "finished"
    # tqdm pads the count to the width of the total: a notebook saved at 90 of 495 steps
    log.write_text("[ 90/495 07:24 < 34:04, 0.20 it/s, Epoch 0.18/1]\n" + table.replace("<td>300</td>", "<td>90</td>"))
    data = report(log)
    assert data["summary"]["max_steps"] == 495 and data["summary"]["status"] == "interrupted"


def test_fastai_total_time_closes_the_fit(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("Total time: 110:29:25\nepoch\ttrain_loss\tvalid_loss\taccuracy\n1\t2.760716\t2.756633\t0.442434\n"
                   "2\t6.228361\t6.220452\t0.076458\n")
    data = report(log)
    assert data["summary"]["status"] == "finished" and kinds(data) == {"loss_diverging"}


def test_nan_is_placed_at_its_progress_bar_step_not_an_epoch_guess(tmp_path):
    header = ("***** Running training *****\n  Num examples = 49,992\n  Num Epochs = 3\n"
              "  Instantaneous batch size per device = 8\n  Gradient Accumulation steps = 1\n"
              "  Total optimization steps = 6,249\n")
    entries = [{"loss": 2.5 - 0.01 * i, "grad_norm": 1.2, "learning_rate": 5e-5, "epoch": round(10 * i / 2083, 2),
                "step": 10 * i} for i in range(1, 8)]
    entries += [{"loss": 0.0, "grad_norm": float("nan"), "learning_rate": 5e-5, "epoch": round(10 * i / 2083, 2),
                 "step": 10 * i} for i in range(8, 12)]
    text = console(entries, 6249, header=header) + "Traceback (most recent call last):\nKeyboardInterrupt\n"
    log = tmp_path / "console.log"
    log.write_text(text.replace("nan}", "nan}").replace("'grad_norm': nan", "'grad_norm': nan"))
    data = report(log)
    nan = next(a for a in data["anomalies"] if a["kind"] == "nan_inf")
    assert nan["step"] == 80 and "about step" not in nan["message"]
    assert data["summary"]["status"] == "interrupted" and data["summary"]["steps"] == 110
    # a loss of 0.0 beside NaN gradients at lr 5e-5: the fp16 overflow signature, precision first
    assert "bf16" in nan["fix"].split(";")[0] and "fp16 overflow" in nan["message"]
    assert data["verdicts"]["train_loss"]["label"] == "NaN/Inf"
    assert "LR far too high" not in json.dumps(data)


def test_out_of_memory_after_500_steps_is_placed_there_with_fixes_for_what_grows(tmp_path):
    entries = [{"loss": 3.0 - 0.002 * i, "learning_rate": 1e-4, "epoch": i / 150, "step": 10 * i}
               for i in range(1, 51)]
    text = console(entries, 1500) + (" 33%|###       | 501/1500 [10:00<20:00,  1.20s/it]Traceback (most recent call "
                                     "last):\n  File \"train.py\", line 3\ntorch.OutOfMemoryError: CUDA out of memory. "
                                     "Tried to allocate 2.00 GiB.\n")
    log = tmp_path / "console.log"
    log.write_text(text)
    data = report(log)
    oom = next(a for a in data["anomalies"] if a["kind"] == "out_of_memory")
    assert oom["step"] == 501 and "of 1500" in oom["message"]
    assert "the first 501 steps fit" in oom["fix"]
    assert data["summary"]["status"] == "failed"


def test_steps_printed_in_chunks_apart_from_the_bar_are_spread_and_said_to_be_estimates(tmp_path):
    # stdout block-buffered apart from the bars on stderr: dicts arrive in chunks of five behind the bar
    header = "***** Running training *****\n  Num Epochs = 1\n  Total optimization steps = 300\n"
    lines = [header]
    for chunk in range(6):
        for i in range(5):
            step = (chunk * 5 + i + 1) * 10
            lines.append(repr({"loss": round(3.0 * math.exp(-step / 200) + 1.5, 4), "learning_rate": 1e-4,
                               "epoch": step / 300}))
        top = (chunk + 1) * 50
        lines.append(f" {top * 100 // 300:3d}%|###       | {top}/300 [00:10<00:30,  1.00it/s]")
    lines.append(repr({"train_runtime": 60.0, "train_steps_per_second": 5.0, "train_loss": 2.0, "epoch": 1.0}))
    log = tmp_path / "console.log"
    log.write_text("\n".join(lines) + "\n")
    data = report(log)
    steps = [r["step"] for r in load_source(log).records if r["event"] == "log"]
    assert steps == [10 * (i + 1) for i in range(30)]
    assert data["summary"]["steps_estimated"] and any("estimated" in n for n in data["notes"])


# -------------------------------------------------------------------------------------------------------------
# 3. Fixes from facts


def test_fixes_quote_the_accumulation_and_warm_up_the_log_states(tmp_path):
    dump = ("TrainingArguments(\n_n_gpu=1,\nbf16=False,\nfp16=False,\ngradient_accumulation_steps=128,\n"
            "learning_rate=0.005,\nlogging_steps=10,\nmax_grad_norm=1.0,\nwarmup_ratio=0.1,\nwarmup_steps=0,\n)\n")
    rng = random.Random(8)
    entries = [{"loss": round(2.2 + (1.1 if i % 2 else -0.9) * rng.uniform(0.6, 1.0), 4),
                "learning_rate": 0.005 * min(1.0, i / 4), "epoch": i / 40, "step": 10 * i} for i in range(1, 41)]
    log = tmp_path / "console.log"
    log.write_text(console(entries, 400, header=dump))
    data = report(log)
    osc = next(a for a in data["anomalies"] if a["kind"] in ("loss_oscillating", "loss_diverging"))
    assert "--gradient_accumulation_steps from 128 to 512" in osc["fix"]
    assert "--learning_rate from 5e-3" in osc["fix"]
    assert "from 1 to 4" not in osc["fix"] and "warm the LR up" not in osc["fix"]
    assert any("TrainingArguments(...) dump in the log" in b for b in osc["basis"])
    # the same run without the dump: the accumulation is unknown, and the fix says so
    log.write_text(console(entries, 400))
    bare = next(a for a in report(log)["anomalies"] if a["kind"] in ("loss_oscillating", "loss_diverging"))
    assert "4x" in bare["fix"] and "not in the log" in bare["fix"]


def test_no_lora_advice_for_a_run_that_is_not_lora(tmp_path):
    # a full fine-tune of an image classifier: accuracy beside a small loss, no adapter anywhere
    history = train_logs([0.9 * math.exp(-i / 10) + 0.05 for i in range(40)], every=10)
    for i, (acc, ev) in enumerate([(0.80, 0.55), (0.86, 0.45), (0.85, 0.5), (0.84, 0.56), (0.83, 0.62)]):
        history.append({"eval_loss": ev, "eval_accuracy": acc, "step": 80 * (i + 1)})
    history.sort(key=lambda h: (h["step"], "eval_loss" in h))
    path = state_file(tmp_path, history, max_steps=400, global_step=400)
    (tmp_path / "training_args.yaml").write_text("finetuning_type: full\nnum_train_epochs: 5\nweight_decay: 0.0\n")
    data = report(path)
    over = next(a for a in data["anomalies"] if a["kind"] == "overfitting")
    assert "lora" not in over["fix"].lower() and "weight_decay" in over["fix"]
    assert any("training_args.yaml" in b for b in over["basis"])


# -------------------------------------------------------------------------------------------------------------
# 4. Headline numbers that say what they are


def test_a_reloaded_early_checkpoint_is_labelled_and_the_last_evaluation_shown(tmp_path):
    entries = [{"loss": 2.6 - 0.004 * i, "learning_rate": 1e-4, "epoch": i / 50, "step": 20 * i} for i in range(1, 51)]
    evals = [(200, 2.875), (400, 2.93), (600, 2.97), (800, 2.99), (1000, 3.013)]
    out = []
    for e in entries:
        out.append(e)
        for s, v in evals:
            if s == e["step"]:
                out.append({"eval_loss": v, "epoch": s / 1000, "step": s})
    out.append({"train_runtime": 500.0, "train_loss": 2.5, "epoch": 1.0, "step": 1000})
    tail = ("Loading best model from out/checkpoint-200 (score: 2.875).\n"
            "{'eval_loss': 2.0989, 'eval_runtime': 3.0, 'epoch': 1.0}\n"
            "***** eval metrics *****\n  epoch = 1.0\n  eval_loss = 2.0989\n  perplexity = 8.167\n")
    log = tmp_path / "console.log"
    log.write_text(console(out, 1000, tail=tail))
    data = report(log)
    s = data["summary"]
    assert s["final_perplexity"] == pytest.approx(8.167)
    assert "reloaded best checkpoint (out/checkpoint-200, step 200)" in s["final_eval_of"]
    assert s["last_eval_loss"] == 3.013 and s["last_eval_step"] == 1000
    assert "overfitting" in kinds(data)


def test_a_run_without_evaluations_says_so_instead_of_step_none(tmp_path, capsys):
    path = state_file(tmp_path, train_logs([3.0 - 0.02 * i for i in range(40)]), max_steps=400, global_step=400)
    assert cli_main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "best no evaluation" in printed and "step None" not in printed
    md = (tmp_path / "r" / "report.md").read_text()
    assert "None" not in md


def test_seed_console_final_best_and_series(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "foreign" / "wanda_block" / "lora_training.log"
    log = tmp_path / "lora_training.log"
    log.write_bytes(fixture.read_bytes())
    assert cli_main(["report", str(log), "--bands", "llama2-7b"]) == 0
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    s = data["summary"]
    assert s["final_perplexity"] == 7.30 and data["perplexity_rating"]["band"] == "good"
    assert s["best_is_final"] and s["best_step"] == 1800 and s["best_eval_loss"] == pytest.approx(1.9879)
    assert "checkpoint-1800" in s["final_eval_of"]
    series = data["series"]
    ev = series["eval"]["eval"]
    assert ev["step"][:2] == [200, 400] and ev["perplexity"][0] == pytest.approx(10.44, abs=0.01)
    assert series["final_eval"][0]["step"] == 1800 and series["final_eval"][0]["perplexity"] == 7.30
    assert len(series["train_loss"]["step"]) == len(series["train_loss"]["loss"]) > 100
    assert series["lr"]["step"] and series["grad_norm"]["step"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "reloaded best checkpoint (checkpoint-1800, step 1800)" in md


def test_a_prunetune_run_never_says_its_steps_are_estimated(tmp_path):
    from prunetune.rundir.records import JsonlWriter, make_record

    run = tmp_path / "run"
    run.mkdir()
    writer = JsonlWriter(run / "metrics.jsonl")
    for i in range(1, 25):
        writer.write(make_record("log", 5 * i, loss=6.0 * math.exp(-i / 10) + 4.0, lr=3e-4, max_steps=120))
    writer.write(make_record("train_end", 120, runtime_s=10.0))
    writer.close()
    data = report(run)
    assert not data["summary"]["steps_estimated"]
    assert not any("estimated" in n for n in data["notes"])
    assert data["source"]["step_source"] == "metrics"
