"""Throughput of `evaluate` on smollm2-135m: float32 vs bfloat16, batch 1 vs larger, and the perplexity cost
of bfloat16. Writes the `evaluate` section of bench/RESULTS.md.

    .venv/bin/python bench/bench_evaluate.py [--model smollm2-135m] [--windows 16] [--seqlen 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from prunetune.data import data_dirs, load_text, tokenize
from prunetune.devices import dtype_name, resolve_dtype
from prunetune.models import load_model
from prunetune.perplexity import auto_batch_size, perplexity
from results import machine_line, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", "../shared/data"))
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    header = machine_line()
    text = load_text(args.dataset, "test", data_dirs(args.data_dir))
    rows = []
    ppl: dict[str, float] = {}
    # "autocast": float32 weights, bf16 matrix products (what a Trainer's bf16=True does) -- the issue asked
    # whether bf16 weights or autocast lose the speed the hardware offers.
    for arm in ("float32", "bfloat16", "autocast"):
        dtype = "float32" if arm == "autocast" else arm
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        ids = tokenize(text, tokenizer).input_ids
        kind = torch.device(args.device).type
        ctx = torch.autocast(kind, dtype=torch.bfloat16) if arm == "autocast" else contextlib.nullcontext()
        with ctx:
            perplexity(model, ids, args.seqlen, 1, max_windows=1)  # warm-up: kernels, allocator, thread pool
            for bs in [*args.batch_sizes.split(","), "auto"]:
                if bs == "auto":
                    limit = auto_batch_size(args.seqlen, model.config.vocab_size, args.windows, args.device)[0]
                    r = perplexity(model, ids, args.seqlen, limit, max_windows=args.windows, tune=True)
                    bs = f"auto -> {r.batch_size}"
                else:
                    r = perplexity(model, ids, args.seqlen, int(bs), max_windows=args.windows)
                ppl.setdefault(arm, r.perplexity)
                rows.append((arm, bs, r.tokens, r.seconds, r.tokens_per_s, r.perplexity))
                print(f"{arm:9} batch {bs}: {r.tokens_per_s:8.1f} tok/s  ppl {r.perplexity:.4f}", flush=True)
        del model
    base = {bs: tps for dt, bs, _, _, tps, _ in rows if dt == "float32"}
    lines = [
        header, "",
        f"`{args.model}`, {args.dataset} test, seqlen {args.seqlen}, first {args.windows} windows, device {args.device}.",
        "", "| dtype | batch | tokens | seconds | tokens/s | vs float32 same batch | vs float32 best batch | perplexity |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    best32 = max(base.values())
    same = {k.split(" ")[0]: v for k, v in base.items()}
    lines += [f"| {dt} | {bs} | {tok} | {s:.1f} | {tps:.0f} | {tps / same.get(str(bs).split(' ')[0], tps):.2f}x "
              f"| {tps / best32:.2f}x | {p:.4f} |" for dt, bs, tok, s, tps, p in rows]
    diff = (ppl["bfloat16"] - ppl["float32"]) / ppl["float32"]
    auto_dtype, reason = resolve_dtype("auto", args.device, "eval")
    lines += ["", f"bfloat16 perplexity differs from float32 by {diff:+.2%} "
              f"(autocast: {(ppl['autocast'] - ppl['float32']) / ppl['float32']:+.2%}).",
              "`autocast` = float32 weights, bf16 matrix products (what the Trainer's bf16=True does).",
              f"`evaluate --dtype auto` on this machine: {dtype_name(auto_dtype)} ({reason})."]
    write_section(f"evaluate-{args.device.split(':')[0]}", f"evaluate throughput ({args.device})", "\n".join(lines))


if __name__ == "__main__":
    main()
