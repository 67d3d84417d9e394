"""Property tests of the log readers: whatever bytes a user hands over (arbitrary, a real log cut short, a real log
with bytes changed), `prunetune report`, `monitor` and `compare` read it or refuse it with one UserError — never
another exception; and what a format's writer prints reads back as the records it printed."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunetune.analysis.monitor import snapshot
from prunetune.analysis.report import ReportConfig, analyse
from prunetune.analysis.sources import load_source, parse_console_log, parse_python_dict
from prunetune.analysis.sources.base import MAX_STEP, step_value
from prunetune.analysis.sources.settings import key_values
from prunetune.errors import UserError
from prunetune.rundir.records import JsonlWriter, make_record

FIXTURES = Path(__file__).parent / "fixtures"
REAL = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".jsonl")
              and p.name != "labels.json" and "real" not in p.parts)
NAMES = ["console.log", "trainer_state.json", "metrics.jsonl", "trainer_log.jsonl", "x.jsonl", "notes.txt",
         "train.log"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_everything(path: Path) -> None:
    """The whole path a user runs: read the source, judge it, build the report's data; a UserError is the
    only allowed failure."""
    try:
        src = load_source(path)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip()
        return
    data = analyse(src, ReportConfig(source=path, out=path.parent / "report"))
    json.dumps(data, default=str)


def _in_dir(name: str, content: bytes) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / name
    path.write_bytes(content)
    return tmp, path


@SETTINGS
@given(name=st.sampled_from(NAMES), content=st.binary(max_size=4000))
def test_arbitrary_bytes_are_read_or_refused_in_one_line(name, content):
    tmp, path = _in_dir(name, content)
    with tmp:
        _read_everything(path)
        _read_everything(path.parent)  # the directory holding it


@SETTINGS
@given(name=st.sampled_from(NAMES), text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3000))
def test_arbitrary_text_is_read_or_refused_in_one_line(name, text):
    tmp, path = _in_dir(name, text.encode("utf-8"))
    with tmp:
        _read_everything(path)


@SETTINGS
@given(source=st.sampled_from(REAL), cut=st.floats(0, 1))
def test_a_real_log_cut_short_is_read_or_refused_in_one_line(source, cut):
    raw = source.read_bytes()
    tmp, path = _in_dir(source.name, raw[: int(len(raw) * cut)])
    with tmp:
        _read_everything(path)


@SETTINGS
@given(source=st.sampled_from(REAL), data=st.data())
def test_a_real_log_with_bytes_changed_is_read_or_refused_in_one_line(source, data):
    raw = bytearray(source.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if op == "replace" and raw:
            raw[at] = byte
        elif op == "insert":
            raw.insert(at, byte)
        elif raw:
            del raw[at]
    tmp, path = _in_dir(source.name, bytes(raw))
    with tmp:
        _read_everything(path)


absurd_numbers = st.one_of(st.integers(-(10**30), 10**400), st.floats(allow_nan=True, allow_infinity=True),
                           st.sampled_from(["1e999", "nan", "-5", "x", None, True]))


@SETTINGS
@given(step=absurd_numbers, global_step=absurd_numbers, max_steps=absurd_numbers, loss=absurd_numbers)
def test_monitor_and_report_on_a_trainer_state_with_absurd_numbers(step, global_step, max_steps, loss):
    state = {"global_step": global_step, "max_steps": max_steps,
             "log_history": [{"loss": 2.0, "step": 1}, {"loss": loss, "step": step, "learning_rate": 1e-4}]}
    tmp, path = _in_dir("trainer_state.json", json.dumps(state).encode())
    with tmp:
        _read_everything(path)
        try:
            snap = snapshot(path.parent, load=False)
        except UserError:
            return
        assert snap["step"] is None or 0 <= snap["step"] <= MAX_STEP


@given(st.one_of(absurd_numbers, st.text(max_size=20)))
def test_step_value_is_a_sane_int_or_none(value):
    step = step_value(value)
    assert step is None or (isinstance(step, int) and 0 <= step <= MAX_STEP)


# -------------------------------------------------------------------------------------------------------------
# Round trips: what a writer prints reads back as what it printed

finite = st.floats(min_value=1e-6, max_value=1e4, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(losses=st.lists(finite, min_size=1, max_size=40), every=st.integers(1, 50))
def test_trainer_state_round_trip(losses, every):
    history = [{"loss": v, "learning_rate": 1e-4, "step": every * (i + 1)} for i, v in enumerate(losses)]
    history.append({"eval_loss": losses[-1], "step": every * len(losses)})
    state = {"global_step": every * len(losses), "max_steps": every * len(losses), "log_history": history}
    tmp, path = _in_dir("trainer_state.json", json.dumps(state).encode())
    with tmp:
        src = load_source(path)
    got = [(r["step"], r["loss"]) for r in src.records if r["event"] == "log"]
    assert got == [(h["step"], h["loss"]) for h in history[:-1]]
    assert [(r["step"], r["eval_loss"]) for r in src.records if r["event"] == "eval"] == [(every * len(losses),
                                                                                          losses[-1])]


@SETTINGS
@given(losses=st.lists(finite, min_size=1, max_size=40))
def test_metrics_jsonl_round_trip(losses):
    tmp = tempfile.TemporaryDirectory()
    with tmp:
        path = Path(tmp.name) / "metrics.jsonl"
        writer = JsonlWriter(path)
        for i, v in enumerate(losses):
            writer.write(make_record("log", i + 1, loss=v, lr=1e-4))
        writer.close()
        src = load_source(path)
    assert [(r["step"], r["loss"]) for r in src.records if r["event"] == "log"] == [
        (i + 1, v) for i, v in enumerate(losses)]


@SETTINGS
@given(losses=st.lists(finite, min_size=1, max_size=30), every=st.integers(1, 20), quoted=st.booleans())
def test_trainer_console_round_trip(losses, every, quoted):
    """Dicts printed by tqdm.write (numbers as strings in Transformers 5) each followed by the bar redraw."""
    total = every * len(losses)
    lines = []
    for i, v in enumerate(losses):
        step = every * (i + 1)
        d = {"loss": str(round(v, 4)) if quoted else round(v, 4), "learning_rate": 1e-4, "epoch": step / total}
        lines += [repr(d), f" {step * 100 // total}%|#| {step}/{total} [00:01<00:01,  1.00it/s]"]
    records, meta = parse_console_log("\n".join(lines) + "\n")
    assert meta["step_source"] == "bar"
    got = [(r["step"], r["loss"]) for r in records if r["event"] == "log"]
    assert got == [(every * (i + 1), round(v, 4)) for i, v in enumerate(losses)]


json_scalars = st.one_of(st.integers(-(10**9), 10**9), finite, st.booleans(), st.text(max_size=10))


@given(st.dictionaries(st.text(min_size=1, max_size=12), json_scalars, max_size=8))
def test_python_dict_repr_round_trip(d):
    assert parse_python_dict(repr(d)) == d


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
                       st.one_of(st.integers(0, 10**6), st.booleans(), st.sampled_from(["steps", "no"])),
                       max_size=8))
def test_argument_dump_round_trip(d):
    """`TrainingArguments(a=1, b=True, c='steps')` / `Namespace(...)` reprs read back as the values printed."""
    text = ", ".join(f"{k}={v!r}" for k, v in d.items())
    assert key_values(text) == d


def test_nan_and_huge_values_in_a_trainer_state_are_evidence_not_crashes(tmp_path):
    history = [{"loss": 2.0, "step": 1}, {"loss": "NaN", "step": 2}, {"loss": 10**400, "step": 3}]
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history, "max_steps": 3, "global_step": 3}))
    data = analyse(load_source(path), ReportConfig(source=path))
    assert "nan_inf" in {a["kind"] for a in data["anomalies"]}
    assert all(math.isfinite(v) for v in data["series"]["train_loss"]["loss"])
