"""Parsing the sources a user has: raw Trainer console logs (several print styles), trainer_state.json,
metrics.jsonl, and directories of them."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest

from prunetune.analysis.sources import load_source, parse_console_log, parse_python_dict
from prunetune.errors import UserError
from prunetune.rundir.records import JsonlWriter, make_record

LOGS = Path(__file__).parent / "fixtures" / "logs"


def kinds_steps(records, event):
    return [r["step"] for r in records if r["event"] == event]


def test_python_dict_variants():
    assert parse_python_dict("{'loss': 3.45, 'learning_rate': 0.0001}") == {"loss": 3.45, "learning_rate": 0.0001}
    assert parse_python_dict("{'loss': nan, 'grad_norm': inf}") == {"loss": "nan", "grad_norm": "inf"}
    assert parse_python_dict("{'loss': -inf, 'x': [nan, 1]}") == {"loss": "-inf", "x": ["nan", 1]}
    assert parse_python_dict("{'grad_norm': tensor(0.5, device='cuda:0'), 'loss': 2.0}") == {
        "grad_norm": 0.5, "loss": 2.0}
    assert parse_python_dict('{"loss": 1.5, "ok": true}') == {"loss": 1.5, "ok": True}
    assert parse_python_dict("{'loss': 'nan'}") == {"loss": "nan"}
    assert parse_python_dict("{not a dict") is None
    assert parse_python_dict("[1, 2]") is None


def test_transformers4_style_log_with_wrapping_bars_and_nan():
    text = (
        "Some startup warning {with braces that are not a dict\n"
        "  0%|          | 0/40 [00:00<?, ?it/s]\r 25%|██▌       | 10/40 [00:01<00:03,  9.50it/s]"
        "{'loss': 3.4521, 'learning_rate': 0.0001, 'epoch': 0.25}\n"
        " 25%|██▌       | 10/40 [00:01<00:03,  9.50it/s]\r 50%|█████     | 20/40 [00:02<00:02,  9.9it/s]\n"
        "{'loss': 3.1, 'grad_norm': 1.5,\n"
        " 'learning_rate': 5e-05,\n"
        " 'epoch': 0.5}\n"
        " 50%|█████     | 20/40 [00:02<00:02,  9.9it/s]\n"
        "  0%|          | 0/4 [00:00<?, ?it/s]\x1b[A\r100%|██████████| 4/4 [00:00<00:00, 50.0it/s]\x1b[A\n"
        "\x1b[A{'eval_loss': 2.3456, 'eval_runtime': 30.12, 'eval_samples_per_second': 4.2, 'epoch': 0.5}\n"
        " 50%|█████     | 20/40 [00:05<00:02,  9.9it/s]\n"
        "{'loss': nan, 'grad_norm': nan, 'learning_rate': 2e-05, 'epoch': 0.75}\n"
        " 75%|███████▌  | 30/40 [00:06<00:01,  9.9it/s]\n"
        "some unrelated line {'a': 1}\n"
    )
    records, meta = parse_console_log(text)
    assert meta["step_source"] == "bar" and meta["max_steps"] == 40
    logs = [r for r in records if r["event"] == "log"]
    assert [r["step"] for r in logs] == [10, 20, 30]
    assert logs[0]["loss"] == 3.4521 and logs[0]["lr"] == 0.0001
    assert logs[1]["grad_norm"] == 1.5 and logs[1]["epoch"] == 0.5
    assert logs[2]["loss"] == "nan"
    (ev,) = [r for r in records if r["event"] == "eval"]
    assert ev["step"] == 20 and ev["eval_loss"] == 2.3456
    assert ev["perplexity"] == pytest.approx(math.exp(2.3456))
    assert logs[0]["elapsed"] == 1.0 and logs[0]["eta_s"] == 3.0


def test_no_bars_steps_from_epochs_and_runtime():
    text = textwrap.dedent("""\
        {'loss': 3.0, 'learning_rate': 1e-4, 'epoch': 0.25}
        {'loss': 2.5, 'learning_rate': 1e-4, 'epoch': 0.5}
        {'eval_loss': 2.6, 'epoch': 0.5}
        {'loss': 2.2, 'learning_rate': 1e-4, 'epoch': 1.0}
        {'train_runtime': 10.0, 'train_steps_per_second': 10.0, 'train_loss': 2.6, 'epoch': 1.0}
        """)
    records, meta = parse_console_log(text)
    assert meta["step_source"] == "epoch"
    assert kinds_steps(records, "log") == [25, 50, 100]
    assert kinds_steps(records, "eval") == [50]


def test_no_bars_no_total_falls_back_to_ordinals():
    records, meta = parse_console_log("{'loss': 3.0}\n{'loss': 2.0}\n{'eval_loss': 2.5}\n{'loss': 1.5}\n")
    assert meta["step_source"] == "ordinal"
    assert kinds_steps(records, "log") == [1, 2, 3]
    assert kinds_steps(records, "eval") == [2]


def test_metrics_block_and_oom_traceback():
    text = textwrap.dedent("""\
        {'loss': 3.0, 'learning_rate': 1e-4, 'epoch': 0.5}
         50%|█████     | 5/10 [00:01<00:01,  5.0it/s]
        ***** eval metrics *****
          epoch                   =        1.0
          eval_loss               =     2.3456
          perplexity              =    10.4406
        Traceback (most recent call last):
          File "train.py", line 3, in <module>
        torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.
        """)
    records, _ = parse_console_log(text)
    (final,) = [r for r in records if r["event"] == "final_eval"]
    assert final["eval_loss"] == 2.3456 and final["perplexity"] == 10.4406
    (err,) = [r for r in records if r["event"] == "error"]
    assert err["kind"] == "out_of_memory" and err["step"] == 5 and "Tried to allocate" in err["message"]


def _v4_style(text: str) -> str:
    """The same log as Transformers 4.x prints it: numbers unquoted."""
    return re.sub(r"'(-?[0-9.]+(?:e-?[0-9]+)?|nan|inf)'", r"\1", text)


def _wrapped(text: str, width: int = 60) -> str:
    """Every dict line hard-wrapped at `width` columns, as a narrow terminal or a log collector does."""
    out = []
    for line in text.split("\n"):
        if line.lstrip("\x1b[A").startswith("{") and len(line) > width:
            out += [line[i : i + width] for i in range(0, len(line), width)]
        else:
            out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("variant", ["as_printed", "v4_floats", "wrapped", "wrapped_v4", "crlf"])
def test_real_log_variants_give_the_trainer_state_numbers(variant):
    text = (LOGS / "healthy" / "console.log").read_text(encoding="utf-8")
    text = {
        "as_printed": text,
        "v4_floats": _v4_style(text),
        "wrapped": _wrapped(text),
        "wrapped_v4": _wrapped(_v4_style(text)),
        "crlf": text.replace("\n", "\r\n"),
    }[variant]
    records, meta = parse_console_log(text)
    state = load_source(LOGS / "healthy" / "trainer_state.json").records
    for event, key in (("log", "loss"), ("log", "lr"), ("eval", "eval_loss")):
        got = [(r["step"], r[key]) for r in records if r["event"] == event]
        want = [(r["step"], r[key]) for r in state if r["event"] == event]
        assert [s for s, _ in got] == [s for s, _ in want], (event, key)
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=1e-3), (event, key)


def test_buffered_stdout_falls_back_to_epoch_steps():
    # `python train.py > log 2>&1` without -u: stdout (the dicts) arrives after stderr (the bars)
    text = (LOGS / "healthy" / "console.log").read_text(encoding="utf-8")
    lines = re.split(r"(\r|\n)", text)
    dicts = [ln for ln in lines if ln.startswith("{")]
    rest = [ln for ln in lines if not ln.startswith("{")]
    records, meta = parse_console_log("".join(rest) + "\n" + "\n".join(dicts) + "\n")
    assert meta["step_source"] == "epoch"
    state = load_source(LOGS / "healthy" / "trainer_state.json").records
    assert kinds_steps(records, "eval") == kinds_steps(state, "eval")
    got, want = kinds_steps(records, "log"), kinds_steps(state, "log")
    assert len(got) == len(want) and all(abs(a - b) <= 1 for a, b in zip(got, want, strict=True))


def test_trainer_state_records(tmp_path):
    src = load_source(LOGS / "overfitting" / "trainer_state.json")
    assert src.kind == "trainer_state"
    logs = [r for r in src.records if r["event"] == "log"]
    assert all(isinstance(r["step"], int) for r in src.records)
    assert logs[0]["lr"] > 0 and "learning_rate" not in logs[0]
    assert any(r["event"] == "train_end" for r in src.records)
    nan = load_source(LOGS / "nan" / "trainer_state.json").records
    assert any(r.get("loss") == "nan" for r in nan)


def test_directory_prefers_metrics_then_state_then_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text((LOGS / "healthy" / "console.log").read_text(encoding="utf-8"))
    assert load_source(run).kind == "console_log"
    (run / "trainer_state.json").write_text((LOGS / "healthy" / "trainer_state.json").read_text())
    assert load_source(run).kind == "trainer_state"
    writer = JsonlWriter(run / "metrics.jsonl")
    writer.write(make_record("log", 1, loss=3.0, lr=1e-4))
    writer.close()
    assert load_source(run).kind == "metrics_jsonl"
    assert load_source(run, prefer="console_log").kind == "console_log"


def test_checkpoint_trainer_state_found(tmp_path):
    for step in (8, 16):
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = json.loads((LOGS / "healthy" / "trainer_state.json").read_text())
        state["log_history"] = [h for h in state["log_history"] if h["step"] <= step]
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    src = load_source(tmp_path)
    assert src.path.parent.name == "checkpoint-16"
    assert max(r["step"] for r in src.records) == 16


def test_metrics_jsonl_with_crash_takes_oom_from_train_log(tmp_path):
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write(make_record("log", 10, loss=3.0, lr=1e-4))
    writer.close()
    (tmp_path / "train.log").write_text("Step 10\ntorch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB\n")
    src = load_source(tmp_path)
    assert [r for r in src.records if r["event"] == "error"][0]["kind"] == "out_of_memory"


@pytest.mark.parametrize("content", ["", "hello\nworld\n", "{'foo': 1}\n", "\x00\x01binary"])
def test_nothing_usable_is_a_user_error(tmp_path, content):
    path = tmp_path / "x.log"
    path.write_text(content)
    with pytest.raises(UserError, match="no training records"):
        load_source(path)


def test_missing_and_bad_json_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_source(tmp_path / "nope")
    (tmp_path / "trainer_state.json").write_text("{broken")
    with pytest.raises(UserError, match="JSON"):
        load_source(tmp_path / "trainer_state.json")
    (tmp_path / "s.json").write_text('{"no_history": 1}')
    with pytest.raises(UserError, match="log_history"):
        load_source(tmp_path / "s.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no usable training records"):
        load_source(empty)


def test_notebook_table_copied_from_jupyter():
    text = (
        "[300/300 01:02, Epoch 3/3]\n"
        "Step\tTraining Loss\tValidation Loss\n"
        "100\t2.456700\t2.401200\n"
        "200\t2.101000\t2.250000\n"
        "300\t1.901000\t2.260000\n"
        "TrainOutput(global_step=300, training_loss=2.1)\n"
    )
    records, meta = parse_console_log(text)
    assert meta["step_source"] == "table"
    assert [(r["step"], r["loss"]) for r in records if r["event"] == "log"] == [(100, 2.4567), (200, 2.101),
                                                                                 (300, 1.901)]
    assert [(r["step"], r["eval_loss"]) for r in records if r["event"] == "eval"] == [(100, 2.4012), (200, 2.25),
                                                                                      (300, 2.26)]
    no_log = parse_console_log("Step | Training Loss | Validation Loss\n10 | No log | 3.5\n20 | 3.1 | 3.2\n")[0]
    assert [r["event"] for r in no_log] == ["eval", "log", "eval"]


def test_announced_total_steps_and_named_eval_loss():
    text = textwrap.dedent("""\
        ***** Running training *****
          Num examples = 1,000
          Num Epochs = 1
          Total optimization steps = 1,000
        {'loss': 3.0, 'epoch': 0.5}
        {'eval_wiki_loss': 2.9, 'eval_wiki_runtime': 1.0, 'epoch': 0.5}
        {'loss': 2.0, 'epoch': 1.0}
        """)
    records, meta = parse_console_log(text)
    assert meta["max_steps"] == 1000 and meta["step_source"] == "epoch"
    assert kinds_steps(records, "log") == [500, 1000]
    (ev,) = [r for r in records if r["event"] == "eval"]
    assert ev["step"] == 500 and ev["eval_loss"] == 2.9


def test_resumed_run_log_keeps_the_later_lines():
    # the run was stopped after step 40 and resumed from checkpoint-20: tqdm starts again at 20/60
    text = (LOGS / "healthy" / "console.log").read_text(encoding="utf-8")
    cut = text.index("{'loss'", text.index(" 40/60 ["))
    resume = text.index(" 20/60 [")
    resumed = text[:cut] + "\n^C KeyboardInterrupt\n" + text[resume:]
    records, meta = parse_console_log(resumed)
    want, _ = parse_console_log(text)
    assert meta["step_source"] == "bar" and meta["superseded"] > 0
    key = [(r["event"], r["step"], r.get("loss"), r.get("eval_loss")) for r in records if r["event"] in ("log", "eval")]
    assert key == [(r["event"], r["step"], r.get("loss"), r.get("eval_loss")) for r in want
                   if r["event"] in ("log", "eval")]


def test_metrics_blocks_behind_a_logger_prefix_and_eval_items_without_dashes():
    text = "INFO:__main__:***** eval metrics *****\nINFO:__main__:  eval_loss = nan\nINFO:__main__:  epoch = 3.0\n"
    (rec,) = parse_console_log(text)[0]
    assert rec["event"] == "final_eval" and rec["eval_loss"] == "nan" and rec["perplexity"] == "nan"
    (ev,) = parse_console_log("Eval at step 100:\n  Eval Loss: 2.5\n  PPL: 12.18\n")[0]
    assert (ev["step"], ev["eval_loss"], ev["perplexity"]) == (100, 2.5, 12.18)
