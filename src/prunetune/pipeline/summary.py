"""The end of a pipeline run: the perplexity story (dense -> pruned -> recovered, the recovered model being the
deployable sparse one), the stage timings, and where the report is. Read back from the stage records, so the
console, `pipeline.json` and a later `prunetune run --plan` tell the same numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prunetune.fmt import fmt_num, fmt_ppl, hms
from prunetune.pipeline.runner import Stage, read_stage


def perplexity_story(root: Path) -> dict[str, Any]:
    """dense -> pruned -> recovered perplexity on the eval stage's held-out split (the recovered model is the
    deployable sparse one when the merge stage ran) and on the fine-tuning eval set (the numbers of the
    finetune console and the report); and where the report is."""
    story: dict[str, Any] = {}
    eval_result = (read_stage(root / "eval") or {}).get("result") or {}
    report_state = read_stage(root / "report") or {}
    report_result = report_state.get("result") or {}
    summary = report_result.get("summary") or {}
    same_set = eval_result.get("finetune_eval_set") or {}
    test = eval_result.get("test") or {}
    if test:
        recovered = test.get("recovered_model") or {}
        story["test"] = {
            **{k: test.get(k) for k in ("dataset", "split", "seqlen", "max_windows")},
            **{m: (test.get(m) or {}).get("perplexity") for m in ("dense", "pruned", "recovered")},
            "recovered_sparsity": (test.get("recovered") or {}).get("sparsity"),
            "deployable": recovered.get("deployable"),
            "describes": recovered.get("describes"),
        }
        zeroshot = {m: (test.get(m) or {}).get("zeroshot") for m in ("dense", "pruned", "recovered")}
        if any(zeroshot.values()):
            story["zeroshot"] = zeroshot
    if summary.get("final_perplexity") is not None:
        story["finetune_eval_set"] = {
            **{k: same_set.get(k) for k in ("dataset", "split", "seqlen", "max_windows")},
            "dense": summary.get("dense_perplexity"), "pruned": summary.get("pruned_perplexity"),
            "recovered": summary.get("final_perplexity"),
        }
    if report_state.get("complete"):
        files = report_result.get("files") or {}
        story["report"] = files.get("report.html") or str(root / "report")
        story["rating"] = report_result.get("rating")
    return story


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def headline(story: dict[str, Any]) -> str | None:
    """One line: dense -> pruned -> recovered, led by the held-out numbers of the deployable model."""
    label, r = next(((label, story[key]) for key, label in (("test", "held-out test"),
                                                            ("finetune_eval_set", "fine-tuning eval set"))
                     if story.get(key)), (None, None))
    if r is None:
        return None
    dense, pruned, recovered = r.get("dense"), r.get("pruned"), r.get("recovered")
    if not _finite(dense, pruned, recovered):
        return None
    what = r.get("describes") or "recovered model"
    text = (f"dense {fmt_ppl(dense, grouped=True)} → pruned {fmt_ppl(pruned, grouped=True)} → recovered "
            f"{fmt_ppl(recovered, grouped=True)} ({label}; {what}): {recovered / dense:.2f}x the dense perplexity")
    # In loss terms (log perplexity): on a linear scale 49,090 -> 7,689 would read as "84% recovered". The share
    # means something only when pruning opened a real gap.
    if pruned > 1.05 * dense:
        text += f"; recovery closed {math.log(pruned / recovered) / math.log(pruned / dense):.0%} of the loss gap pruning opened"
    if story.get("rating"):
        text += f"; rating: {story['rating']}"
    return text


def print_story(console: Console, story: dict[str, Any]) -> None:
    rows = [("held-out test", story.get("test")), ("fine-tuning eval set", story.get("finetune_eval_set"))]
    rows = [(label, r) for label, r in rows if r]
    if rows:
        table = Table(title="Perplexity (lower is better)", title_justify="left", show_edge=False)
        for column in ("measured on", "data", "dense", "pruned", "recovered", "recovered model"):
            table.add_column(column, justify="right" if column in ("dense", "pruned", "recovered") else "left")
        for label, r in rows:
            windows = f"{r['max_windows']} x {r['seqlen']} tokens" if r.get("max_windows") else f"seqlen {r.get('seqlen')}"
            what = r.get("describes") or "finetune's final evaluation (deployable sparse model)"
            table.add_row(label, f"{r.get('dataset')}/{r.get('split')}, {windows}", fmt_ppl(r.get("dense"), grouped=True),
                          f"[red]{fmt_ppl(r.get('pruned'), grouped=True)}[/]",
                          f"[bold green]{fmt_ppl(r.get('recovered'), grouped=True)}[/]", what)
        console.print(table)
        line = headline(story)
        if line:
            console.print(f"[bold]{line}[/]")
    if story.get("zeroshot"):
        print_zeroshot(console, story["zeroshot"])
    if "report" in story:
        console.print(f"[bold]Report:[/] {story['report']}")


def print_zeroshot(console: Console, zeroshot: dict[str, Any]) -> None:
    """Zero-shot accuracy per task (acc_norm where the task has it, as the pruning papers report), per model."""
    models = [m for m in ("dense", "pruned", "recovered") if zeroshot.get(m)]
    tasks = list(dict.fromkeys(t for m in models for t in zeroshot[m]["tasks"]))
    table = Table(title="Zero-shot accuracy (higher is better; acc_norm where the task has it)", title_justify="left",
                  show_edge=False)
    table.add_column("task")
    for m in models:
        table.add_column(m, justify="right")
    for task in tasks:
        cells = []
        for m in models:
            row = zeroshot[m]["tasks"].get(task) or {}
            value = row.get("acc_norm") if row.get("acc_norm") is not None else row.get("acc")
            cells.append(fmt_num(value, ".4f", "-"))
        table.add_row(task, *cells)
    if len(tasks) > 1:
        table.add_row("mean acc", *(fmt_num(zeroshot[m].get("mean_acc"), ".4f", "-") for m in models))
    console.print(table)


def print_timings(console: Console, root: Path, stages: list[Stage]) -> None:
    table = Table(title="Stages", show_edge=False)
    table.add_column("stage")
    table.add_column("state")
    table.add_column("time", justify="right")
    table.add_column("fingerprint")
    for stage in stages:
        state = read_stage(root / stage.name) or {}
        table.add_row(stage.name, "complete" if state.get("complete") else "not complete",
                      hms(state.get("seconds"), unknown="-"), str(state.get("fingerprint", "-")))
    console.print(table)
