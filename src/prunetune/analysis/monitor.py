"""`prunetune monitor`: follow a run directory from another terminal (replaces `tail -f`, `watch nvidia-smi`).

`snapshot()` reads the records (tolerating a partial last line) and the machine load into a plain dict;
`render()` turns a snapshot into rich renderables. The loop only re-reads and re-renders.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from prunetune.analysis.context import fix_context
from prunetune.analysis.rules import diagnose
from prunetune.analysis.sources import load_source
from prunetune.analysis.sources.base import clean_record, step_value
from prunetune.analysis.sources.jsonl import read_jsonl
from prunetune.analysis.sources.loader import settings_beside
from prunetune.analysis.summary import Summary, summarize
from prunetune.errors import UserError
from prunetune.fmt import fmt_lr, fmt_sig, hms
from prunetune.rundir.records import to_float

FINISH_EVENTS = ("train_end", "summary", "stopped", "error")  # error: finetune records only fatal ones
SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class MonitorConfig:
    """How to follow a run."""

    run_dir: Path
    """The run directory (`prunetune finetune --out`), or any dir/file `prunetune report` accepts."""
    once: bool = False
    """Print one snapshot and return (scripts, tests)."""
    interval: float = 2.0
    """Seconds between refreshes."""
    curve_width: int = 60
    """Characters of the terminal loss curve."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise UserError(f"--interval {self.interval} must be a positive number of seconds")
        if self.curve_width < 8:
            raise UserError(f"curve width {self.curve_width} too small; use 8 or more")


def read_records(run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """Records of the run so far and where they came from; ([], reason) while nothing is written yet."""
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; pass the --out directory of a `prunetune finetune` run")
    metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if metrics.name == "metrics.jsonl" and metrics.is_file():
        return [clean_record(r) for r in read_jsonl(metrics, "metrics.jsonl")[0]], str(metrics)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        return [], "waiting for the run to write metrics.jsonl"
    try:
        src = load_source(run_dir)
    except UserError:
        if run_dir.is_dir():
            return [], "waiting for the run to write metrics.jsonl"
        raise
    return src.records, str(src.path)


def _nvml_gpus(pynvml: Any) -> list[dict[str, Any]]:
    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                "util_pct": util.gpu, "mem_used_mb": mem.used / 2**20, "mem_total_mb": mem.total / 2**20,
                "temp_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            })
        return gpus
    finally:
        pynvml.nvmlShutdown()


def machine_load() -> dict[str, Any]:
    """GPU utilisation/memory/temperature through NVML when an NVIDIA GPU answers, else CPU and RAM."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            gpus = _nvml_gpus(pynvml)
        except pynvml.NVMLError:
            gpus = []  # no NVIDIA driver or GPU here: CPU and RAM are the load that matters
        if gpus:
            return {"kind": "gpu", "gpus": gpus}
    import psutil

    vm = psutil.virtual_memory()
    return {"kind": "cpu", "cpu_pct": psutil.cpu_percent(interval=None), "ram_used_mb": vm.used / 2**20,
            "ram_total_mb": vm.total / 2**20, "ram_pct": vm.percent}


def sparkline(values: Sequence[float], width: int) -> str:
    """A unicode curve of `values`, bucket-averaged to `width` characters."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        step = len(vals) / width
        vals = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := vals[int(i * step): max(int(i * step) + 1, int((i + 1) * step))])
        ]
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


def snapshot(run_dir: Path, curve_width: int = 60, load: bool = True) -> dict[str, Any]:
    """Everything the view shows, as plain data."""
    records, origin = read_records(run_dir)
    logs = [r for r in records if r.get("event") == "log"]
    evals = [r for r in records if r.get("event") == "eval"]
    last = logs[-1] if logs else {}
    step = step_value(last.get("step"))
    max_steps = step_value(last.get("max_steps"))
    losses = [v for r in logs if (v := to_float(r.get("loss"))) is not None]
    best = None
    for r in evals:
        v = to_float(r.get("eval_loss"))
        if v is not None and math.isfinite(v) and (best is None or v < best[1]):
            best = (r.get("step"), v)
    alerts = {a.get("kind"): dict(a) for a in records if a.get("event") == "alert"}
    finished = any(r.get("event") in FINISH_EVENTS for r in records)
    ending = next((r.get("event") for r in reversed(records) if r.get("event") in FINISH_EVENTS), None)
    origin_path = Path(origin)
    age = time.time() - origin_path.stat().st_mtime if origin_path.is_file() else None
    flavour = "prunetune" if origin_path.name == "metrics.jsonl" else "trainer"  # fixes in the reader's flags
    settings, _ = settings_beside(origin_path.parent)  # run_config.json: what the fixes may quote
    for a in diagnose(records, final=finished, context=fix_context(settings, flavour)):
        alerts.setdefault(a.kind, a.to_record())
    errors = [r for r in records if r.get("event") == "error"]
    return {
        "origin": origin,
        "records": len(records),
        "step": step,
        "max_steps": max_steps or None,
        "elapsed": to_float(last.get("elapsed")),
        "eta_s": to_float(last.get("eta_s")),
        "loss": to_float(last.get("loss")),
        "lr": to_float(last.get("lr")),
        "grad_norm": to_float(last.get("grad_norm")),
        "tokens_per_s": to_float(last.get("tokens_per_s")),
        "memory_mb": to_float(last.get("memory_mb")),
        "curve": sparkline(losses, curve_width),
        "loss_range": (min(losses), max(losses)) if losses and all(map(math.isfinite, losses)) else None,
        "evals": [{"step": r.get("step"), "eval_loss": to_float(r.get("eval_loss")),
                   "perplexity": to_float(r.get("perplexity"))} for r in evals],
        "best": {"step": best[0], "eval_loss": best[1]} if best else None,
        "alerts": list(alerts.values()),
        "errors": errors,
        "finished": finished,
        "ending": ending,
        "age_s": age,
        "summary": summarize(records).to_dict() if finished else None,
        "load": machine_load() if load else None,
    }


def _bar(frac: float, width: int = 30) -> str:
    filled = int(min(max(frac, 0.0), 1.0) * width)
    return "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)


def render(snap: Mapping[str, Any]) -> Group:
    parts: list[Any] = []
    age = snap.get("age_s")
    head = Text(f"{snap['origin']} | {snap['records']} records"
                + (f" | last written {hms(age, '-')} ago" if age is not None else ""), style="dim")
    parts.append(head)
    if snap["step"] is None:
        parts.append(Text("No training step logged yet.", style="yellow"))
    else:
        total = snap["max_steps"]
        frac = snap["step"] / total if total else 0.0
        line = f"Step {snap['step']}" + (f"/{total} [{_bar(frac)}] {frac * 100:.1f}%" if total else "")
        line += f" | Elapsed {hms(snap['elapsed'], '-')} | ETA {hms(snap['eta_s'], '-')}"
        parts.append(Text(line, style="bold"))
        stats = f"Loss {fmt_sig(snap['loss'])} | LR {fmt_lr(snap['lr']) if snap['lr'] else '-'} | grad norm {fmt_sig(snap['grad_norm'])}"
        if snap["tokens_per_s"] is not None:
            stats += f" | {snap['tokens_per_s']:,.0f} tok/s"
        if snap["memory_mb"] is not None:
            stats += f" | mem {snap['memory_mb']:,.0f} MB"
        parts.append(Text(stats))
    if snap["curve"]:
        lo, hi = snap["loss_range"] or (math.nan, math.nan)
        parts.append(Panel(Text(snap["curve"], style="cyan"),
                           title=f"train loss (min {fmt_sig(lo)}, max {fmt_sig(hi)})", expand=False))
    if snap["evals"]:
        table = Table(title="Evaluations", show_edge=False)
        for col in ("step", "eval loss", "perplexity", ""):
            table.add_column(col, justify="right")
        best_step = snap["best"]["step"] if snap["best"] else None
        for e in snap["evals"][-8:]:
            table.add_row(str(e["step"]), fmt_sig(e["eval_loss"]), fmt_sig(e["perplexity"]),
                          "best" if e["step"] == best_step else "")
        parts.append(table)
        if snap["best"]:
            parts.append(Text(f"Best so far: eval loss {fmt_sig(snap['best']['eval_loss'])} at step "
                              f"{snap['best']['step']}"))
    for a in snap["alerts"]:
        mark, style = {"error": ("❌", "red"), "info": ("ℹ", "cyan")}.get(str(a.get("severity")), ("⚠", "yellow"))
        parts.append(Text(f"{mark} [{a.get('kind')}] step {a.get('step')}: "
                          f"{a.get('message')}\n   fix: {a.get('fix')}", style=style))
    for e in snap["errors"]:
        parts.append(Text(f"❌ error {e.get('kind')}: {e.get('message', '')}", style="red"))
    load = snap.get("load")
    if load:
        if load["kind"] == "gpu":
            for g in load["gpus"]:
                parts.append(Text(f"GPU{g['index']} {g['name']}: {g['util_pct']}% util | "
                                  f"{g['mem_used_mb']:,.0f}/{g['mem_total_mb']:,.0f} MB | {g['temp_c']}°C"))
        else:
            parts.append(Text(f"CPU {load['cpu_pct']:.0f}% | RAM {load['ram_used_mb']:,.0f}/"
                              f"{load['ram_total_mb']:,.0f} MB ({load['ram_pct']:.0f}%)"))
    if snap["finished"]:
        s = snap["summary"]
        parts.append(Panel(Text(
            f"Training {'failed' if snap.get('ending') == 'error' else 'stopped' if snap.get('ending') == 'stopped' else 'finished'}: {s['steps']} steps in {hms(s['time_s'], '-')} | final train loss "
            f"{fmt_sig(s['final_train_loss'])} | final eval loss {fmt_sig(s['final_eval_loss'])} | best "
            f"{Summary(**s).best_text()} | perplexity {fmt_sig(s['final_perplexity'])}"
        ), title="summary", style="green"))
    return Group(*parts)


def run_monitor(cfg: MonitorConfig, console: Console | None = None) -> dict[str, Any]:
    """Show the run until it finishes (or once); returns the last snapshot."""
    console = console or Console()
    snap = snapshot(cfg.run_dir, cfg.curve_width)
    if cfg.once or snap["finished"]:
        console.print(render(snap))
        return snap
    with Live(render(snap), console=console, refresh_per_second=4, transient=False) as live:
        while not snap["finished"]:
            time.sleep(cfg.interval)
            snap = snapshot(cfg.run_dir, cfg.curve_width)
            live.update(render(snap))
    return snap
