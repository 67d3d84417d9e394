"""`prunetune report`: plots, verdicts and diagnosis of a run, as report.md, a self-contained report.html
(images embedded) and report.json (machine-readable: summary, verdicts, rating, anomalies).

Both human documents are rendered from one list of blocks, and report.json holds the numbers behind them.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune import rundir
from prunetune.analysis import plots
from prunetune.analysis.anomaly import ANOMALY_KINDS, Anomaly
from prunetune.analysis.context import FixContext, fix_context
from prunetune.analysis.rules import diagnose
from prunetune.analysis.series import curves
from prunetune.analysis.sources import Source, load_source
from prunetune.analysis.summary import Summary, summarize
from prunetune.analysis.thresholds import Thresholds, thresholds_from_mapping
from prunetune.analysis.verdicts import BAND_PRESETS, Rating, rate_perplexity, verdicts
from prunetune.errors import UserError
from prunetune.fmt import fmt_ppl, fmt_sig, hms, json_safe
from prunetune.rundir.records import to_float
from prunetune.runinfo import write_json

REPORT_FILES = ("report.md", "report.html", "report.json")


@dataclass(frozen=True)
class ReportConfig:
    """What to report on and how to judge it."""

    source: Path
    """A run directory, metrics.jsonl, trainer_state.json or a Transformers console log."""
    out: Path | None = None
    """Output directory; default `<source dir>/report`."""
    dense_ppl: float | None = None
    """Perplexity of the dense model, for the relative rating (overrides the run's own record)."""
    pruned_ppl: float | None = None
    """Perplexity of the pruned model before recovery, for the improvement line."""
    bands: str = "relative"
    """Perplexity bands: `relative` (to the dense model) or `llama2-7b` (absolute)."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    """Diagnosis thresholds (see prunetune.analysis.rules); a mapping of overrides is accepted (YAML)."""
    prefer: str | None = None
    """Force one source kind in a directory: metrics_jsonl, trainer_state or console_log."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        if not isinstance(self.thresholds, Thresholds):
            try:
                object.__setattr__(self, "thresholds", thresholds_from_mapping(self.thresholds))
            except (ValueError, TypeError) as err:
                raise UserError(f"report thresholds: {err}") from None
        if self.bands not in BAND_PRESETS:
            raise UserError(f"--bands {self.bands!r} is not known; choose one of {', '.join(BAND_PRESETS)}")
        for name in ("dense_ppl", "pruned_ppl"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} {value} must be a positive finite perplexity")


def default_out(source: Path) -> Path:
    return (source if source.is_dir() else source.parent) / "report"


def run_context(source: Source) -> FixContext:
    """The FixContext of a source: the settings its reader found (argument dumps, the training header,
    trainer_state.json) and the files beside it (run_config.json first), then the epochs the log reaches."""
    settings = list(source.meta.get("settings") or [])
    epochs = [e for r in source.records if (e := to_float(r.get("epoch"))) is not None and math.isfinite(e)]
    if epochs and max(epochs) >= 1.5:
        settings.append((f"the epochs the log reaches ({max(epochs):g})", {"epochs": math.ceil(max(epochs) - 1e-6)}))
    flavour = source.meta.get("flavour") or ("prunetune" if source.kind == "metrics_jsonl" else "trainer")
    return fix_context(settings, flavour=flavour)


STEP_SOURCES = {"epoch": "estimated from the epoch each line reports (the log's progress bar does not place them)",
                "bar": "of some lines estimated between progress-bar redraws (printed together, out of step with the "
                       "bar)",
                "ordinal": "estimated from the order of the log lines (the log states no step and no epoch)"}
"""How a source's steps were found, when they are estimates; every other step source states its steps."""


def reader_notes(source: Source, summary: Summary, anomalies: Sequence[Anomaly]) -> list[str]:
    """What the reader must know before trusting the verdicts: nothing to judge, only end-of-run numbers, an
    interrupted run, steps that are estimates, what the reader found in the log (a crash after training)."""
    notes = []
    events = {r.get("event") for r in source.records}
    if summary.log_points == 0:
        notes.append(f"0 train-loss points found in {source.path.name}: nothing to judge on the training curve"
                     + (" (the log holds only the end-of-run metrics blocks)"
                        if not events & {"log", "eval"} and events & {"train_end", "final_eval"} else ""))
    if summary.status == "interrupted":
        notes.append(f"the run did not finish: interrupted at step {summary.steps}"
                     + (f" of {summary.max_steps}" if summary.max_steps else "")
                     + (f" ({summary.stopped_reason})" if summary.stopped_reason else ""))
    elif summary.status == "failed":
        where = f"at step {summary.steps}" if summary.steps is not None else "at an unknown step"
        notes.append(f"the run failed {where} ({summary.stopped_reason})")
    if summary.steps_estimated and source.meta.get("step_source") in STEP_SOURCES:
        notes.append(f"steps {STEP_SOURCES[source.meta['step_source']]}: a step shown as 'about step N' is an "
                     "estimate")
    notes += [str(n) for n in source.meta.get("notes") or [] if "traceback came after training" in str(n)]
    return notes


def _alerts(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("event") == "alert"]


def analyse(source: Source, cfg: ReportConfig) -> dict[str, Any]:
    """The content of report.json (no files written)."""
    records = source.records
    context = run_context(source)
    found = diagnose(records, cfg.thresholds, final=True, context=context, recorded=True)
    anomalies = [a for a in found if a.alarm]
    verdict = verdicts(records, cfg.thresholds, anomalies=found)
    summary = summarize(records, dense_ppl=cfg.dense_ppl, pruned_ppl=cfg.pruned_ppl)
    rating = rate_perplexity(summary.final_perplexity, summary.dense_perplexity, cfg.bands, cfg.thresholds)
    if summary.loss_kind != "lm":
        rating = Rating("unrated", "?", None, None, None, cfg.bands,
                        f"not a perplexity: the log reports {summary.loss_kind_evidence}, so its loss is not a "
                        "token-level language-model cross-entropy and exp(loss) means nothing")
    pruned_rating = (
        rate_perplexity(summary.pruned_perplexity, summary.dense_perplexity, cfg.bands, cfg.thresholds)
        if summary.pruned_perplexity is not None else None
    )
    live = [
        {k: a.get(k) for k in ("step", "kind", "severity", "message", "evidence", "fix")} for a in _alerts(records)
    ]
    step_source = source.meta.get("step_source")
    return {
        "source": {"path": str(source.path), "kind": source.kind, "format": source.meta.get("format"),
                   "step_source": step_source, "steps_estimated": summary.steps_estimated,
                   "records": len(records),
                   "best_checkpoint": source.meta.get("best_checkpoint") or source.meta.get("best_model_checkpoint"),
                   "notes": list(source.meta.get("notes") or [])},
        "notes": reader_notes(source, summary, anomalies),
        "summary": summary.to_dict(),
        "verdicts": {k: v.to_dict() for k, v in verdict.items()},
        "perplexity_rating": rating.to_dict(),
        "pruned_perplexity_rating": pruned_rating.to_dict() if pruned_rating else None,
        "anomalies": [a.to_dict() for a in anomalies],
        "information": [a.to_dict() for a in found if not a.alarm],
        "anomaly_kinds": list(ANOMALY_KINDS),
        "live_alerts": live,
        "context": context.to_dict(),
        "series": curves(records, summary.final_eval_step, summary.final_eval_of),
    }


# ---------------------------------------------------------------------------------------------------------
# Rendering: blocks -> Markdown and HTML


Block = tuple  # ("h1"|"h2"|"h3"|"p", text) | ("table", headers, rows) | ("list", items) | ("img", title, path)


def build_blocks(data: Mapping[str, Any], images: Mapping[str, Path]) -> list[Block]:
    """The report in reading order: source, summary, verdicts, anomalies and alerts, plots."""
    s = Summary(**data["summary"])
    return [
        ("h1", "Training report"),
        *_source_blocks(data),
        ("h2", "Summary"), ("table", ["", ""], _summary_rows(s, data["source"])),
        ("h2", "Verdicts"), ("table", ["Metric", "Verdict"], _verdict_rows(s, data)),
        *_anomaly_blocks(s, data),
        *_plot_blocks(images),
    ]


def _source_blocks(data: Mapping[str, Any]) -> list[Block]:
    src = data["source"]
    how = f"{src['kind']} `{src['path']}`, {src['records']} records"
    return [("p", f"Source: {how}."), *(("p", f"⚠ {note}.") for note in data.get("notes", []))]


def _summary_rows(s: Summary, src: Mapping[str, Any]) -> list[list[str]]:
    steps = f"{s.steps}" + (f" / {s.max_steps}" if s.max_steps else "") if s.steps is not None else "-"
    of = f" ({s.final_eval_of})" if s.final_eval_of else ""
    rows = [
        ["Run", s.status + (f" ({s.stopped_reason})" if s.stopped_reason else "")],
        ["Steps", steps],
        ["Training time", hms(s.time_s, "-")],
        ["Final train loss", fmt_sig(s.final_train_loss)],
        [f"Final eval loss ({s.final_eval_set})" if s.final_eval_set else "Final eval loss",
         fmt_sig(s.final_eval_loss) + of],
    ]
    if s.last_eval_loss is not None and s.last_eval_step != s.final_eval_step:
        rows.append(["Last evaluation during training", f"{fmt_sig(s.last_eval_loss)} at step {s.last_eval_step}"
                     + (f" (perplexity {fmt_sig(math.exp(min(s.last_eval_loss, 700)))})" if s.loss_kind == "lm" else "")])
    rows.append(["Best eval loss", s.best_text()])
    rows += ([["Final perplexity", fmt_sig(s.final_perplexity) + of], ["Best perplexity", fmt_sig(s.best_perplexity)]]
             if s.loss_kind == "lm" else
             [["Perplexity", f"not a perplexity: the loss is not a language-model cross-entropy "
                             f"({s.loss_kind_evidence})"]])
    rows.append(["Evaluations", str(s.eval_points)])
    for name, numbers in (s.eval_sets or {}).items():
        rows.append([f"Eval set {name}", f"final {fmt_sig(numbers['final_eval_loss'])}, best "
                     f"{fmt_sig(numbers['best_eval_loss'])} at step {numbers['best_step']}"])
    if src.get("best_checkpoint"):
        rows.append(["Best checkpoint", str(src["best_checkpoint"])])
    if s.tokens_per_s is not None:
        rows.append(["Throughput", f"{s.tokens_per_s:,.0f} tokens/s"])
    return rows


def _verdict_rows(s: Summary, data: Mapping[str, Any]) -> list[list[str]]:
    v = data["verdicts"]
    rating = data["perplexity_rating"]
    vrows = [[_metric_title(key), f"{x['symbol']} {x['label']} ({x['reason']})"] for key, x in v.items()]
    vrows.append(["Perplexity", f"{rating['symbol']} {rating['text']}"])
    if s.pruned_perplexity is not None and s.final_perplexity is not None:
        vrows.append(["Improvement", f"pruned {fmt_sig(s.pruned_perplexity)} → {fmt_sig(s.final_perplexity)}"
                      + (f", reduction {s.improvement_pct:.2f}%" if s.improvement_pct is not None else "")])
    return vrows


def _anomaly_blocks(s: Summary, data: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [("h2", "Anomalies")]
    if not data["anomalies"]:
        judged = s.log_points > 0 or s.eval_points > 0
        blocks.append(("p", "No rule fired: the run looks healthy." if judged else
                        "Nothing found, but there was nothing to judge (no train or eval loss series)."))
    for a in data["anomalies"]:
        mark = "❌" if a["severity"] == "error" else "⚠"
        at = f" at step {a['step']}" if a["step"] is not None else ""
        blocks.append(("h3", f"{mark} {a['kind']} ({a['severity']}){at}"))
        evidence = ", ".join(f"{k}={json.dumps(val)}" for k, val in a["evidence"].items())
        basis = "; ".join(a.get("basis") or []) or "the curve shown above (no setting of the run is quoted)"
        blocks.append(("list", [a["message"], f"Evidence: {evidence}", f"Fix: {a['fix']}", f"Fix based on: {basis}"]))
    if data.get("information"):
        blocks.append(("h2", "Notes (information, not alarms)"))
        for a in data["information"]:
            basis = "; ".join(a.get("basis") or [])
            blocks.append(("list", [f"ℹ `{a['kind']}`: {a['message']}", f"To change it: {a['fix']}"]
                           + ([f"Based on: {basis}"] if basis else [])))
    if data["live_alerts"]:
        blocks.append(("h2", "Alerts raised during training"))
        blocks.append(("table", ["Step", "Kind", "Message"],
                       [[str(a["step"]), str(a["kind"]), str(a["message"])] for a in data["live_alerts"]]))
    return blocks


def _plot_blocks(images: Mapping[str, Path]) -> list[Block]:
    titles = {"train_loss": "Training loss", "eval": "Eval loss and perplexity", "lr": "Learning rate",
              "grad_norm": "Gradient norm", "throughput": "Throughput"}
    if not images:
        return []
    return [("h2", "Plots"), *(("img", titles.get(name, name), path) for name, path in images.items())]


def _metric_title(key: str) -> str:
    """`train_loss` -> `Train loss`, `eval_loss` -> `Eval loss`, `eval_wiki_loss` -> `Eval loss (wiki)`."""
    if key in ("train_loss", "eval_loss"):
        return key.replace("_", " ").capitalize()
    return f"Eval loss ({key[len('eval_'):-len('_loss')]})"


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "table":
            headers, rows = b[1], b[2]
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        elif kind == "list":
            out += [f"- {item}" for item in b[1]]
        elif kind == "img":
            out.append(f"![{b[1]}]({Path(b[2]).name})")
        out.append("")
    return "\n".join(out)


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: Sequence[Block]) -> str:
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_inline_code(b[1])}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_code(c)}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_code(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(Path(b[2]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b[1])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
             "img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>prunetune report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_console(data: Mapping[str, Any]) -> str:
    """The few lines `prunetune report` prints."""
    s = data["summary"]
    v = data["verdicts"]
    eval_name = f" ({s['final_eval_set']})" if s.get("final_eval_set") else ""
    lines = [f"⚠ {note}" for note in data.get("notes", [])]
    summary = Summary(**s)
    lines += [
        f"Steps {s['steps']} | time {hms(s['time_s'], '-')} | final train loss {fmt_sig(s['final_train_loss'])}"
        f" | final eval loss{eval_name} {fmt_sig(s['final_eval_loss'])} | best {summary.best_text()} | perplexity "
        + (fmt_ppl(s["final_perplexity"], "-") if s.get("loss_kind", "lm") == "lm" else "n/a (not an LM loss)"),
    ]
    if s.get("final_eval_of") and s.get("final_eval_loss") is not None:
        lines.append(f"Final numbers: {s['final_eval_of']}"
                     + (f"; last evaluation during training {fmt_sig(s['last_eval_loss'])} at step "
                        f"{s['last_eval_step']}" if s.get("last_eval_loss") is not None
                        and s.get("last_eval_step") != s.get("final_eval_step") else ""))
    if data["source"].get("best_checkpoint"):
        lines.append(f"Best checkpoint: {data['source']['best_checkpoint']}")
    lines += [f"{_metric_title(k) + ':':<11} {x['symbol']} {x['label']} ({x['reason']})" for k, x in v.items()]
    lines.append(f"Perplexity: {data['perplexity_rating']['symbol']} {data['perplexity_rating']['text']}")
    if s.get("pruned_perplexity") is not None and s.get("final_perplexity") is not None:
        lines.append(f"Improvement: pruned {fmt_ppl(s['pruned_perplexity'])} → {fmt_ppl(s['final_perplexity'])}"
                     + (f", reduction {s['improvement_pct']:.2f}%" if s.get("improvement_pct") is not None else ""))
    if not data["anomalies"]:
        lines.append("Anomalies: none" if s["log_points"] or s["eval_points"] else
                     "Anomalies: none found, but there was nothing to judge")
    for a in data["anomalies"]:
        mark = "❌" if a["severity"] == "error" else "⚠"
        lines.append(f"{mark} {a['kind']}: {a['message']}")
        lines.append(f"   fix: {a['fix']}")
        if a.get("basis"):
            lines.append(f"   based on: {'; '.join(a['basis'])}")
    for a in data.get("information", []):
        lines.append(f"ℹ {a['kind']} (note): {a['message']}")
        lines.append(f"   to change it: {a['fix']}")
    return "\n".join(lines)


def check_report_out(out: Path, source: Path, given: bool) -> Path:
    """Refuse, before any work, an output the report may not write: the source itself or a directory holding
    it, a file, an unwritable path, or a non-empty directory without prunetune's marker file (the user's
    files, even when they are named report.md)."""
    flag = f"--out {out}" if given else f"the default report directory {out}"
    src = source.resolve()
    target = out.expanduser().resolve()
    if target == src or target in src.parents:
        raise UserError(f"{flag} holds the source {source}; pass --out DIR, a new directory for the report")
    if target.is_dir() and any(target.iterdir()) and not rundir.is_ours(target):
        raise UserError(f"{flag} already holds files prunetune did not write; pass --out DIR (a new or empty "
                        "directory) for the report: prunetune never overwrites your files")
    return rundir.check_output(target, overwrite=True)


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Read the source, judge it, write plots + report.md/.html/.json into cfg.out; returns report.json's data
    with `files` (what was written) added. The directory appears whole (staged, then swapped in); a previous
    report there is replaced, anything else is refused."""
    out = check_report_out(cfg.out or default_out(cfg.source), cfg.source, cfg.out is not None)
    source = load_source(cfg.source, cfg.prefer)
    data = analyse(source, cfg)
    s = data["summary"]
    with rundir.staged_output(out, overwrite=True, command="report") as stage:
        images = plots.write_plots(data["series"], stage, alerts=[a.to_record() for a in _anomalies(data)],
                                   dense_ppl=s["dense_perplexity"], pruned_ppl=s["pruned_perplexity"],
                                   lm=s["loss_kind"] == "lm")
        blocks = build_blocks(data, images)
        (stage / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
        (stage / "report.html").write_text(render_html(blocks), encoding="utf-8")
        data["files"] = {"report.md": str(out / "report.md"), "report.html": str(out / "report.html"),
                         "report.json": str(out / "report.json"),
                         **{p.name: str(out / p.name) for p in images.values()}}
        write_json(stage / "report.json", json_safe(data))
    return data


def _anomalies(data: Mapping[str, Any]) -> list[Anomaly]:
    return [Anomaly(**{**a, "basis": tuple(a.get("basis") or ())}) for a in data["anomalies"]]


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
