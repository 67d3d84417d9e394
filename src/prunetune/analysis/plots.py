"""PNG plots of a run (matplotlib Agg canvas: no display, no global pyplot state).

Each function takes records and an output path, writes one PNG and returns its path, or None when the
records carry nothing to plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunetune.records import to_float


def series(records: Sequence[Mapping[str, Any]], event: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in `event` records, finite values only."""
    xs, ys = [], []
    for r in records:
        if r.get("event") != event:
            continue
        step, value = to_float(r.get("step")), to_float(r.get(key))
        if step is None or value is None or not math.isfinite(value):
            continue
        xs.append(int(step))
        ys.append(value)
    return xs, ys


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _figure(title: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(7, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_train_loss(records: Sequence[Mapping[str, Any]], path: Path,
                    alerts: Sequence[Mapping[str, Any]] = ()) -> Path | None:
    xs, ys = series(records, "log", "loss")
    if not xs:
        return None
    fig, ax = _figure("Training loss", "loss")
    ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="raw")
    ax.plot(xs, ema(ys), color="tab:blue", lw=2, label="smoothed (EMA 0.1)")
    ex, ey = series(records, "eval", "eval_loss")
    if ex:
        ax.plot(ex, ey, "o-", color="tab:orange", ms=4, lw=1, label="eval loss")
    for a in alerts:
        step = to_float(a.get("step"))
        if step is not None:
            ax.axvline(step, color="tab:red", ls=":", lw=1)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_eval(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    xs, ys = series(records, "eval", "eval_loss")
    if not xs:
        return None
    fig, ax = _figure("Evaluation loss and perplexity", "eval loss")
    ax.plot(xs, ys, "o-", color="tab:orange", ms=4, label="eval loss")
    best = min(range(len(ys)), key=ys.__getitem__)
    ax.plot([xs[best]], [ys[best]], "*", color="tab:green", ms=14,
            label=f"best {ys[best]:.4g} at step {xs[best]}")
    ppl_ax = ax.twinx()
    ppl_ax.plot(xs, [math.exp(min(v, 700)) for v in ys], "--", color="tab:purple", lw=1, label="perplexity")
    ppl_ax.set_ylabel("perplexity")
    if max(ys) - min(ys) > 3:
        ppl_ax.set_yscale("log")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ppl_ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    return _save(fig, path)


def plot_simple(records: Sequence[Mapping[str, Any]], path: Path, key: str, title: str, ylabel: str,
                log_y: bool = False) -> Path | None:
    xs, ys = series(records, "log", key)
    if not xs:
        return None
    fig, ax = _figure(title, ylabel)
    ax.plot(xs, ys, color="tab:green", lw=1.5)
    if log_y and min(ys) > 0:
        ax.set_yscale("log")
    return _save(fig, path)


def plot_throughput(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    for key, label in (("tokens_per_s", "tokens/s"), ("steps_per_s", "steps/s")):
        if series(records, "log", key)[0]:
            return plot_simple(records, path, key, "Throughput", label)
    return None


def plot_compare(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: Path) -> Path | None:
    """Train (smoothed) and eval loss of several runs on one figure."""
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_t, ax_e = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    drawn = False
    for name, records in runs:
        xs, ys = series(records, "log", "loss")
        if xs:
            ax_t.plot(xs, ema(ys), lw=1.5, label=name)
            drawn = True
        ex, ey = series(records, "eval", "eval_loss")
        if ex:
            ax_e.plot(ex, ey, "o-", ms=3, lw=1.2, label=name)
            drawn = True
    if not drawn:
        return None
    for ax, title in ((ax_t, "Training loss (smoothed)"), (ax_e, "Eval loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(records: Sequence[Mapping[str, Any]], out: Path,
                alerts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """All run plots into `out`; {name: path} of those written."""
    out.mkdir(parents=True, exist_ok=True)
    made = {
        "train_loss": plot_train_loss(records, out / "train_loss.png", alerts),
        "eval": plot_eval(records, out / "eval_loss_perplexity.png"),
        "lr": plot_simple(records, out / "learning_rate.png", "lr", "Learning rate", "lr"),
        "grad_norm": plot_simple(records, out / "grad_norm.png", "grad_norm", "Gradient norm", "grad norm",
                                 log_y=True),
        "throughput": plot_throughput(records, out / "throughput.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
