"""Load a prunetune model directory in the runtimes users serve with, as it is, and compare their perplexity
with `prunetune evaluate` on exactly the same tokens. `make check-runtimes` runs it (it creates the runtimes'
virtualenvs first); outside the default test suite because vLLM is a multi-GiB install.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/runtimes/check_runtimes.py [MODEL_DIR] [--runtimes transformers,vllm]
        [--gguf FILE ...] [--record]

MODEL_DIR defaults to the demo's deployable sparse model (`runs/demo/finetune/model`, else the quick demo's).
Each runtime runs `engine_ppl.py` in its own virtualenv, where prunetune is not importable: the number is what a
user's runtime computes. Exit 0 when every runtime is within `--tolerance` (1%) of prunetune's perplexity, 1 when
one is not or fails to load the directory, 2 for a usage error. `--record` writes the table with the machine into
bench/RESULTS.md (section `runtimes`). `--speed` also times generation in vLLM for each model directory and its
dense base model (the one prune.json names): what a user serving the pruned model gets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

ENGINE = Path(__file__).resolve().parent / "engine_ppl.py"
VENVS = {"transformers": ".venv-hf", "vllm": ".venv-vllm", "llama-cpp": ".venv-llamacpp"}
DEMO_MODELS = ("runs/demo/finetune/model", "runs/demo-quick/finetune/model")


@dataclass
class Outcome:
    runtime: str
    model: str
    perplexity: float | None
    reference: float
    tolerance: float
    error: str | None = None
    record: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        return None if self.perplexity is None else self.perplexity / self.reference - 1

    @property
    def ok(self) -> bool:
        return self.gap is not None and abs(self.gap) <= self.tolerance


def eval_windows(model_dir: str, dataset: str, split: str, seqlen: int, windows: int,
                 data_dir: list[str] | None) -> list[list[int]]:
    """The token windows `prunetune evaluate` scores for this model and data (same tokenizer, same cut)."""
    from prunetune.data import load_text, tokenize, windows_of
    from prunetune.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model_dir))
    ids = tokenize(load_text(dataset, split, data_dir), tokenizer).input_ids
    return windows_of(ids, seqlen, windows).tolist()


def prunetune_perplexity(model_dir: str, dataset: str, split: str, seqlen: int, windows: int, dtype: str,
                         data_dir: list[str] | None) -> dict:
    """`prunetune evaluate --model DIR --seqlen S --max-windows W --dtype D --batch-size 1` as the library runs it."""
    from prunetune.evaluate import EvalConfig, run_evaluate

    return run_evaluate(EvalConfig(model=model_dir, dataset=dataset, split=split, seqlen=seqlen, max_windows=windows,
                                   dtype=dtype, batch_size=1, device="cpu", data_dir=data_dir, quiet=True))


def run_engine(python: list[str], runtime: str, model: str, tokens: Path, dtype: str, *,
               env: dict[str, str] | None = None, extra: list[str] = ()) -> dict:
    """engine_ppl.py's record for one runtime, run by `python` (a runtime's own interpreter) outside the repo."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*python, str(ENGINE), "--engine", runtime, "--model", model, "--tokens", str(tokens),
               "--dtype", dtype, "--out", str(out), *extra]
        clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(cmd, cwd=tmp, env={**clean, "HF_HUB_OFFLINE": "1", **(env or {})},
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            # vLLM's worker processes log their own error to stdout, the wrapper to stderr: read both.
            raise RuntimeError(root_cause(proc.stdout + "\n" + proc.stderr) or f"exit {proc.returncode}")
        return json.loads(out.read_text())


def dense_base(model_dir: str) -> str | None:
    """The dense model a pruned directory came from, as a directory vLLM can load (a GGUF alias is converted once
    into prunetune's cache), or None when prune.json names none."""
    from prunetune.models import materialize, resolve_model
    from prunetune.rundir import read_pruned

    base = read_pruned(model_dir).base_model
    return materialize(resolve_model(base), log=lambda _: None) if base else None


def speed_rows(models: list[str], windows: Path, args: argparse.Namespace) -> list[str]:
    """vLLM generation tokens/s of each pruned directory and of its dense base, as Markdown rows."""
    python = [str(REPO / VENVS["vllm"] / "bin" / "python")]
    rows = []
    for model in models:
        pair = [("dense base", dense_base(model)), ("pruned", model)]
        measured = {}
        for label, path in pair:
            if path is None:
                continue
            print(f"vllm speed: {label} {path} ...", flush=True)
            rec = run_engine(python, "vllm", path, windows, args.speed_dtype,
                             extra=["--speed", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
                                    "--rounds", str(args.rounds)])
            measured[label] = rec
        keys = [k for k in measured.get("pruned", {}) if k.startswith("tokens_per_s")]
        for key in keys:
            dense = measured.get("dense base", {}).get(key)
            pruned = measured["pruned"][key]
            what = key.removeprefix("tokens_per_s_").replace("_", " ")
            rows.append(f"| {Path(model).name} | {what} | {fmt(dense)} | {fmt(pruned)} | "
                        f"{pruned / dense:.2f}x |" if dense else f"| {model} | {what} | - | {fmt(pruned)} | - |")
    return rows


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def root_cause(log: str) -> str:
    """The first exception line of a runtime's log that is not a wrapper ("... initialization failed"):
    vLLM reports the loader's own error in a worker process, then re-raises a generic one."""
    lines = [line.split("] ", 1)[-1].strip() for line in log.splitlines()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|SystemExit)\b", line)
              or line.startswith("prunetune is importable")]
    specific = [e for e in errors if "initialization failed" not in e]
    return (specific or errors or [line for line in lines if line][-1:] or [""])[0][:300]


def default_model() -> str:
    for candidate in DEMO_MODELS:
        if (REPO / candidate / "config.json").is_file():
            return str(REPO / candidate)
    raise SystemExit(f"no demo model found ({', '.join(DEMO_MODELS)}); run `prunetune demo` (or --quick), or "
                     "give MODEL_DIR")


def _table(outcomes: list[Outcome], windows: int, seqlen: int, dtype: str) -> str:
    lines = ["| model | runtime | perplexity | prunetune evaluate | gap | within 1%? | load + score |",
             "|---|---|---:|---:|---:|---|---:|"]
    for o in outcomes:
        ppl = f"{o.perplexity:.4f}" if o.perplexity is not None else "—"
        gap = f"{o.gap:+.3%}" if o.gap is not None else "—"
        verdict = "yes" if o.ok else f"**no**{': ' + o.error if o.error else ''}"
        secs = f"{o.record.get('seconds', 0):.0f} s" if o.record else "—"
        lines.append(f"| {o.model} | {o.runtime} | {ppl} | {o.reference:.4f} | {gap} | {verdict} | {secs} |")
    return "\n".join(lines) + f"\n\n{windows} x {seqlen} tokens, dtype {dtype}."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="*", help="model directories (default: the demo's deployable model)")
    parser.add_argument("--runtimes", default="transformers,vllm")
    parser.add_argument("--gguf", nargs="*", default=[], help="GGUF exports to read back (transformers, llama-cpp)")
    parser.add_argument("--gguf-reference", help="the model directory the GGUF files were exported from")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--dtype", default="auto", help="auto: what `prunetune evaluate` picks on this machine")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--data-dir", action="append")
    parser.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    parser.add_argument("--section", default="runtimes",
                        help="with --record: write section runtimes-NAME of bench/RESULTS.md instead of runtimes")
    parser.add_argument("--refused", nargs="*", default=[],
                        help="directories vLLM is expected to refuse (an old layout, a sparse export): recorded with "
                             "the error; a failure of the check if vLLM loads one")
    parser.add_argument("--speed", action="store_true", help="also time generation in vLLM, dense vs pruned")
    parser.add_argument("--speed-dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from prunetune.devices import dtype_name, resolve_dtype

    dtype = dtype_name(resolve_dtype(args.dtype, "cpu", "eval")[0])
    runtimes = [r for r in args.runtimes.split(",") if r]
    for r in runtimes:
        if r not in VENVS:
            raise SystemExit(f"--runtimes {r!r}: choose from {', '.join(VENVS)}")
    # Absolute paths: each runtime runs in a scratch directory, away from the repository's src/.
    models = [str(Path(m).resolve()) for m in args.model_dir] or [default_model()]
    args.gguf = [str(Path(g).resolve()) for g in args.gguf]
    args.refused = [str(Path(r).resolve()) for r in args.refused]
    if args.gguf_reference:
        args.gguf_reference = str(Path(args.gguf_reference).resolve())
    outcomes: list[Outcome] = []
    versions: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(m, m, rt) for m in models for rt in runtimes]
        # GGUF: Transformers' reader always, llama.cpp when asked; vLLM 0.32 has no GGUF loader any more (pass the
        # file to --refused to record that).
        jobs += [(g, args.gguf_reference or models[0], rt) for g in args.gguf
                 for rt in ("transformers", "llama-cpp") if rt in runtimes or rt == "transformers"]
        references: dict[str, float] = {}
        token_files: dict[str, Path] = {}
        for target, source, runtime in jobs:
            if source not in references:
                ref = prunetune_perplexity(source, args.dataset, args.split, args.seqlen, args.windows, dtype,
                                           args.data_dir)
                references[source] = ref["perplexity"]
                token_files[source] = Path(tmp) / f"tokens-{len(token_files)}.json"
                token_files[source].write_text(json.dumps({"windows": eval_windows(
                    source, args.dataset, args.split, args.seqlen, args.windows, args.data_dir)}))
                print(f"prunetune evaluate {source}: {references[source]:.4f}", flush=True)
            python = [str(REPO / VENVS[runtime] / "bin" / "python")]
            print(f"{runtime}: loading {target} ...", flush=True)
            try:
                record = run_engine(python, runtime, target, token_files[source], dtype)
                outcome = Outcome(runtime, Path(target).name if target.endswith(".gguf") else target,
                                  record["perplexity"], references[source], args.tolerance, record=record)
                versions[runtime] = record.get("versions", {})
            except (RuntimeError, OSError) as err:
                outcome = Outcome(runtime, target, None, references[source], args.tolerance, error=str(err)[:300])
            outcomes.append(outcome)
            print(f"  {outcome.perplexity if outcome.perplexity is not None else 'FAILED'} "
                  f"({'ok' if outcome.ok else outcome.error or f'{outcome.gap:+.3%}'})", flush=True)
        refusals = []
        for target in args.refused:
            print(f"vllm: expecting a refusal of {target} ...", flush=True)
            try:
                extra = ["--tokenizer", models[0]] if target.endswith(".gguf") else []
                run_engine([str(REPO / VENVS["vllm"] / "bin" / "python")], "vllm", target, token_files[models[0]], dtype,
                           extra=extra)
                refusals.append((target, None))
            except RuntimeError as err:
                refusals.append((target, str(err)))
            print(f"  {refusals[-1][1] or 'LOADED (unexpected)'}", flush=True)
        body = _table(outcomes, args.windows, args.seqlen, dtype)
        if refusals:
            body += ("\n\nRefused by vLLM, as expected:\n\n| directory | vLLM's error |\n|---|---|\n"
                     + "\n".join(f"| {t} | {e or '**loaded: the claim is wrong**'} |" for t, e in refusals))
        if args.speed:
            rows = speed_rows(models, token_files[models[0]], args)
            body += (f"\n\nvLLM generation, {args.speed_dtype}, {args.windows} prompts of {args.prompt_len} tokens, "
                     f"{args.new_tokens} new tokens each (greedy, prefill included), best of {args.rounds}:\n\n"
                     "| model | requests | dense tokens/s | pruned tokens/s | pruned / dense |\n|---|---|---:|---:|---:|\n"
                     + "\n".join(rows))
    print(body)
    if args.record:
        from results import machine_line, write_section

        vers = "; ".join(f"{rt}: " + ", ".join(f"{k} {v}" for k, v in sorted(v.items())) for rt, v in versions.items())
        title = "Serving runtimes load the outputs as they are (bench/runtimes, issue 21)"
        # Namespaced: a section of another bench script (e.g. `speed`, `demo`) is never overwritten.
        name = "runtimes" if args.section == "runtimes" else f"runtimes-{args.section}"
        write_section(name, title if args.section == "runtimes" else f"{title}: {args.section}",
                      f"{machine_line()}\n\nRuntime venvs: {vers}.\n\n{body}")
    return 0 if all(o.ok for o in outcomes) and all(e for _, e in refusals) else 1


if __name__ == "__main__":
    sys.exit(main())
