"""What bf16 calibration costs (issue 22, item 4): every (pattern, method, seed) cell is pruned twice, with the
calibration forwards in bf16 autocast and in float32, back to back, and both pruned models are scored on the same
WikiText-2 test windows in float32. The per-cell numbers feed `pruning/precision.py`'s rule for `--dtype auto`
and bench/RESULTS.md (section "calib-precision").

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/bench_calib_precision.py --data-dir /work/shared/data

Each arm runs `run_prune` in this process (same threads, the model loaded from the cache each time) and records
the prune's own seconds from prune.json (capture + layer walk: load and save excluded) with the load average
before it. The two precisions of a cell run one right after the other, the first of the pair alternating with the
seed, so their time ratio is taken under the same load; times of different cells are not comparable on a shared
machine. Results go to a JSONL as they come (`--resume` keeps them), and the section is rewritten after every cell.

`--windows-out FILE --seed S` writes the exact calibration windows of seed S (as prunetune draws them) for the
llm-compressor run (bench/llmcompressor/wanda_oneshot.py), and `--score DIR [DIR ...]` scores any model directory
on the same test windows (`--masks-ref DIR ...`: and compares its zero pattern with theirs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import machine_line, write_section

PRECISIONS = ("bfloat16", "float32")
JSON_OUT = Path(__file__).resolve().parent / "calib_precision.json"
"""Every row and the per-(pattern, method) summary, machine-readable: `pruning/precision.py`'s MEASURED table is
checked against it (tests/test_pruning_precision.py)."""
SECTION = ("calib-precision", "Calibration precision: what bf16 costs (bench/bench_calib_precision.py, issue 22)")


def eval_ids(model_dir: str, data_dir: str):
    from prunetune.data import load_text, tokenize
    from prunetune.models import load_tokenizer

    return tokenize(load_text("wikitext2", "test", data_dir), load_tokenizer(model_dir)).input_ids


def score(model_dir: str, ids, seqlen: int, windows: int) -> float:
    """Perplexity of a model directory in float32 on the first `windows` test windows (prunetune's protocol)."""
    from prunetune.models import load_model
    from prunetune.perplexity import perplexity

    model, _ = load_model(model_dir, dtype="float32", log=lambda *_: None)
    return perplexity(model, ids, seqlen, max_windows=windows).perplexity


def zero_patterns(model_dir: str) -> dict:
    """Which weights are zero, per prunable matrix (weight == 0: the same reading for any tool's output)."""
    from prunetune.architecture import prunable_linears
    from prunetune.models import load_model

    model, _ = load_model(model_dir, dtype="float32", log=lambda *_: None)
    return {n: (m.weight.data != 0) for n, m in prunable_linears(model).items()}


def agreement(a: dict, b: dict) -> dict:
    """Fraction of weights on which two keep patterns agree: overall, and on layer 0 (whose inputs are the dense
    model's in both runs, so any difference there is scoring, not propagated activations)."""
    same = total = same0 = total0 = 0
    for name, keep in a.items():
        eq = int((keep == b[name]).sum())
        same, total = same + eq, total + keep.numel()
        if ".layers.0." in name:
            same0, total0 = same0 + eq, total0 + keep.numel()
    return {"overall": same / total, "layer0": same0 / total0 if total0 else None}


def prune_arm(spec: dict, dtype: str, out: str) -> dict:
    from rich.console import Console

    from prunetune.pruning.config import PruneConfig
    from prunetune.pruning.engine import run_prune

    cfg = PruneConfig(model=spec["model"], out=out, method=spec["method"], pattern=spec["pattern"],
                      sparsity=None if ":" in spec["pattern"] else 0.5, calib_dataset="wikitext2",
                      data_dir=spec["data_dir"], nsamples=spec["nsamples"], seqlen=spec["seqlen"], seed=spec["seed"],
                      overwrite=True, device="cpu", dtype=dtype)
    load = os.getloadavg()[0]
    run_prune(cfg, console=Console(file=sys.stderr, width=120))
    info = json.loads((Path(out) / "prune.json").read_text())
    t = info["timings"]
    return {"prune_s": round(t["prune_s"] + t.get("capture_s", 0.0), 2), "total_s": t["total_s"], "load": load,
            "windows_sha256": info["calibration"]["windows_sha256"], "compute": info["dtype"]["compute"]}


def run_cell(spec: dict, ids, tmp: str, first: str) -> dict:
    order = (first, *[p for p in PRECISIONS if p != first])
    row = {k: spec[k] for k in ("pattern", "method", "seed", "eval_windows")} | {"first": first}
    outs = {}
    for dtype in order:  # back to back: the time ratio is taken under the same load
        outs[dtype] = f"{tmp}/{dtype}"
        row[dtype] = prune_arm(spec, dtype, outs[dtype])
    for dtype in order:
        row[dtype]["perplexity"] = score(outs[dtype], ids, spec["eval_seqlen"], spec["eval_windows"])
    assert row["bfloat16"]["windows_sha256"] == row["float32"]["windows_sha256"]
    row["mask_agreement"] = agreement(zero_patterns(outs["bfloat16"]), zero_patterns(outs["float32"]))
    row["cost_pct"] = 100 * (row["bfloat16"]["perplexity"] / row["float32"]["perplexity"] - 1)
    row["time_x"] = row["float32"]["prune_s"] / row["bfloat16"]["prune_s"]
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per (pattern, method): mean and spread of bf16's perplexity cost over the seeds, and the time ratio."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pattern"], r["method"]), []).append(r)
    out = []
    for (pattern, method), rs in groups.items():
        costs = [r["cost_pct"] for r in rs]
        out.append({"pattern": pattern, "method": method, "seeds": len(rs), "mean_cost_pct": statistics.mean(costs),
                    "sd_cost_pct": statistics.stdev(costs) if len(costs) > 1 else None,
                    "min_cost_pct": min(costs), "max_cost_pct": max(costs),
                    "mean_time_x": statistics.mean(r["time_x"] for r in rs),
                    "mean_ppl_fp32": statistics.mean(r["float32"]["perplexity"] for r in rs),
                    "mean_ppl_bf16": statistics.mean(r["bfloat16"]["perplexity"] for r in rs)})
    return out


def _table(rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        machine_line(),
        "",
        f"Model `smollm2-135m` (SmolLM2-135M-Instruct, GGUF Q4_1 de-quantised to float32; weights stored float32 in "
        f"both arms). 50% sparsity (2:4: 2 zeros of every 4), sequential, no reconstruction. Calibration: "
        f"{args.nsamples} windows x {args.seqlen} tokens of the WikiText-2 train head, drawn by the seed (both arms "
        f"of a row calibrate on the same windows: same sha256). bf16 = the forward passes under bf16 autocast (what "
        f"`--dtype auto` ran on this CPU before this change); statistics, Hessians and SparseGPT are float32 in both. "
        f"Perplexity: WikiText-2 test, the first N windows of {args.eval_seqlen} tokens (N in the row: 64 as in the "
        f"issue, 32 where the machine's load left no time for 64), evaluated in float32, the same windows for both "
        f"arms of a row. Prune s = calibration capture + layer walk, each arm's own; the two arms of a row ran back to "
        f"back (the first named in the row), with `nice -n 10` and one thread (`OMP_NUM_THREADS=1`: with ~15 runnable "
        f"processes on the 2 cores, two threads per process ran a layer ~4x slower) beside other developers' jobs "
        f"(load average before each arm given): compare times only within a row; on 2 quiet cores the issue measured "
        f"19 s (bf16) vs 49 s (float32) for the Wanda 2:4 prune. Mask agreement: fraction of weights "
        f"whose kept/pruned state is the same in the two arms (all matrices; layer 0 alone).",
        "",
        "| pattern | method | seed | test windows | ppl float32 | ppl bf16 | bf16 cost | prune s float32 | prune s bf16 "
        "| float32 time x | masks agree (layer 0) | load (fp32 / bf16) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        f, b = r["float32"], r["bfloat16"]
        lines.append(
            f"| {r['pattern']} | {r['method']} | {r['seed']} | {r.get('eval_windows', 64)} | {f['perplexity']:.2f} | {b['perplexity']:.2f} | "
            f"{r['cost_pct']:+.2f}% | {f['prune_s']:.1f} | {b['prune_s']:.1f} | {r['time_x']:.2f}x | "
            f"{r['mask_agreement']['overall']:.2%} ({r['mask_agreement']['layer0']:.2%}) | "
            f"{f['load']:.1f} / {b['load']:.1f} ({'fp32' if r['first'] == 'float32' else 'bf16'} first) |"
        )
    lines += ["", "Per pattern and method, over the seeds (bf16 cost = ppl bf16 / ppl float32 - 1):", "",
              "| pattern | method | seeds | mean ppl float32 | mean ppl bf16 | mean bf16 cost | sd | range | "
              "float32 time x |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for s in summarise(rows):
        sd = f"{s['sd_cost_pct']:.2f}%" if s["sd_cost_pct"] is not None else "-"
        lines.append(f"| {s['pattern']} | {s['method']} | {s['seeds']} | {s['mean_ppl_fp32']:.2f} | "
                     f"{s['mean_ppl_bf16']:.2f} | {s['mean_cost_pct']:+.2f}% | {sd} | "
                     f"{s['min_cost_pct']:+.2f}% .. {s['max_cost_pct']:+.2f}% | {s['mean_time_x']:.2f}x |")
    lines += ["", f"Bench wall time: {wall / 60:.1f} min (pruning, evaluation and mask comparison of the rows)."]
    return "\n".join(lines)


def publish(rows: list[dict], args: argparse.Namespace) -> None:
    """bench/RESULTS.md's section and bench/calib_precision.json, from all the rows so far."""
    from prunetune.runinfo import machine, versions, write_json

    rows.sort(key=lambda r: (r["pattern"], r["method"], r["seed"]))
    wall = sum(r.get("wall_s", 0.0) for r in rows)
    write_section(*SECTION, _table(rows, args, wall))
    config = {k: getattr(args, k) for k in ("model", "nsamples", "seqlen", "eval_seqlen")}
    config["eval_windows"] = sorted({r.get("eval_windows", 64) for r in rows})  # per row: see each row
    write_json(JSON_OUT, {"config": config | {"calib_dataset": "wikitext2 train head", "sparsity": 0.5},
                          "machine": machine(), "versions": versions(), "summary": summarise(rows), "rows": rows})


def write_windows(args: argparse.Namespace) -> int:
    """The calibration windows prunetune draws for --seed, as a (nsamples, seqlen) int64 tensor file."""
    import torch

    from prunetune.models import load_tokenizer
    from prunetune.pruning.config import PruneConfig
    from prunetune.pruning.setup import calibration_windows

    cfg = PruneConfig(model=args.model, out="unused", calib_dataset="wikitext2", data_dir=args.data_dir,
                      nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    windows, info = calibration_windows(cfg, load_tokenizer(args.model))
    torch.save(windows.to(torch.int64), args.windows_out)
    print(json.dumps({"windows": args.windows_out, "sha256": info["windows_sha256"], "shape": list(windows.shape)}))
    return 0


def score_main(args: argparse.Namespace) -> int:
    ids = eval_ids(args.score[0], args.data_dir)
    refs = {d: zero_patterns(d) for d in args.masks_ref or []}
    for d in args.score:
        row = {"model": d, "eval_windows": args.eval_windows,
               "perplexity": score(d, ids, args.eval_seqlen, args.eval_windows)}
        zeros = zero_patterns(d)
        row["mask_agreement"] = {ref: agreement(keep, zeros) for ref, keep in refs.items()}
        print(json.dumps(row), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--patterns", default="unstructured,2:4,block16x16")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--jsonl", default="/tmp/bench_calib_precision.jsonl", help="results as they come")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --jsonl, run only the others")
    parser.add_argument("--render", action="store_true", help="rewrite the section and JSON from --jsonl, run nothing")
    parser.add_argument("--no-write", action="store_true", help="leave bench/RESULTS.md alone")
    parser.add_argument("--keep", default=None, help="keep the pruned models under this directory")
    parser.add_argument("--windows-out", default=None, help="write the calibration windows of --seed and stop")
    parser.add_argument("--seed", type=int, default=0, help="with --windows-out")
    parser.add_argument("--score", nargs="+", default=None, help="score these model directories and stop")
    parser.add_argument("--masks-ref", nargs="+", default=None,
                        help="with --score: compare each scored model's zeros with these directories' (not scored)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.windows_out:
        return write_windows(args)
    if args.score:
        return score_main(args)
    cells = [(p, m, int(s)) for s in args.seeds.split(",") for p in args.patterns.split(",")
             for m in args.methods.split(",")]
    rows: list[dict] = []
    if args.resume and Path(args.jsonl).is_file():
        rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
        have = {(r["pattern"], r["method"], r["seed"]) for r in rows}
        cells = [c for c in cells if c not in have]
    elif Path(args.jsonl).is_file():
        Path(args.jsonl).unlink()
    if args.render:
        publish(rows, args)
        return 0
    from prunetune.models import materialize, resolve_model

    model_dir = materialize(resolve_model(args.model), log=lambda *_: None)
    ids = eval_ids(model_dir, args.data_dir)
    for pattern, method, seed in cells:
        spec = dict(model=args.model, data_dir=args.data_dir, pattern=pattern, method=method, seed=seed,
                    nsamples=args.nsamples, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                    eval_windows=args.eval_windows)
        t_cell = time.perf_counter()
        if args.keep:  # the pruned models stay, e.g. to compare their masks with llm-compressor's
            keep = Path(args.keep) / f"{pattern.replace(':', '-')}-{method}-s{seed}"
            keep.mkdir(parents=True, exist_ok=True)
            row = run_cell(spec, ids, str(keep), first=PRECISIONS[seed % 2])
        else:
            with tempfile.TemporaryDirectory(prefix="bench_calib_") as tmp:
                row = run_cell(spec, ids, tmp, first=PRECISIONS[seed % 2])
        row["wall_s"] = round(time.perf_counter() - t_cell, 1)
        rows.append(row)
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        if not args.no_write:
            publish(rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
