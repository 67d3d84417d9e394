"""PNG plots of a run (matplotlib Agg canvas: no display, no global pyplot state).

Each function takes records and an output path, writes one PNG and returns its path, or None when the
records carry nothing to plot.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunetune.analysis.series import noise_sigma
from prunetune.rundir.records import to_float


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


def smoothed(values: Sequence[float]) -> tuple[list[float], int] | None:
    """A debiased EMA whose window (in points) scales with the series: a tenth of the points, so 7 points
    are not smoothed at all and 2000 are smoothed over 200; the window is halved until the curve ends
    within the noise of the last points (a lagging line that ends off the data would misreport the run).
    (curve, window), or None when there is nothing worth smoothing."""
    window = len(values) // 10
    noise = noise_sigma(values)
    while window >= 2:
        curve = ema(values, 2 / (window + 1))
        tail = statistics.median(values[-max(3, window // 4):])
        if abs(curve[-1] - tail) <= max(noise, 1e-12):
            return curve, window
        window //= 2
    return None


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
    if (smooth := smoothed(ys)) is not None:
        curve, window = smooth
        ax.plot(xs, curve, color="tab:blue", lw=2, label=f"smoothed (EMA over ~{window} points)")
    for name, (ex, ey) in eval_series(records).items():
        ax.plot(ex, ey, "o-", ms=4, lw=1, label=f"eval loss ({name})" if name else "eval loss")
    for a in alerts:
        step = to_float(a.get("step"))
        if step is not None:
            ax.axvline(step, color="tab:red", ls=":", lw=1)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def eval_series(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, eval losses) per eval set ("" for the plain eval loss), finite values only."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        step, value = to_float(r.get("step")), to_float(r.get("eval_loss"))
        if r.get("event") != "eval" or step is None or value is None or not math.isfinite(value):
            continue
        xs, ys = out.setdefault(str(r.get("eval_set") or ""), ([], []))
        xs.append(int(step))
        ys.append(value)
    return out


def baseline_loss(records: Sequence[Mapping[str, Any]], pruned_ppl: float | None) -> float | None:
    """The pruned model's eval loss before training (step 0): the baseline_eval record's, else log(pruned
    perplexity)."""
    for r in records:
        if r.get("event") == "baseline_eval" and (v := to_float(r.get("eval_loss"))) is not None and math.isfinite(v):
            return v
    return math.log(pruned_ppl) if pruned_ppl and pruned_ppl > 0 and math.isfinite(pruned_ppl) else None


def plot_eval(records: Sequence[Mapping[str, Any]], path: Path, dense_ppl: float | None = None,
              pruned_ppl: float | None = None, lm: bool = True) -> Path | None:
    """Eval loss per eval set from the pruned model's baseline (step 0) on; with a language-model loss, the
    perplexity too, with the dense model's as a reference line (log scale when it spans more than 10x)."""
    sets = eval_series(records)
    if not sets:
        return None
    base = baseline_loss(records, pruned_ppl)
    fig, ax = _figure("Evaluation" + (": recovery from the pruned model" if base is not None else ""), "eval loss")
    main = next(iter(sets))
    for name, (xs, ys) in sets.items():
        if name == main and base is not None and xs and xs[0] > 0:
            xs, ys = [0, *xs], [base, *ys]
        ax.plot(xs, ys, "o-", ms=4, label=f"eval loss ({name})" if name else "eval loss")
        if name == main:
            main_xy = (xs, ys)
    xs, ys = main_xy
    best = min(range(len(ys)), key=ys.__getitem__)
    ax.plot([xs[best]], [ys[best]], "*", color="tab:green", ms=14, label=f"best {ys[best]:.4g} at step {xs[best]}")
    if base is not None:
        ax.annotate("pruned (before training)", (0, base), textcoords="offset points", xytext=(8, -4), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    if lm:
        ppl = [math.exp(min(v, 700)) for v in ys]
        ppl_ax = ax.twinx()
        ppl_ax.plot(xs, ppl, "--", color="tab:purple", lw=1, label="perplexity")
        span = [*ppl, *([dense_ppl] if dense_ppl else [])]
        if dense_ppl and dense_ppl > 0 and math.isfinite(dense_ppl):
            ppl_ax.axhline(dense_ppl, color="tab:gray", ls=":", lw=1.5, label=f"dense model {dense_ppl:.2f}")
        ppl_ax.set_ylabel("perplexity")
        if min(span) > 0 and max(span) / min(span) > 10:
            ppl_ax.set_yscale("log")
            ax.set_ylabel("eval loss (= log perplexity)")
        h2, l2 = ppl_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
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
            smooth = smoothed(ys)
            ax_t.plot(xs, smooth[0] if smooth else ys, lw=1.5, label=name)
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


def write_plots(records: Sequence[Mapping[str, Any]], out: Path, alerts: Sequence[Mapping[str, Any]] = (),
                dense_ppl: float | None = None, pruned_ppl: float | None = None, lm: bool = True) -> dict[str, Path]:
    """All run plots into `out`; {name: path} of those written."""
    out.mkdir(parents=True, exist_ok=True)
    made = {
        "train_loss": plot_train_loss(records, out / "train_loss.png", alerts),
        "eval": plot_eval(records, out / "eval_loss_perplexity.png", dense_ppl, pruned_ppl, lm),
        "lr": plot_simple(records, out / "learning_rate.png", "lr", "Learning rate", "lr"),
        "grad_norm": plot_simple(records, out / "grad_norm.png", "grad_norm", "Gradient norm", "grad norm",
                                 log_y=True),
        "throughput": plot_throughput(records, out / "throughput.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
