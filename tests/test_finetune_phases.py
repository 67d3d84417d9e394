"""The finetune phases that decide cost and precision: `--dtype auto` and its reason, the final evaluation
reusing the evaluation of the same weights, and the per-step checks that run only when their result is used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunetune.devices import resolve_dtype
from prunetune.finetune import callbacks
from prunetune.finetune.trainer import PrunetuneTrainer
from prunetune.rundir.records import read_jsonl
from test_finetune import make_pruned_dir, run, small_config


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_pruned_dir(tiny_model_dir, tmp_path_factory.mktemp("pruned"))


QUICK = dict(max_steps=2, eval_strategy="no", load_best_model_at_end=False, probe_steps=0)


@pytest.mark.parametrize(("settings", "expect"), [
    ({}, None),  # auto: whatever devices.resolve_dtype says for this CPU, with its reason
    ({"bf16": True}, ("bf16", "requested (--bf16)")),
    ({"dtype": "float32"}, ("fp32", "requested (--dtype float32)")),
])
def test_precision_and_its_reason_in_banner_and_run_config(pruned_dir, shared_data, tmp_path, settings, expect):
    out = tmp_path / "run"
    _, console = run(small_config(pruned_dir, out, shared_data, **QUICK, **settings))
    if expect is None:
        dtype, reason = resolve_dtype("auto", "cpu", "train")
        expect = ({"float32": "fp32", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")], reason)
    recorded = json.loads((out / "run_config.json").read_text())["precision"]
    assert recorded["precision"] == expect[0] and expect[1] in recorded["reason"]
    assert f"{expect[0]} on cpu ({recorded['reason']})" in console


@pytest.mark.parametrize(("method", "final_passes"), [("masked-lora", 0), ("lora", 1)])
def test_final_eval_never_evaluates_the_same_weights_twice(pruned_dir, shared_data, tmp_path, monkeypatch, method,
                                                           final_passes):
    calls = []
    original = PrunetuneTrainer.evaluate

    def counting(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrunetuneTrainer, "evaluate", counting)
    out = tmp_path / method
    run(small_config(pruned_dir, out, shared_data, method=method, max_steps=8, eval_steps=4, save_steps=4))
    records = read_jsonl(out / "metrics.jsonl")
    evals = {r["step"]: r for r in records if r["event"] == "eval"}
    best = next(r for r in records if r["event"] == "best_loaded")["best_step"]
    final = next(r for r in records if r["event"] == "final_eval")
    assert final["reused_eval_of_step"] == best
    # baseline + the evaluations during training + the deployable pass of plain LoRA only
    assert len(calls) == 1 + len(evals) + final_passes
    loss = final["adapter_eval_loss"] if method == "lora" else final["eval_loss"]
    assert loss == evals[best]["eval_loss"]


def test_weights_are_checked_only_where_they_are_used(pruned_dir, shared_data, tmp_path, monkeypatch):
    checked = []
    original = callbacks.trainable_finite

    def counting(model, params=None):
        checked.append(1)
        return original(model, params)

    monkeypatch.setattr(callbacks, "trainable_finite", counting)
    run(small_config(pruned_dir, tmp_path / "run", shared_data, max_steps=12, logging_steps=4, eval_steps=6,
                     save_steps=12, probe_steps=0))
    assert len(checked) == len({1, 4, 8, 12} | {6, 12} | {12})  # log, eval and save steps, not all 12
