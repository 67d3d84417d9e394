"""`prunetune monitor`: snapshots of a run in progress (partial last line) and of a finished run."""

from __future__ import annotations

import io
import math
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from prunetune.analysis.anomaly import Anomaly
from prunetune.analysis.monitor import MonitorConfig, machine_load, run_monitor, snapshot, sparkline
from prunetune.cli import main as cli_main
from prunetune.errors import UserError
from prunetune.rundir.records import JsonlWriter, make_record

LOGS = Path(__file__).parent / "fixtures" / "logs"


def _write_run(run: Path, n_logs: int = 30, finished: bool = False, partial: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    writer = JsonlWriter(run / "metrics.jsonl")
    for i in range(1, n_logs + 1):
        step = i * 10
        writer.write(make_record("log", step, loss=4 * math.exp(-i / 8) + 2, lr=1e-4, grad_norm=0.5,
                                 max_steps=600, elapsed=step * 0.3, eta_s=(600 - step) * 0.3,
                                 tokens_per_s=1500.0, memory_mb=800.0))
        if step % 100 == 0:
            v = 4 * math.exp(-i / 8) + 2.1
            writer.write(make_record("eval", step, eval_loss=v, perplexity=math.exp(v)))
    writer.write(Anomaly("loss_slow", "warning", "loss falls slowly", {"rel_drop": 0.01},
                         "raise --lr from 1e-4 to 3e-4", 150).to_record())
    if finished:
        writer.write(make_record("train_end", n_logs * 10, train_runtime=99.0))
    writer.close()
    if partial:
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"event": "log", "step": 99')  # the trainer is mid-write
    return run


def _text(cfg: MonitorConfig) -> tuple[dict, str]:
    buf = io.StringIO()
    snap = run_monitor(cfg, Console(file=buf, width=140, force_terminal=False, color_system=None))
    return snap, buf.getvalue()


def test_once_on_a_run_in_progress(tmp_path):
    run = _write_run(tmp_path / "run")
    snap, text = _text(MonitorConfig(run, once=True))
    assert not snap["finished"] and snap["step"] == 300 and snap["max_steps"] == 600
    assert "Step 300/600" in text and "50.0%" in text and "ETA 0:01:30" in text
    assert "Loss 2.094" in text and "LR 1e-4" in text and "1,500 tok/s" in text
    assert "Best so far: eval loss" in text and "at step 300" in text
    assert "[loss_slow]" in text and "raise --lr from 1e-4 to 3e-4" in text
    assert ("CPU" in text and "RAM" in text) or "GPU0" in text
    assert any(c in text for c in "▁▂▃▄▅▆▇█")
    assert "Training finished" not in text


def test_finished_run_prints_final_summary(tmp_path):
    run = _write_run(tmp_path / "run", finished=True, partial=False)
    snap, text = _text(MonitorConfig(run, once=True))
    assert snap["finished"] and snap["summary"]["time_s"] == 99.0
    assert "Training finished: 300 steps in 0:01:39" in text


def test_live_view_follows_until_train_end(tmp_path):
    run = _write_run(tmp_path / "run", n_logs=5, partial=False)

    def finish():
        time.sleep(0.4)
        writer = JsonlWriter(run / "metrics.jsonl")
        writer.write(make_record("log", 60, loss=2.5, lr=1e-4, max_steps=60))
        writer.write(make_record("train_end", 60, train_runtime=3.0))
        writer.close()

    thread = threading.Thread(target=finish)
    thread.start()
    snap, text = _text(MonitorConfig(run, interval=0.1))
    thread.join()
    assert snap["finished"] and snap["step"] == 60
    assert "Training finished" in text


def test_trainer_output_dir_without_metrics(tmp_path):
    snap, _ = _text(MonitorConfig(LOGS / "overfitting", once=True))
    assert snap["step"] == 80 and snap["best"]["step"] == 16
    assert {a["kind"] for a in snap["alerts"]} >= {"overfitting"}


def test_empty_and_missing_run_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    snap, text = _text(MonitorConfig(tmp_path / "empty", once=True))
    assert snap["records"] == 0 and "No training step logged yet" in text
    with pytest.raises(UserError, match="does not exist"):
        snapshot(tmp_path / "missing")
    with pytest.raises(UserError, match="--interval"):
        MonitorConfig(tmp_path, interval=0)


def test_cli_once(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    assert cli_main(["monitor", str(run), "--once"]) == 0
    assert "Step 300/600" in capsys.readouterr().out


def test_sparkline_and_machine_load():
    assert sparkline([3.0, 2.0, 1.0], 10) == "█▅▁"
    line = sparkline([float(i) for i in range(1000)], 50)
    assert len(line) == 50 and line[0] == "▁" and line[-1] == "█"
    assert sparkline([], 10) == "" and sparkline([2.0, 2.0], 10) == "▁▁"
    load = machine_load()
    assert load["kind"] in ("cpu", "gpu")


class _FakeNVML:
    """The few pynvml calls monitor makes, answering like one busy GPU (no NVIDIA driver here)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, fail: bool = False):
        self.fail, self.shut = fail, False

    def nvmlInit(self):
        if self.fail:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": 87})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 40 * 2**30, "total": 80 * 2**30})()

    def nvmlDeviceGetTemperature(self, h, kind):
        return 71

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100"


def test_machine_load_reads_nvml_and_falls_back_to_cpu(monkeypatch, tmp_path):
    import sys

    fake = _FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    load = machine_load()
    assert load == {"kind": "gpu", "gpus": [{"index": 0, "name": "NVIDIA H100", "util_pct": 87,
                                              "mem_used_mb": 40960.0, "mem_total_mb": 81920.0, "temp_c": 71}]}
    assert fake.shut
    run = _write_run(tmp_path / "run")
    _, text = _text(MonitorConfig(run, once=True))
    assert "GPU0 NVIDIA H100: 87% util | 40,960/81,920 MB | 71°C" in text
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML(fail=True))
    assert machine_load()["kind"] == "cpu"


def test_a_run_that_died_of_oom_ends_the_view(tmp_path):
    run = _write_run(tmp_path / "run", n_logs=12, partial=False)
    writer = JsonlWriter(run / "metrics.jsonl")
    writer.write(make_record("error", 120, kind="out_of_memory", message="Out of memory during training."))
    writer.close()
    snap, text = _text(MonitorConfig(run, interval=0.1))  # returns at once: nothing more will be written
    assert snap["finished"] and snap["ending"] == "error"
    assert "Training failed: 120 steps" in text and "[out_of_memory]" in text
    assert "last written 0:00:0" in text
