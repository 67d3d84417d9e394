"""Zero-shot accuracy through lm-eval on a local multiple-choice task, checked against a count of our own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunetune.errors import UserError
from prunetune.zeroshot import PAPER_TASKS, ZeroShotConfig, format_table, parse_tasks, run_zeroshot

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "a river"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit"], 1),
    ("The opposite of hot is", ["cold", "warm", "the sun"], 0),
    ("A week has seven", ["days", "years", "rivers", "songs"], 2),
    ("The album was released in", ["1998", "the garden"], 0),
    ("He played for the football", ["club", "moon"], 1),
    ("The river flows into the", ["sea", "album", "station"], 0),
    ("She was born in the city of", ["London", "purple", "seven"], 1),
]


def write_task(directory: Path, name: str = "prunetune_mc") -> Path:
    """A multiple-choice lm-eval task over a local .jsonl: loads with the hub unreachable."""
    data = directory / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    task = directory / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return task


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as lm-eval does: the whole string, minus the context's tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
    logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(float(logp[n_ctx - 1 + i, tok]) for i, tok in enumerate(whole[n_ctx:]))


def hand_count(model, tokenizer, questions) -> tuple[float, float]:
    """acc: the choice with the highest log-likelihood is the answer; acc_norm: per character of the choice."""
    acc = norm = 0
    for question, choices, answer in questions:
        lls = [_loglikelihood(model, tokenizer, question, " " + c) for c in choices]
        acc += max(range(len(choices)), key=lambda i: lls[i]) == answer
        norm += max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == answer
    return acc / len(questions), norm / len(questions)


def test_local_task_accuracy_equals_a_hand_count(tmp_path, tiny_model_dir):
    task = write_task(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = run_zeroshot(model, tokenizer, ZeroShotConfig(tasks=(str(task),)), log=lambda _: None)
    acc, acc_norm = hand_count(model, tokenizer, QUESTIONS)
    row = result["tasks"]["prunetune_mc"]
    assert row["samples"] == len(QUESTIONS)
    assert row["acc"] == pytest.approx(acc)
    assert row["acc_norm"] == pytest.approx(acc_norm)
    assert row["acc_stderr"] is not None
    assert result["mean_acc"] == pytest.approx(acc)
    assert format_table(result)[0][0] == "prunetune_mc"

    # --limit N: only the first N examples; a task named from --task-dir works like the file.
    limited = run_zeroshot(model, tokenizer, ZeroShotConfig(tasks=("prunetune_mc",), limit=3, task_dir=str(tmp_path)),
                           log=lambda _: None)
    assert limited["tasks"]["prunetune_mc"]["samples"] == 3
    assert limited["tasks"]["prunetune_mc"]["acc"] == pytest.approx(hand_count(model, tokenizer, QUESTIONS[:3])[0])


def test_hub_task_offline_is_one_line_error(tiny_model_dir, tmp_path):
    # conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the hub dataset of a task cannot be fetched.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="hub") as err:
        run_zeroshot(model, tokenizer, ZeroShotConfig(tasks=("boolq",), limit=2), log=lambda _: None)
    assert "\n" not in str(err.value) and "local task YAML" in str(err.value)
    # A misspelt name is named before any data is fetched.
    with pytest.raises(UserError, match="unknown task 'boolqq'"):
        run_zeroshot(model, tokenizer, ZeroShotConfig(tasks=("boolq", "boolqq"), limit=2), log=lambda _: None)


def test_unknown_task_and_bad_values(tmp_path):
    with pytest.raises(UserError, match="is empty"):
        ZeroShotConfig(tasks=())
    with pytest.raises(UserError, match="--limit 0"):
        ZeroShotConfig(tasks=("boolq",), limit=0)
    with pytest.raises(UserError, match="does not exist"):
        ZeroShotConfig(tasks=(str(tmp_path / "missing.yaml"),))
    with pytest.raises(UserError, match="--task-dir"):
        ZeroShotConfig(tasks=("x",), task_dir=str(tmp_path / "nope"))
    assert parse_tasks("boolq, rte,boolq") == ("boolq", "rte")
    assert parse_tasks("paper") == PAPER_TASKS


# ---- issue 24: a local task's YAML and data are checked before any model loads, and named ----------------------


@pytest.mark.parametrize(("text", "message"), [
    ("task: bad\n  dataset_path: [json\n: :\n", r"is not valid YAML at line 2, column \d+: mapping values"),
    ("- a\n- b\n", r"holds a list, not an lm-eval task"),
    ("dataset_path: json\n", r"names no task \(no `task:` key; it has dataset_path\)"),
    ("task: t\n\x07\n", r"is not valid YAML at character \d+: character '\\x07' is not allowed"),
])
def test_a_malformed_task_file_is_named_with_its_line(tmp_path, text, message):
    """Before: a traceback (ScannerError) for a file, "unknown task" for a YAML in --task-dir."""
    task = tmp_path / "bad.yaml"
    task.write_text(text)
    with pytest.raises(UserError, match=rf"task file '{task}' {message}"):
        ZeroShotConfig(tasks=(str(task),))


@pytest.mark.slow
def test_a_malformed_yaml_in_the_task_dir_is_named_for_the_task_it_should_define(tmp_path, tiny_model_dir):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\n  dataset_path: [json\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = ZeroShotConfig(tasks=("mine",), task_dir=str(tmp_path / "tasks"))
    with pytest.raises(UserError, match=r"'mine' is not an lm-eval task and no readable YAML in --task-dir .* does not "
                                        r"read: task file .*mine.yaml' is not valid YAML at line 2"):
        run_zeroshot(model, tokenizer, cfg, log=lambda _: None)


@pytest.mark.parametrize("where", ["file", "task_dir"])
def test_a_local_task_whose_data_file_is_missing_names_it_without_the_hub(tmp_path, where):
    """Before: "hub tasks need the Hugging Face hub" for a task that never reads the hub."""
    task = write_task(tmp_path)
    (tmp_path / "mc.jsonl").unlink()
    kwargs = {"tasks": (str(task),)} if where == "file" else {"tasks": ("prunetune_mc",), "task_dir": str(tmp_path)}
    with pytest.raises(UserError) as info:
        ZeroShotConfig(**kwargs)
    text = str(info.value)
    assert f"reads its data from '{tmp_path / 'mc.jsonl'}', which does not exist" in text and "hub" not in text.replace(
        "needs no hub", "")


def test_task_yamls_with_lm_eval_tags_and_includes_are_read(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"q": "a"}\n')
    (tmp_path / "base.yaml").write_text("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
                                        "process_docs: !function utils.process\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\ntask: child\n")
    ZeroShotConfig(tasks=(str(tmp_path / "child.yaml"),))  # relative data file, !function tag, include: all fine
