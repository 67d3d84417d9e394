"""Memory per GPU of sparse fine-tuning under FSDP2 (issue 23): the trained state each process holds, measured on
SmolLM2-135M in one process and in 2 processes sharded by FSDP2 (CPU, gloo, through tests/fsdp_cpu.py as in the
tests), and the same accounting projected to Llama-2-7B/13B/70B on 1, 2, 4, 8 and 16 GPUs. Writes the section
"fsdp-memory" of bench/RESULTS.md.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/bench_fsdp_memory.py

The trained state of a process (the `rank_memory` field of `train_end` in metrics.jsonl): the trainable weights
(float32 master copies; their gradients take as much again while a step is built), both AdamW moments, and
sparse-ft's keep-masks, each counted as the local shard under FSDP2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

GIB = 2**30
MIB = 2**20
# Llama-2: hidden, intermediate, layers, KV share of the heads, vocabulary
LLAMA2 = {"Llama-2-7B": (4096, 11008, 32, 1.0, 32000), "Llama-2-13B": (5120, 13824, 40, 1.0, 32000),
          "Llama-2-70B": (8192, 28672, 80, 1 / 8, 32000)}
GPUS = (1, 2, 4, 8, 16)


def projection(arch: tuple, gpus: int) -> float:
    """GiB per GPU of sparse-ft under FSDP2 with bf16 compute, before activations: per trained weight a float32
    master (4 B), its float32 gradient (4), two AdamW moments (8) and a bool mask (1), all sharded 1/N; the frozen
    rest (embeddings, head, norms) in float32, sharded; plus one decoder layer gathered whole in bf16 for its
    forward, the next one prefetched, and its float32 gradient before the reduce-scatter."""
    hidden, inter, layers, kv, vocab = arch
    kv_dim = int(hidden * kv)
    per_layer = 2 * hidden * hidden + 2 * kv_dim * hidden + 3 * inter * hidden
    trained = layers * per_layer
    frozen = 2 * vocab * hidden + (2 * layers + 1) * hidden
    sharded = (17 * trained + 4 * frozen) / gpus
    gathered = 2 * 2 * per_layer + 4 * per_layer if gpus > 1 else 0
    return (sharded + gathered) / GIB


def launch(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, cwd=REPO, text=True, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def rank_memory(run: Path) -> list[dict[str, int]]:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "train_end":
            return record["rank_memory"]
    raise SystemExit(f"{run}: no train_end record")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from results import machine_line, write_section

    machine, started = machine_line(), time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "src")])}
    python = sys.executable
    accelerate = str(Path(python).with_name("accelerate"))
    common = ["--data-dir", args.data_dir, "--method", "sparse-ft", "--dataset", "wikitext2", "--block-size", "64",
              "--max-train-samples", "8", "--max-eval-samples", "2", "--per-device-eval-batch-size", "1",
              "--max-steps", "2", "--logging-steps", "1", "--eval-strategy", "no", "--save-strategy", "no",
              "--no-load-best-model-at-end", "--probe-steps", "1", "--dtype", "float32"]
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_memory_") as tmp:
        pruned = Path(tmp) / "pruned"
        launch([python, "-m", "prunetune", "prune", "--model", args.model, "--out", str(pruned), "--method",
                "magnitude", "--pattern", "block16x16", "--device", "cpu"], env)
        single, sharded = Path(tmp) / "single", Path(tmp) / "fsdp"
        launch([python, "-m", "prunetune", "finetune", "--pruned", str(pruned), "--out", str(single),
                "--per-device-train-batch-size", "2", *common], env)
        launch([accelerate, "launch", "--config_file", str(REPO / "tests/fixtures/fsdp/fsdp2-cpu-2.yaml"),
                str(REPO / "tests/fsdp_cpu.py"), "finetune", "--pruned", str(pruned), "--out", str(sharded),
                "--per-device-train-batch-size", "1", *common], env)
        one, ranks = rank_memory(single)[0], rank_memory(sharded)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    keys = ("param_bytes", "optimizer_state_bytes", "mask_bytes")
    lines = [machine, f"Load at the end (`uptime`): {uptime}.", "",
             f"Measured: `{args.model}` pruned (magnitude, 16x16 blocks), `finetune --method sparse-ft` (all linear "
             "layers), float32, 2 steps; one process vs `accelerate launch` of 2 processes with FSDP2 "
             "(tests/fixtures/fsdp/fsdp2-cpu-2.yaml). MiB of trained state held by each process:", "",
             "| process | trained weights | AdamW moments | keep-masks | total | share of one process |",
             "|---|---:|---:|---:|---:|---:|"]
    total_one = sum(one[k] for k in keys)
    rows = [("one process", one)] + [(f"FSDP2 rank {i}", r) for i, r in enumerate(ranks)]
    for label, held in rows:
        total = sum(held[k] for k in keys)
        lines.append(f"| {label} | " + " | ".join(f"{held[k] / MIB:.1f}" for k in keys)
                     + f" | {total / MIB:.1f} | {total / total_one:.3f} |")
    lines += ["", "Projected GiB per GPU, sparse-ft of every decoder linear, bf16 compute, before activations "
              "(see `projection` in this script for the accounting):", "",
              "| model | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in GPUS) + " |",
              "|---|" + "---:|" * len(GPUS)]
    for name, arch in LLAMA2.items():
        lines.append(f"| {name} | " + " | ".join(f"{projection(arch, g):.1f}" for g in GPUS) + " |")
    lines += ["", "On 80 GB GPUs (74.5 GiB): Llama-2-7B fits from 2 GPUs (8 leave ~60 GiB for activations), 13B "
              "from 4; 70B does not fit one 8-GPU machine (142 GiB per GPU) and 16 leave no room for activations: "
              "32 GPUs (`num_machines: 4` in the accelerate config), `fsdp_offload_params: true` (the sharded state "
              "in CPU memory), or a subset of the linears (`--sparse-ft-targets`); masked LoRA fits one GPU. "
              "Activations come on top (block size x batch x hidden x layers; less with `--gradient_checkpointing`).",
              "", f"Bench wall time: {(time.perf_counter() - started) / 60:.1f} min."]
    body = "\n".join(lines)
    if args.no_write:
        print(body)
    else:
        write_section("fsdp-memory", "Sparse fine-tuning under FSDP2: trained state per GPU", body)
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
