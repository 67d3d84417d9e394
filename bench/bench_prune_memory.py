"""Peak host memory of `prunetune prune` (issue 23): SmolLM2-135M pruned with its decoder layers streamed from the
checkpoint's shards (the default), with the whole model loaded (`--no-stream`), and by the code before streaming
(`--base REV`: that commit's `src/`, extracted with `git archive`), each arm in a process of its own. Every arm must
write the same bytes: the sha256 of `prunetune/masks.safetensors` and of every weight shard are compared. Then the
same formula, checked against the measurement here, projects the peak for Llama-2-7B/13B/70B. Writes the section
"prune-memory" of bench/RESULTS.md.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/bench_prune_memory.py --base 9bcf249

Memory is what the model adds to the process: the peak RSS after the point just before the model loads, minus
the RSS at that point (imports, tokenizer and calibration text come before it; on Linux the high-water mark is
reset there, /proc/self/clear_refs, so an earlier peak does not count). The code before streaming loaded the
tokenizer after the model; its mark is set where it called `load_model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 2**20
GIB = 2**30


# ---- one arm, in its own process ----

def _hwm_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(spec: dict) -> dict:
    sys.path.insert(0, spec["src"])  # the arm's code, before the installed package
    import psutil
    from rich.console import Console

    import prunetune.pruning.engine as engine
    from prunetune.pruning.config import PruneConfig

    mark: dict[str, float] = {}
    if spec["arm"] == "before":  # no memory record in that version: mark where it loaded the model
        load_model = engine.load_model

        def marked(*args, **kwargs):
            mark["rss"] = psutil.Process().memory_info().rss / MIB
            Path("/proc/self/clear_refs").write_text("5")
            return load_model(*args, **kwargs)

        engine.load_model = marked
    kwargs = dict(spec["config"])
    if spec["arm"] != "before":
        kwargs["stream"] = spec["arm"] == "streamed"
    cfg = PruneConfig(model=spec["model"], out=spec["out"], data_dir=spec["data_dir"], device="cpu",
                      overwrite=True, **kwargs)
    started = time.perf_counter()
    out = engine.run_prune(cfg, console=Console(file=sys.stderr, width=120))
    seconds = time.perf_counter() - started
    record = json.loads((out / "prune.json").read_text())
    memory = record.get("memory") or {"rss_before_model_mib": mark["rss"], "peak_rss_mib": _hwm_mib(),
                                      "weights": "the whole model in memory (before streaming)"}
    files = sorted(p for p in out.rglob("*.safetensors")) + sorted(out.glob("*.index.json")) + [out / "config.json"]
    return {"arm": spec["arm"], "seconds": seconds, "prune_s": record["timings"].get("prune_s"),
            "rss_before_mib": memory["rss_before_model_mib"], "peak_mib": memory["peak_rss_mib"],
            "weights": memory["weights"],
            "sha256": {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}


# ---- the formula ----

LLAMA2 = {  # hidden, intermediate, layers, kv heads / heads, vocab (untied embeddings and head)
    "Llama-2-7B": (4096, 11008, 32, 1.0, 32000),
    "Llama-2-13B": (5120, 13824, 40, 1.0, 32000),
    "Llama-2-70B": (8192, 28672, 80, 1 / 8, 32000),
}
SMOLLM2 = (576, 1536, 30, 3 / 9, 49152)  # tied embeddings


def shapes(hidden: int, inter: int, kv: float) -> list[tuple[int, int]]:
    """The decoder layer's linear weights: q, k, v, o, gate, up, down."""
    kv_dim = int(hidden * kv)
    return [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
            (inter, hidden), (inter, hidden), (hidden, inter)]


def parts(arch: tuple, elem: int, tied: bool, tile: int) -> dict[str, float]:
    """Bytes of the pieces the peak is made of (weights in `elem` bytes each; masks one bit per weight or tile)."""
    hidden, inter, layers, kv, vocab = arch
    linears = shapes(hidden, inter, kv)
    layer = (sum(r * c for r, c in linears) + 2 * hidden) * elem
    outer = ((1 if tied else 2) * vocab * hidden + hidden) * elem
    prunable = layers * sum(r * c for r, c in linears)
    return {"layer": layer, "outer": outer, "weights": layers * layer + outer, "largest": max(r * c for r, c in linears)
            * elem, "masks_packed": prunable / 8 / tile, "masks_bool": prunable, "layers": layers, "hidden": hidden}


def streamed_cpu(p: dict, nsamples: int, seqlen: int) -> float:
    """Model-dependent peak of a streamed prune on CPU (float32): the capture holds the outer weights and the
    first layer's inputs; the walk one layer, the inputs and outputs of a layer, and a matrix's scores and sort
    indices; the packed masks grow to their full size by the end."""
    act = nsamples * seqlen * p["hidden"] * 4
    capture = p["outer"] + act
    walk = p["layer"] + 2 * act + 3 * p["largest"]
    return max(capture, walk) + p["masks_packed"]


def streamed_gpu(p: dict) -> float:
    """Host memory of a streamed prune on a GPU (bf16 weights): activations, Hessians and the layer live on the
    device; the host holds the outer weights for the capture, or one tensor on its way to or from the device (read
    and cast), and the packed masks."""
    return max(p["outer"], 2 * p["largest"]) + p["masks_packed"]


def before(p: dict) -> float:
    """The code before streaming: every weight, plus one bool per pruned weight (its masks until the save)."""
    return p["weights"] + p["masks_bool"]


# ---- report ----

def render(rows: list[dict], args: argparse.Namespace, machine: str, uptime: str, wall: float) -> str:
    from prunetune.rundir import MASKS_FILE, META_DIR

    smol = parts(SMOLLM2, 4, tied=True, tile=1)
    same = len({json.dumps(r["sha256"], sort_keys=True) for r in rows}) == 1
    masks_key = f"{META_DIR}/{MASKS_FILE}"
    lines = [machine, f"Load while it ran (`uptime`): {uptime}.", "",
             f"`prunetune prune --model smollm2-135m --method wanda --pattern {args.pattern} --nsamples {args.nsamples} "
             f"--seqlen {args.seqlen} --calib-dataset wikitext2 --device cpu` (weights float32, "
             f"{smol['weights'] / MIB:.0f} MiB; dtype auto). Each arm in its own process. \"Model\" = peak RSS after the "
             "mark minus the RSS at the mark, just before the model loads (imports, tokenizer and calibration data "
             "come before it in the current code; the code before streaming read its tokenizer and data after the "
             "model, so its model figure includes them).", "",
             "| arm | RSS at the mark MiB | peak RSS MiB | model MiB | model / weights | prune s | weights held |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        model = r["peak_mib"] - r["rss_before_mib"]
        lines.append(f"| {r['arm']} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | {model:.0f} | "
                     f"{model / (smol['weights'] / MIB):.0%} | {r['prune_s'] or 0:.0f} | {r['weights']} |")
    lines += ["", f"Outputs identical across the arms: **{'yes' if same else 'NO'}** (sha256 of "
              f"`{masks_key}` and every weight file, config.json):", ""]
    for name, digest in rows[0]["sha256"].items():
        lines.append(f"- `{name}` {digest}")
    predicted = streamed_cpu(smol, args.nsamples, args.seqlen) / MIB
    lines += ["", f"The formula below predicts {predicted:.0f} MiB for the streamed arm here "
              f"(outer weights {smol['outer'] / MIB:.0f} + calibration inputs "
              f"{args.nsamples * args.seqlen * smol['hidden'] * 4 / MIB:.0f} + packed masks "
              f"{smol['masks_packed'] / MIB:.1f} MiB).", "",
              "Projection (GiB of host memory the model adds; add the RSS before the model, ~0.5 GiB here on CPU, "
              "more with CUDA libraries and a C4 shard): pruning on one GPU, weights bf16 as `--dtype auto` keeps "
              "them there, so the calibration activations, Hessians and the layer live on the GPU.",
              "",
              "| model | weights | before streaming (all weights + bool masks) | streamed, unstructured or N:M (masks 1 bit/weight) "
              "| streamed, block16x16 (1 bit/tile) | fits 32 GB host |",
              "|---|---:|---:|---:|---:|---|"]
    for name, arch in LLAMA2.items():
        bits, tiles = parts(arch, 2, tied=False, tile=1), parts(arch, 2, tied=False, tile=256)
        worst = streamed_gpu(bits) + 4 * GIB
        lines.append(f"| {name} | {bits['weights'] / GIB:.1f} | {before(bits) / GIB:.1f} | {streamed_gpu(bits) / GIB:.2f} "
                     f"| {streamed_gpu(tiles) / GIB:.2f} | {'yes' if worst < 32e9 else 'no'} "
                     f"({worst / GIB:.1f} GiB with 4 GiB before the model) |")
    lines += ["", "Assumptions: Llama-2 shapes (70B: grouped-query attention, 8 KV heads; untied embeddings and head, "
              "vocabulary 32,000); streamed host peak = max(embeddings + head during the capture, twice the largest "
              "tensor on its way to or from the GPU) + the packed keep-masks (one bit per pruned weight; one per "
              "16x16 tile for block patterns), which grow to their full size by the end of the walk. \"Before\" held "
              "the whole model plus one bool per pruned weight. The 4 GiB before the model covers imports with the "
              "CUDA libraries, the tokenizer and Wanda's C4 calibration shard (measured here without CUDA: "
              f"{rows[0]['rss_before_mib'] / 1024:.2f} GiB).", "", f"Bench wall time: {wall / 60:.1f} min."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--base", default=None, help="commit of the code before streaming (its arm is skipped without)")
    parser.add_argument("--arms", default="streamed,whole,before")
    parser.add_argument("--jsonl", default="/tmp/bench_prune_memory.jsonl")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, str(HERE))
    from results import machine_line, write_section

    machine = machine_line()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prune_memory_") as tmp:
        srcs = {"streamed": str(REPO / "src"), "whole": str(REPO / "src")}
        if args.base:
            base = Path(tmp) / "base"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base, "src"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            srcs["before"] = str(base / "src")
        config = {"method": "wanda", "pattern": args.pattern, "calib_dataset": "wikitext2", "nsamples": args.nsamples,
                  "seqlen": args.seqlen}
        for arm in args.arms.split(","):
            if arm not in srcs:
                print(f"skipping {arm}: no --base", file=sys.stderr)
                continue
            spec = {"arm": arm, "src": srcs[arm], "model": args.model, "out": f"{tmp}/{arm}",
                    "data_dir": args.data_dir, "config": config}
            env = {**os.environ, "PYTHONPATH": srcs[arm]}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, text=True,
                                  stdout=subprocess.PIPE)
            if proc.returncode:
                raise SystemExit(f"arm {arm} failed ({proc.returncode})")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "sha256"}), flush=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    body = render(rows, args, machine, uptime, time.perf_counter() - started)
    if args.no_write:
        print(body)
    else:
        write_section("prune-memory", "Prune memory: streamed layer by layer vs the whole model (SmolLM2-135M)", body)
    return 0 if len({json.dumps(r["sha256"], sort_keys=True) for r in rows}) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
