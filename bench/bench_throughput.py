"""Training throughput of `prunetune finetune` beside a plain Transformers Trainer + PEFT loop at identical
settings (model, LoRA config, tokens, precision, steps), arms alternated in one session (issue 13).

    .venv/bin/python bench/bench_throughput.py [--model smollm2-135m] [--steps 8] [--block-size 256]
        [--repeats 2] [--dtypes float32,bfloat16] [--notes /work/notes/core.md]

Both arms load the same float32 checkpoint, train LoRA r=16 on every decoder linear for `--steps` optimizer
steps of one `--block-size` sequence, and report tokens/s over the Trainer's own `train_runtime` (the training
loop only). `prunetune finetune` also runs its probe and baseline/final evaluations: their cost is the
difference between its wall time and its training time, shown in its own column. The table goes to stdout,
and with `--notes` is appended there (the lead merges it into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prunetune.data import data_dirs, load_text, tokenize, windows_of
from prunetune.devices import resolve_dtype
from prunetune.models import load_model, materialize, resolve_model
from prunetune.rundir import METRICS
from results import machine_line

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plain_arm(model_dir: str, blocks: torch.Tensor, steps: int, dtype: str, work: Path) -> dict[str, float]:
    """The reference: LoRA with PEFT on the stock Trainer, nothing else."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    start = time.perf_counter()
    model, _ = load_model(model_dir, dtype=torch.float32, device="cpu", log=lambda m: None)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS)))
    examples = [{"input_ids": b, "labels": b.clone(), "attention_mask": torch.ones_like(b)} for b in blocks]
    args = TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-4,
        lr_scheduler_type="linear", logging_steps=steps, save_strategy="no", eval_strategy="no", report_to=[],
        bf16=dtype == "bfloat16", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=42,
    )
    metrics = Trainer(model=model, args=args, train_dataset=examples).train().metrics
    return {"train_s": metrics["train_runtime"], "wall_s": time.perf_counter() - start,
            "loss": metrics["train_loss"]}


def prunetune_arm(model_dir: str, steps: int, block: int, dtype: str, data_dir: str, work: Path) -> dict[str, float]:
    from prunetune.finetune.config import FinetuneConfig
    from prunetune.finetune.engine import run_finetune

    start = time.perf_counter()
    cfg = FinetuneConfig(
        pruned=model_dir, out=str(work), data_dir=data_dir, block_size=block, max_steps=steps,
        max_train_samples=steps, max_eval_samples=2, lora_r=16, lora_alpha=32, lora_targets=TARGETS,
        logging_steps=steps, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        dtype=dtype, device="cpu", lr=1e-4, teacher=model_dir,  # teacher: works around a preflight bug (requests.md)
    )
    with open(os.devnull, "w") as sink:
        result = run_finetune(cfg, stream=sink)
    records = [json.loads(line) for line in (work / METRICS).read_text().splitlines() if line.strip()]
    end = next(r for r in records if r["event"] == "train_end")
    return {"train_s": float(end["runtime_s"]), "wall_s": time.perf_counter() - start,
            "loss": float(result.get("last_train_loss") or "nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", "../shared/data"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32", help="comma list; bfloat16 only pays on native-bf16 CPUs")
    parser.add_argument("--notes", help="append the table to this markdown file")
    args = parser.parse_args()
    header = machine_line()
    model_dir = materialize(resolve_model(args.model), log=print)
    _, tokenizer = load_model(model_dir, log=lambda m: None)
    text = load_text("wikitext2", "train", data_dirs(args.data_dir))
    blocks = windows_of(tokenize(text, tokenizer).input_ids, args.block_size, args.steps)
    tokens = args.steps * args.block_size
    rows = []
    for dtype in args.dtypes.split(","):
        runs: dict[str, list[dict[str, float]]] = {"plain Trainer + PEFT": [], "prunetune finetune": []}
        for _ in range(args.repeats):  # alternate the arms so drifting load hits both alike
            for arm in runs:
                work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
                try:
                    if arm.startswith("plain"):
                        runs[arm].append(plain_arm(model_dir, blocks, args.steps, dtype, work))
                    else:
                        runs[arm].append(prunetune_arm(model_dir, args.steps, args.block_size, dtype,
                                                       args.data_dir, work))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                print(arm, dtype, runs[arm][-1], flush=True)
        base = statistics.median(tokens / r["train_s"] for r in runs["plain Trainer + PEFT"])
        for arm, results in runs.items():
            speeds = [tokens / r["train_s"] for r in results]
            rows.append(
                f"| {arm} | {dtype} | {' / '.join(f'{s:.0f}' for s in speeds)} | {statistics.median(speeds) / base:.2f}x "
                f"| {statistics.median(r['wall_s'] for r in results):.1f} | {statistics.median(r['loss'] for r in results):.3f} |"
            )
    reason = resolve_dtype("auto", "cpu", "train")[1]
    table = "\n".join([
        f"### Training throughput: prunetune finetune vs a plain Trainer + PEFT loop ({args.model})",
        "",
        header,
        f"`--dtype auto` here: {reason}. LoRA r=16 alpha=32 on {', '.join(TARGETS)}; {args.steps} steps x "
        f"{args.block_size} tokens, batch 1; {args.repeats} alternated runs per arm.",
        "",
        "| arm | dtype | train tokens/s (each run) | median vs plain | median wall s (incl. load, evals) | loss |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.notes:
        with open(args.notes, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
