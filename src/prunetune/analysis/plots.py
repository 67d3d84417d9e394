"""PNG plots of a run (matplotlib Agg canvas: no display, no global pyplot state).

Each function takes the curves of a run (`series.curves`: what report.json carries, so a plot never shows a
number the JSON lacks) and an output path, writes one PNG and returns its path, or None when there is nothing
to plot.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

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


def _alert_lines(ax: Any, alerts: Sequence[Mapping[str, Any]]) -> None:
    for a in alerts:
        step = to_float(a.get("step"))
        if step is not None and math.isfinite(step):
            ax.axvline(step, color="tab:red", ls=":", lw=1)


def _final_label(final: Mapping[str, Any]) -> str:
    of = final.get("of") or "after training"
    of = of.removeprefix("the ")
    return f"final eval ({final['eval_set']}): {final['eval_loss']:.4g}, {of}" if final["eval_set"] != "eval" else \
        f"final eval {final['eval_loss']:.4g}: {of}"


def plot_train_loss(curves: Mapping[str, Any], path: Path, alerts: Sequence[Mapping[str, Any]] = ()) -> Path | None:
    """The train loss (raw and smoothed) with every evaluation, the final one included, on the same axis."""
    xs, ys = curves["train_loss"]["step"], curves["train_loss"]["loss"]
    if not xs:
        return None
    fig, ax = _figure("Training loss", "loss")
    ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="raw")
    if (smooth := smoothed(ys)) is not None:
        curve, window = smooth
        ax.plot(xs, curve, color="tab:blue", lw=2, label=f"smoothed (EMA over ~{window} points)")
    for name, col in curves["eval"].items():
        ax.plot(col["step"], col["eval_loss"], "o-", ms=4, lw=1,
                label=f"eval loss ({name})" if name != "eval" else "eval loss")
    for final in curves["final_eval"]:
        if final["step"] is not None:
            ax.plot([final["step"]], [final["eval_loss"]], "D", ms=7, mfc="none", mew=1.5, label=_final_label(final))
    _alert_lines(ax, alerts)
    ax.legend(loc="upper right", fontsize=7)
    return _save(fig, path)


def baseline_loss(curves: Mapping[str, Any], pruned_ppl: float | None) -> float | None:
    """The pruned model's eval loss before training (step 0): the baseline_eval record's, else log(pruned
    perplexity)."""
    if curves.get("baseline"):
        return curves["baseline"]["eval_loss"]
    return math.log(pruned_ppl) if pruned_ppl and pruned_ppl > 0 and math.isfinite(pruned_ppl) else None


def _perplexity_axis(ax: Any) -> Any:
    """A right-hand perplexity axis on the loss axis's own scale: perplexity = exp(loss), so every tick of it
    sits exactly at the loss whose exponential it is (one scale, aligned by construction)."""
    sec = ax.secondary_yaxis("right", functions=(lambda x: np.exp(np.clip(x, -60.0, 60.0)),
                                                 lambda y: np.log(np.clip(y, 1e-26, None))))
    sec.set_ylabel("perplexity = exp(loss)")
    sec.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    sec.yaxis.set_minor_locator(NullLocator())
    sec.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
    return sec


def plot_eval(curves: Mapping[str, Any], path: Path, dense_ppl: float | None = None,
              pruned_ppl: float | None = None, lm: bool = True) -> Path | None:
    """Eval loss per eval set from the pruned model's baseline (step 0) on, every evaluation and the final one
    drawn; with a language-model loss a perplexity axis on the same scale (exp of the loss axis) and the dense
    model as a line at its loss, log(perplexity): every reference sits at the height of its quantity on both axes."""
    sets = curves["eval"]
    finals = [f for f in curves["final_eval"] if f["step"] is not None]
    if not sets and not finals:
        return None
    base = baseline_loss(curves, pruned_ppl)
    fig, ax = _figure("Evaluation" + (": recovery from the pruned model" if base is not None else ""), "eval loss")
    main = next(iter(sets), "eval")
    points: list[tuple[int, float]] = []
    for name, col in sets.items():
        xs, ys = list(col["step"]), list(col["eval_loss"])
        if name == main and base is not None and xs and xs[0] > 0:
            xs, ys = [0, *xs], [base, *ys]
        ax.plot(xs, ys, "o-", ms=4, label=f"eval loss ({name})" if name != "eval" else "eval loss")
        if name == main:
            points += list(zip(xs, ys, strict=True))
    for final in finals:
        ax.plot([final["step"]], [final["eval_loss"]], "D", ms=7, mfc="none", mew=1.5, color="tab:red",
                label=_final_label(final))
        if final["eval_set"] == main:
            points.append((final["step"], final["eval_loss"]))
    if points:
        bx, by = min(points, key=lambda p: p[1])
        ax.plot([bx], [by], "*", color="tab:green", ms=14, label=f"best {by:.4g} at step {bx}")
    if base is not None:
        ax.annotate("pruned (before training)", (0, base), textcoords="offset points", xytext=(8, -4), fontsize=8)
    if lm:
        if dense_ppl and dense_ppl > 0 and math.isfinite(dense_ppl):
            dense = math.log(dense_ppl)
            ax.axhline(dense, color="tab:gray", ls=":", lw=1.5,
                       label=f"dense model: perplexity {dense_ppl:.2f} (loss {dense:.3f})")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi)
        _perplexity_axis(ax)
        ax.set_ylabel("eval loss (= log perplexity)")
    fig.set_figheight(3.6 + 0.16 * len(ax.get_legend_handles_labels()[0]))
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=1, fontsize=7, frameon=False)
    return _save(fig, path)


def plot_simple(col: Mapping[str, list], path: Path, key: str, title: str, ylabel: str,
                log_y: bool = False) -> Path | None:
    xs, ys = col["step"], col[key]
    if not xs:
        return None
    fig, ax = _figure(title, ylabel)
    ax.plot(xs, ys, color="tab:green", lw=1.5)
    if log_y and min(ys) > 0:
        ax.set_yscale("log")
    return _save(fig, path)


def plot_throughput(curves: Mapping[str, Any], path: Path) -> Path | None:
    col = curves["throughput"]
    key = next(k for k in col if k != "step")
    return plot_simple(col, path, key, "Throughput", "tokens/s" if key == "tokens_per_s" else "steps/s")


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


def write_plots(curves: Mapping[str, Any], out: Path, alerts: Sequence[Mapping[str, Any]] = (),
                dense_ppl: float | None = None, pruned_ppl: float | None = None, lm: bool = True) -> dict[str, Path]:
    """All run plots of `curves` (`series.curves`, what report.json carries) into `out`; {name: path} written."""
    out.mkdir(parents=True, exist_ok=True)
    made = {
        "train_loss": plot_train_loss(curves, out / "train_loss.png", alerts),
        "eval": plot_eval(curves, out / "eval_loss_perplexity.png", dense_ppl, pruned_ppl, lm),
        "lr": plot_simple(curves["lr"], out / "learning_rate.png", "lr", "Learning rate", "lr"),
        "grad_norm": plot_simple(curves["grad_norm"], out / "grad_norm.png", "grad_norm", "Gradient norm",
                                 "grad norm", log_y=True),
        "throughput": plot_throughput(curves, out / "throughput.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
