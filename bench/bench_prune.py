"""Pruning on the real SmolLM2-135M: dense vs unstructured / 2:4 / block16x16 at 50% (Wanda), each with and
without --reconstruct. Records WikiText-2 test perplexity on a fixed subset of windows, pruning seconds and peak
memory (RSS) per configuration in bench/RESULTS.md (section "prune").

Each configuration runs in its own process so its peak RSS is its own. Results are appended to a JSONL file as
they come, and the RESULTS.md section is rewritten after every configuration, so a long run leaves partial data.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_prune.py --data-dir /work/shared/data

`--floor` (issue 13) instead times each configuration's prune against the floor, one forward pass of the
whole model over the same calibration windows (same process, same threads, same compute dtype), and prints
one JSON line per configuration with the ratio; nothing is written to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import machine_line, write_section

CONFIGS = [
    ("dense", None, False),
    ("unstructured", "unstructured", False),
    ("unstructured", "unstructured", True),
    ("2:4", "2:4", False),
    ("2:4", "2:4", True),
    ("block16x16", "block16x16", False),
    ("block16x16", "block16x16", True),
    # Blocks ranked within each 16-row band instead of across the matrix (`--compare band`).
    ("block16x16 band", "block16x16", False),
    ("block16x16 band", "block16x16", True),
]


def worker(spec: dict) -> dict:
    import torch
    from rich.console import Console

    from prunetune.data import load_text, tokenize
    from prunetune.models import load_model
    from prunetune.perplexity import perplexity
    from prunetune.pruning.config import PruneConfig
    from prunetune.pruning.engine import run_prune

    torch.manual_seed(0)
    result: dict = {"name": spec["name"], "reconstruct": spec["reconstruct"]}
    model_dir = spec["model"]
    if spec["pattern"] is not None:
        out = Path(spec["tmp"]) / f"{spec['name'].replace(':', '-').replace(' ', '-')}-{int(spec['reconstruct'])}"
        cfg = PruneConfig(
            model=spec["model"], out=str(out), method="wanda", pattern=spec["pattern"], sparsity=0.5,
            calib_dataset="wikitext2", data_dir=spec["data_dir"], nsamples=spec["nsamples"], seqlen=spec["seqlen"],
            seed=0, reconstruct=spec["reconstruct"], overwrite=True, device="cpu",
            compare="band" if spec["name"].endswith(" band") else None,
        )
        run_prune(cfg, console=Console(file=sys.stderr, width=120))
        info = json.loads((out / "prune.json").read_text())
        result.update(prune_s=info["timings"]["prune_s"] + info["timings"].get("capture_s", 0.0),
                      total_s=info["timings"]["total_s"], peak_rss_mib=info["peak_rss_mib"],
                      sparsity=info["overall"]["achieved"], pattern_ok=info["pattern_check"]["ok"])
        model_dir = str(out)
    model, tok = load_model(model_dir, log=lambda *_: None)
    if spec["pattern"] is None:
        result.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, sparsity=0.0)
    ids = tokenize(load_text("wikitext2", "test", spec["data_dir"]), tok).input_ids
    ppl = perplexity(model, ids, spec["eval_seqlen"], max_windows=spec["eval_windows"])
    result.update(perplexity=ppl.perplexity, eval_windows=ppl.windows, eval_s=ppl.seconds)
    return result


def floor_seconds(model_spec: str, data_dir: str, nsamples: int, seqlen: int, dtype: str | None) -> dict:
    """Seconds of one forward pass over the calibration windows (window by window, as calibration runs): the
    fastest of three passes."""
    import torch

    from prunetune.data import load_text, tokenize
    from prunetune.models import load_model
    from prunetune.pruning import calibration as cal
    from prunetune.pruning.precision import resolve_precision

    precision = resolve_precision(dtype, "cpu")
    model, tok = load_model(model_spec, dtype=precision.storage, log=lambda *_: None)
    windows = cal.calibration_windows(tokenize(load_text("wikitext2", "train", data_dir), tok).input_ids,
                                      nsamples, seqlen, 0)
    passes = []
    with torch.no_grad(), precision.autocast():
        model(input_ids=windows[:1], use_cache=False)  # warm-up
        for _ in range(3):  # the fastest of three: one pass varied by ~15% on a quiet 2-core machine
            t = time.perf_counter()
            for i in range(nsamples):
                model(input_ids=windows[i : i + 1], use_cache=False)
            passes.append(time.perf_counter() - t)
    return {"forward_s": min(passes), "passes_s": [round(p, 2) for p in passes], "dtype": precision.record()}


def breakdown_main(args: argparse.Namespace) -> int:
    """Seconds per phase on the first `--breakdown` decoder layers, each phase from the same dense weights:
    one plain forward of the layer over the windows (its share of the floor), the forward with Wanda's norm
    hooks and with Hessian hooks, the Wanda masks, CG reconstruction (unstructured), per-band least squares
    (block16x16) and SparseGPT, modules reading one input sharing their HessianFactors."""
    import torch

    from prunetune.architecture import find_decoder_layers, linear_modules
    from prunetune.data import load_text, tokenize
    from prunetune.models import load_model
    from prunetune.pruning import calibration as cal
    from prunetune.pruning.matrix import MatrixRecipe, prune_matrix
    from prunetune.pruning.precision import resolve_precision
    from prunetune.pruning.sparsegpt import HessianFactors
    from prunetune.sparsity.patterns import parse_pattern

    precision = resolve_precision(args.dtype, "cpu")
    model, tok = load_model(args.model, dtype=precision.storage, log=lambda *_: None)
    windows = cal.calibration_windows(tokenize(load_text("wikitext2", "train", args.data_dir), tok).input_ids,
                                      args.nsamples, args.seqlen, 0)
    _, layers = find_decoder_layers(model)
    with precision.autocast():
        inputs = cal.capture_first_layer_inputs(model, layers[0], windows, "cpu")
    recipes = {"wanda": MatrixRecipe("wanda", parse_pattern("unstructured"), "row"),
               "wanda+cg": MatrixRecipe("wanda", parse_pattern("unstructured"), "row", reconstruct=True),
               "block16+ls": MatrixRecipe("wanda", parse_pattern("block16x16"), "matrix", reconstruct=True),
               "sparsegpt": MatrixRecipe("sparsegpt", parse_pattern("unstructured"), "obs")}
    for i, layer in enumerate(layers[: args.breakdown]):
        mods = linear_modules(layer)
        row: dict[str, float] = {}
        outs = torch.empty_like(inputs.hidden)
        for label, hooks in (("forward", None), ("forward+norms", False), ("forward+hessian", True)):
            t = time.perf_counter()
            with precision.autocast(), (cal.collecting(mods, hessian=hooks) if hooks is not None
                                        else contextlib.nullcontext()) as stats:
                cal.run_layer(layer, inputs, outs)
            row[label] = time.perf_counter() - t
            kept = stats if hooks is not None else None
            if hooks is False:
                norms = kept
            elif hooks:
                hess = kept
        for label, recipe in recipes.items():
            t = time.perf_counter()
            factors: dict[int, HessianFactors] = {}
            for name, module in mods.items():
                h = hess.hessians[name]
                if id(h) not in factors:  # q/k/v and gate/up: one damped H and factorisation per input
                    factors[id(h)] = HessianFactors(h)
                prune_matrix(module.weight.data, recipe, 0.5, col_sq_norms=norms.col_sq_norms(name),
                             factors=factors[id(h)])
            row[label] = time.perf_counter() - t
        inputs.hidden, outs = outs, inputs.hidden
        print(json.dumps({"layer": i, **{k: round(v, 2) for k, v in row.items()}}), flush=True)
    return 0


def floor_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prunetune.pruning.config import PruneConfig
    from prunetune.pruning.engine import run_prune

    floor = floor_seconds(args.model, args.data_dir, args.nsamples, args.seqlen, args.dtype)
    print(json.dumps({"floor": floor, "nsamples": args.nsamples, "seqlen": args.seqlen}), flush=True)
    chosen = [CONFIGS[int(i)] for i in args.only.split(",")] if args.only else CONFIGS[1:]
    with tempfile.TemporaryDirectory(prefix="bench_prune_floor_") as tmp:
        for name, pattern, rec in chosen:
            cfg = PruneConfig(model=args.model, out=f"{tmp}/{len(os.listdir(tmp))}", pattern=pattern, sparsity=0.5,
                              calib_dataset="wikitext2", data_dir=args.data_dir, nsamples=args.nsamples,
                              seqlen=args.seqlen, reconstruct=rec, device="cpu", dtype=args.dtype,
                              compare="band" if name.endswith(" band") else None, sequential=not args.one_shot)
            run_prune(cfg, console=Console(file=sys.stderr, width=120))
            t = json.loads((Path(cfg.out) / "prune.json").read_text())["timings"]
            prune_s = t["prune_s"] + t.get("capture_s", 0.0)
            print(json.dumps({"name": name, "reconstruct": rec, "one_shot": args.one_shot, "prune_s": round(prune_s, 2),
                              "x_floor": round(prune_s / floor["forward_s"], 2), "timings": t}), flush=True)
    return 0


def _table(rows: list[dict], args: argparse.Namespace, wall: float, done: bool) -> str:
    lines = [
        machine_line(),
        "",
        f"Model `smollm2-135m` (SmolLM2-135M-Instruct, GGUF Q4_1 de-quantised to float32), CPU, float32. "
        f"Wanda at 50% (unstructured: per output row; 2:4: 2 zeros of every 4; block16x16: whole tiles ranked per "
        f"matrix, or per 16-row band with `band`). Calibration: {args.nsamples} windows x {args.seqlen} tokens from the WikiText-2 train head "
        f"(seed 0), sequential. Perplexity: WikiText-2 test, seqlen {args.eval_seqlen}, the first "
        f"{args.eval_windows} windows. `--reconstruct`: exact per-band least squares for blocks, CG least "
        "squares for unstructured/2:4 (dampening 1%). Pruning seconds = calibration capture + layer walk; "
        "peak RSS of the pruning process. The 2 cores were shared with other jobs (load average 3-9 during "
        "the run), so the seconds are upper bounds and not comparable row to row.",
        "",
        "| pattern | reconstruct | sparsity | perplexity | pruning s | total s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = "-" if r["name"] == "dense" else ("yes" if r["reconstruct"] else "no")
        lines.append(
            f"| {r['name']} | {rec} | {r['sparsity']:.2%} | {r['perplexity']:.2f} | "
            f"{r.get('prune_s', 0):.1f} | {r.get('total_s', 0):.1f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += ["", f"Bench wall time: {wall / 60:.1f} min{'' if done else ' (partial: still running or stopped)'}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--only", default=None, help="comma list of indexes into the config list (0 = dense)")
    parser.add_argument("--jsonl", default="/tmp/bench_prune.jsonl", help="results as they come")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --jsonl, run only the others")
    parser.add_argument("--floor", action="store_true", help="time each prune against one forward pass (issue 13)")
    parser.add_argument("--one-shot", action="store_true", help="--floor: prune with --one-shot")
    parser.add_argument("--dtype", default=None, help="--floor: auto (default) | float32 | bfloat16")
    parser.add_argument("--breakdown", type=int, default=0, help="seconds per phase on the first N layers")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.breakdown:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return breakdown_main(args)
    if args.floor:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return floor_main(args)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = [CONFIGS[int(i)] for i in args.only.split(",")] if args.only else CONFIGS
    rows: list[dict] = []
    if args.resume and Path(args.jsonl).is_file():
        rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
        have = {(r["name"], r["reconstruct"]) for r in rows}
        chosen = [c for c in chosen if (c[0], c[2]) not in have]
        rows.sort(key=lambda r: next(i for i, c in enumerate(CONFIGS) if (c[0], c[2]) == (r["name"], r["reconstruct"])))
    elif Path(args.jsonl).is_file():
        Path(args.jsonl).unlink()
    start = time.perf_counter() - sum(r.get("wall_s", r.get("total_s", 0.0) + r["eval_s"]) for r in rows)
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        for name, pattern, rec in chosen:
            spec = dict(name=name, pattern=pattern, reconstruct=rec, model=args.model, data_dir=args.data_dir,
                        nsamples=args.nsamples, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                        eval_windows=args.eval_windows, tmp=tmp)
            t_config = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"config {name} reconstruct={rec} failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t_config
            rows.append(row)
            rows.sort(key=lambda r: next(i for i, c in enumerate(CONFIGS) if (c[0], c[2]) == (r["name"], r["reconstruct"])))
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            write_section("prune", "Pruning SmolLM2-135M (prunetune prune)",
                          _table(rows, args, time.perf_counter() - start, done=False))
    write_section("prune", "Pruning SmolLM2-135M (prunetune prune)", _table(rows, args, time.perf_counter() - start, done=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
