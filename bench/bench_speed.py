"""Shipping numbers on the real SmolLM2-135M: compressed-tensors export sizes (block16x16 50% and 2:4), and
`prunetune speed` (dense vs pruned with dense kernels vs pruned with sparse kernels) with the 16x16-BSR break-even
sparsity at SmolLM2's matrix shapes, measured on this machine.

Pruning uses magnitude scores (no calibration: seconds, not minutes); speed and size depend only on the pattern
and the sparsity, not on which weights were chosen. Writes a Markdown section (between `<!-- bench:speed -->`
markers) into `--out` (default bench/RESULTS.md) and the raw results next to it as JSON.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_speed.py --out /work/notes/ship.md

One torch thread: on a 2-core machine shared with other jobs, two OpenMP threads spin against each other and a
single forward pass took minutes. The speed rows take turns (`prunetune speed` measures the variants in rounds and
keeps each one's fastest round), the sweep likewise, so background load hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunetune.fmt import fmt_num
from results import RESULTS, machine_line


def write_section(path: Path, name: str, title: str, body: str) -> None:
    """Replace (or append) the section `name` of `path`, marked as bench/results.py marks RESULTS.md sections."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text.lstrip())


def _prune(model: str, out: Path, pattern: str) -> Path:
    from rich.console import Console

    from prunetune.pruning.config import PruneConfig
    from prunetune.pruning.engine import run_prune

    if (out / "prune.json").is_file():
        return out
    return run_prune(PruneConfig(model=model, out=str(out), method="magnitude", pattern=pattern,
                                 sparsity=None if ":" in pattern else 0.5, device="cpu"), console=Console(quiet=True))


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", default=None, help="where the pruned and exported models go (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS), help="Markdown file whose `speed` section is rewritten")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="break-even sweep: best of N interleaved runs")
    parser.add_argument("--sweep-tokens", type=int, default=512, help="break-even sweep: tokens of the prefill case")
    parser.add_argument("--part", choices=("all", "models", "sweep"), default="all")
    args = parser.parse_args()
    out = Path(args.out)
    if args.part in ("all", "models"):
        models(args, out)
    if args.part in ("all", "sweep"):
        sweep(args, out)


def sweep(args: argparse.Namespace, out: Path) -> None:
    import torch

    from prunetune.speed import SMOLLM2_SHAPES, SWEEP_SPARSITIES, breakeven_sweep

    load_start = os.getloadavg()
    header = machine_line()
    results = [breakeven_sweep(shape, tokens, SWEEP_SPARSITIES, (16, 16), "cpu", torch.float32, rounds=args.rounds)
               for tokens in (args.sweep_tokens, 1) for shape in SMOLLM2_SHAPES.values()]
    load_end = os.getloadavg()
    lines = [header, "",
             f"Load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, at end "
             f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; {torch.get_num_threads()} torch thread(s). Each "
             f"cell: dense time / BSR time, each the fastest of {args.rounds} runs taken in turns (above 1: BSR "
             "faster). Break-even: the lowest swept sparsity from which BSR stays faster.", "",
             "| tokens | shape (out x in) | " + " | ".join(f"{s:.0%}" for s in SWEEP_SPARSITIES) + " | break-even |",
             "|---:|---|" + "---:|" * (len(SWEEP_SPARSITIES) + 1)]
    for r in results:
        cells = " | ".join(f"{row['speedup']:.2f}x" for row in r["rows"])
        even = r["breakeven_sparsity"]
        lines.append(f"| {r['tokens']} | {r['shape'][0]} x {r['shape'][1]} | {cells} | "
                     f"{'not reached' if even is None else f'{even:.0%}'} |")
    write_section(out, "speed-breakeven", "16x16 BSR vs dense matmul at SmolLM2 shapes (issue 14)", "\n".join(lines))
    out.with_name("bench_speed_breakeven.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


def models(args: argparse.Namespace, out: Path) -> None:
    from prunetune.export.run import ExportConfig, run_export
    from prunetune.speed import SpeedConfig, run_speed, speedup_table

    load_start = os.getloadavg()
    header = machine_line()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-speed-"))
    sizes = []
    pruned: dict[str, Path] = {}
    for pattern in ("block16x16", "2:4"):
        t = time.perf_counter()
        pruned[pattern] = _prune(args.model, work / f"pruned-{pattern.replace(':', '_')}", pattern)
        prune_s = time.perf_counter() - t
        t = time.perf_counter()
        result = run_export(ExportConfig(model_dir=str(pruned[pattern]),
                                                out=str(work / f"export-{pattern.replace(':', '_')}"),
                                                overwrite=True))
        sizes.append({"pattern": pattern, "compressor": result.record["compressor"], "sparsity": result.sparsity,
                      "dense_bytes": result.record["bytes"]["dense_safetensors"],
                      "compressed_bytes": result.record["bytes"]["compressed_safetensors"],
                      "linear_dense_bytes": result.record["bytes"]["linear_dense"],
                      "linear_compressed_bytes": result.record["bytes"]["linear_compressed"], "verified": result.verified,
                      "matrices": result.matrices, "export_s": time.perf_counter() - t, "prune_s": prune_s})

    speed = run_speed(SpeedConfig(model_dir=str(pruned["block16x16"]), dense=args.model, batch=args.batch,
                                  seqlen=args.seqlen, new_tokens=args.new_tokens, repeats=args.repeats,
                                  breakeven=False, device="cpu"))
    speed_24 = run_speed(SpeedConfig(model_dir=str(pruned["2:4"]), dense=None, batch="1", seqlen=args.seqlen,
                                     new_tokens=args.new_tokens, repeats=args.repeats, breakeven=False,
                                     device="cpu"))
    load_end = os.getloadavg()

    lines = [header, "",
             f"Load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, "
             f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} on this shared machine: the absolute "
             "tokens/s are depressed and noisy; compare rows measured together.", "",
             f"### compressed-tensors export ({args.model}, magnitude, float32)", "",
             "| pattern | compressor | sparsity | model safetensors dense MiB | compressed MiB | ratio | "
             "decoder linears dense MiB | compressed MiB | round trip |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in sizes:
        lines.append(
            f"| {s['pattern']} | {s['compressor']} | {s['sparsity']:.2%} | {_mib(s['dense_bytes'])} | "
            f"{_mib(s['compressed_bytes'])} | {s['compressed_bytes'] / s['dense_bytes']:.2f} | "
            f"{_mib(s['linear_dense_bytes'])} | {_mib(s['linear_compressed_bytes'])} | "
            f"{s['verified']}/{s['matrices']} bit-exact |")
    lines += ["", "The embedding (tied with the head) stays dense: it is 28 M of the 135 M parameters.", ""]
    for title, res in ((f"block16x16 50% (batch {args.batch})", speed), ("2:4 (batch 1)", speed_24)):
        lines += [f"### `prunetune speed`: {title}, seqlen {args.seqlen}, {args.new_tokens} new tokens, "
                  f"{res.device} {res.dtype}", "",
                  f"Sparse kernel: {res.kernel}.", "",
                  "| variant | batch | forward tokens/s | x | generate tokens/s | x | weights MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in speedup_table(res):
            lines.append(
                f"| {row['variant']} | {row['batch']} | {fmt_num(row['forward_tokens_per_s'], ',.0f')} | "
                f"{fmt_num(row['forward_x'], '.2f')} | {fmt_num(row['generate_tokens_per_s'], ',.1f')} | "
                f"{fmt_num(row['generate_x'], '.2f')} | {row['weight_mib']:,.1f} |")
        lines.append("")
    write_section(out, "speed", "Export size and inference speed (issue 14)", "\n".join(lines))
    raw = out.with_name("bench_speed.json") if out.suffix == ".md" else out.with_suffix(".json")
    raw.write_text(json.dumps({"sizes": sizes, "speed": speed.to_json(), "speed_24": speed_24.to_json(),
                               "load_start": load_start, "load_end": load_end}, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
