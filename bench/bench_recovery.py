"""Recovery benchmark (issue 10): which method recovers a 16x16-block-pruned model best per training token,
measured on the model a user can deploy.

Every arm fine-tunes the same pruned directory (prune once: `--prune` makes it, then it is reused) with the same
token budget through `prunetune finetune`'s engine, then the *deployable sparse model* is built (LoRA: the delta
masked by the keep-mask and merged; sparse-ft: the trained model itself), its pattern is checked against the
masks, and its WikiText-2 test perplexity is measured (`prunetune.evaluate.perplexity`, N x seqlen tokens).
Plain-LoRA arms also report the perplexity with the unmasked adapter (what the old demo printed).

Each arm runs in its own process, so its peak RSS (ru_maxrss) is its own; wall time covers load + train + eval.

  .venv/bin/python bench/bench_recovery.py --prune --pruned /work/recovery-bench/prune
  .venv/bin/python bench/bench_recovery.py --pruned DIR --tokens 8192 --arms wanda,demo,masked-lora,sparse-ft
  .venv/bin/python bench/bench_recovery.py --prune --pruned /work/rx2/prune-24 --prune-flags "--pattern 2:4" ...
One results file may hold several starting points (each gets its own baseline row); every row records the pattern
and how it was pruned (calibration, permutation, reconstruction, block-wise stage), the load before and after and
the torch threads, so a cell can be read without its command line.
Results: one JSON line per arm in --results (appended; reruns skip arms already measured at that budget),
and the table on stdout (Markdown).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    targets: tuple[str, ...] = ("all-linear",)
    r: int = 16
    alpha: int = 32
    lr: float = 5e-4
    distill: str = "none"
    """none | logits | layerwise | both."""


ARMS = {a.name: a for a in (
    # The Wanda repository's lora_ft recipe (Llama-2-7B), then merged with the mask: what its users deploy.
    Arm("wanda", "lora", ("q_proj", "v_proj"), r=8, alpha=16, lr=1e-4),
    # Today's demo recipe, merged with the mask.
    Arm("demo", "lora"),
    Arm("masked-lora", "masked-lora"),
    Arm("masked-lora+kd", "masked-lora", distill="logits"),
    Arm("masked-lora+lw", "masked-lora", distill="layerwise"),
    Arm("sparse-ft", "sparse-ft", lr=1e-4),
    Arm("sparse-ft-3e-4", "sparse-ft", lr=3e-4),
    Arm("sparse-ft+kd", "sparse-ft", lr=3e-4, distill="logits"),
    Arm("sparse-ft+lw", "sparse-ft", lr=3e-4, distill="layerwise"),
    Arm("sparse-ft+both", "sparse-ft", lr=3e-4, distill="both"),
    Arm("sparse-ft-1e-3", "sparse-ft", lr=1e-3),
    Arm("sparse-ft-1e-3+kd", "sparse-ft", lr=1e-3, distill="logits"),
    Arm("masked-lora-1e-3", "masked-lora", lr=1e-3),
)}

WIKITEXT_HEAD_NOTE = "WikiText-2 train (local head)"


def train_data(data_dir: str, tokens: int, work: Path, tokenizer) -> tuple[str, str]:
    """(dataset for FinetuneConfig, words for the table). WikiText-2's local train head holds ~68k tokens; a
    larger budget trains on all of that head topped up with just enough of the offline Wikipedia summaries
    (`wikipedia-vital`) to fill the budget, in one file: one epoch, WikiText-2 as large a share as it can be."""
    from prunetune.data import load_text, tokenize

    head = load_text("wikitext2", "train", data_dir)
    head_tokens = tokenize(head, tokenizer).input_ids.numel()
    if tokens <= head_tokens:
        return "wikitext2", f"{WIKITEXT_HEAD_NOTE}, {head_tokens:,} tokens"
    mixed = work / f"train-wikitext2-head+wikipedia-vital-{tokens}.jsonl"
    # The file is split 90/5/5 by row hash (prunetune.data), so fill ~1/0.9 of the budget and a margin.
    needed = int(tokens / 0.88) - head_tokens
    if not mixed.is_file():
        rows, have = list(head.rows), 0
        for row in load_text("wikipedia-vital", "train", data_dir).rows:
            if have >= needed:
                break
            rows.append(row)
            have += len(tokenizer(row).input_ids)
        with mixed.open("w") as f:
            for row in rows:
                f.write(json.dumps({"text": row}) + "\n")
    return str(mixed), (f"{WIKITEXT_HEAD_NOTE} ({head_tokens:,} tokens) topped up with ~{max(needed, 0):,} tokens "
                        "of wikipedia-vital summaries")


def prune_variant(pruned: Path) -> str:
    """How the arm's starting point was pruned, from its prune.json: pattern, calibration, reconstruction, OWL,
    channel permutation and the block-wise stage."""
    try:
        record = json.loads((pruned / "prune.json").read_text())
    except (OSError, ValueError):
        return "?"
    cfg = record.get("config", {})
    parts = [f"{cfg.get('method', '?')} {cfg.get('pattern', '?')}", f"calib {cfg.get('calib_dataset', '?')}"]
    if cfg.get("permute"):
        perm = record.get("permutation", {})
        parts.append(f"permuted ({perm.get('rounds', '?')} rounds, kept mass {perm.get('kept_mass_before', 0):.3f} "
                     f"-> {perm.get('kept_mass_after', 0):.3f})")
    parts.append("recon" if cfg.get("reconstruct") else "no recon")
    if cfg.get("owl"):
        parts.append("OWL")
    if cfg.get("block_reconstruct_epochs"):
        parts.append(f"block-wise x{cfg['block_reconstruct_epochs']}")
    return " + ".join(parts)


PRUNE_FLAGS = ["--model", "smollm2-135m", "--method", "wanda", "--pattern", "block16x16", "--sparsity", "0.5",
               "--reconstruct", "--calib-dataset", "c4", "--nsamples", "32", "--seqlen", "512", "--seed", "0"]
"""Wanda, 16x16 blocks, 50%, with reconstruction, 32 x 512 calibration tokens of C4 (the Wanda setting);
`--prune-flags` are appended (a flag given twice: the later wins)."""


def prune(out: Path, data_dir: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "prunetune", "prune", *PRUNE_FLAGS, *extra, "--data-dir", data_dir, "--out", str(out)]
    subprocess.run(cmd, check=True)


def test_tokens(tokenizer, data_dir: str):
    from prunetune.data import load_text, tokenize

    return tokenize(load_text("wikitext2", "test", data_dir), tokenizer).input_ids


def run_arm(arm: Arm, pruned: Path, work: Path, tokens: int, block: int, windows: int, data_dir: str,
            adapter_ppl: bool) -> dict:
    """Train one arm through the engine, build its deployable model, measure it. Runs in a child process."""
    import torch

    from prunetune.finetune.config import FinetuneConfig
    from prunetune.finetune.engine import run_finetune
    from prunetune.models import apply_adapter, load_model
    from prunetune.perplexity import perplexity
    from prunetune.recovery import registry
    from prunetune.recovery.merge import merge_adapter
    from prunetune.rundir import load_keep_masks, recovery_result
    from prunetune.sparsity.violations import pattern_violations

    steps = max(1, tokens // block)
    out = work / f"{arm.name}-{tokens}-{pruned.name}"
    _, tokenizer = load_model(str(pruned), device=torch.device("cpu"), log=lambda m: None)
    dataset, data_words = train_data(data_dir, tokens, work, tokenizer)
    cfg = FinetuneConfig(
        pruned=str(pruned), out=str(out), dataset=dataset, data_dir=data_dir, block_size=block,
        max_steps=steps, lr=arm.lr, lora_r=arm.r, lora_alpha=arm.alpha, lora_targets=arm.targets,
        warmup_steps=0, logging_steps=max(1, steps // 4), eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, probe_steps=0, max_eval_samples=4, overwrite=True,
        method=arm.method, distill=arm.distill,
    )
    started = time.perf_counter()
    result = run_finetune(cfg, stream=io.StringIO())
    train_s = time.perf_counter() - started
    if result.get("status") != "completed":
        return {"error": f"finetune {result.get('status')}"}

    result = recovery_result(out)
    model, tokenizer = load_model(str(pruned if result.is_adapter else result.path),
                                  dtype=torch.float32, device=torch.device("cpu"))
    masks, _ = load_keep_masks(pruned, model)
    ids = test_tokens(tokenizer, data_dir)
    row: dict[str, Any] = {"train_data": data_words, "prune": prune_variant(pruned), "pruned_dir": str(pruned)}
    if result.is_adapter:
        peft_model = apply_adapter(model, result.path)
        trained_as = [e for e in registry.get(arm.method).evaluations() if e.key != "deployable"]
        if trained_as and adapter_ppl:
            row["adapter_ppl"] = perplexity(peft_model, ids, block, max_windows=windows).perplexity
        model, _ = merge_adapter(peft_model, masks)
    from prunetune.rundir.records import read_jsonl

    end = next((r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "train_end"), {})
    row["train_runtime_s"] = end.get("runtime_s")
    row["train_loss"] = end.get("last_loss")
    violations = pattern_violations(model, masks)
    res = perplexity(model, ids, block, max_windows=windows)
    return row | {"ppl": res.perplexity, "violations": len(violations), "train_s": train_s,
                  "wall_s": time.perf_counter() - started, "steps": steps, "eval_tokens": res.tokens}


def child(args: argparse.Namespace) -> None:
    arm = ARMS[args.one_arm]
    row = run_arm(arm, Path(args.pruned), Path(args.work), args.tokens, args.block_size, args.eval_windows,
                  args.data_dir, arm.name in args.adapter_ppl.split(","))
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(row))


def baseline(pruned: Path, block: int, windows: int, data_dir: str, dense_ppl: float | None) -> dict:
    import torch

    from prunetune.models import load_model
    from prunetune.perplexity import perplexity
    from prunetune.rundir import read_pruned

    model, tokenizer = load_model(str(pruned), dtype=torch.float32, device=torch.device("cpu"))
    ids = test_tokens(tokenizer, data_dir)
    pruned_ppl = perplexity(model, ids, block, max_windows=windows).perplexity
    if dense_ppl is not None:
        return {"pruned": pruned_ppl, "dense": dense_ppl, "dense_from": "--dense-ppl"}
    base = read_pruned(pruned).base_model or "smollm2-135m"
    dense, _ = load_model(base, dtype=torch.float32, device=torch.device("cpu"))
    return {"pruned": pruned_ppl, "dense": perplexity(dense, ids, block, max_windows=windows).perplexity}


def table(rows: list[dict], base: dict | None) -> str:
    lines = ["| arm | pruned with | method | distill | LoRA | lr | tokens | deployable test ppl | x dense | adapter ppl (dense update) "
             "| pattern ok | train tok/s | wall | peak RSS | load before/after (threads) | train data |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"]
    dense = base.get("dense") if base else None
    for r in rows:
        arm = r["arm"]
        lora = f"r={arm['r']} {','.join(arm['targets'])}" if arm["method"] != "sparse-ft" else "-"
        ppl = r.get("ppl")
        lines.append(
            f"| {arm['name']} | {r.get('prune', 'recon')} | {arm['method']} | {arm['distill']} | {lora} | {arm['lr']:g} | {r['tokens']:,} | "
            + (f"{ppl:,.1f} | {ppl / dense:.1f}x" if ppl and dense else f"{r.get('error', '?')} | ") + " | "
            + (f"{r['adapter_ppl']:,.1f}" if r.get("adapter_ppl") else "-") + " | "
            + ("yes" if r.get("violations") == 0 else "NO" if "violations" in r else "?") + " | "
            + (f"{r['tokens'] / r['train_runtime_s']:.0f}" if r.get("train_runtime_s") else "-") + " | "
            + (f"{r['wall_s'] / 60:.1f} min" if r.get("wall_s") else "-") + " | "
            + (f"{r['peak_rss_gib']:.2f} GiB" if r.get("peak_rss_gib") else "-") + " | "
            + (f"{r['load_before']:.1f} / {r['load_after']:.1f} ({r.get('machine', {}).get('torch_threads', '?')})"
               if "load_before" in r else "-") + " | "
            + r.get("train_data", WIKITEXT_HEAD_NOTE) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruned", required=True, help="pruned model dir (made by --prune when missing)")
    p.add_argument("--prune", action="store_true", help="prune SmolLM2-135M into --pruned first if it is missing")
    p.add_argument("--prune-flags", default="", help="flags appended to the --prune command, e.g. "
                   "'--pattern 2:4' or '--calib-dataset wikitext2 --block-reconstruct-epochs 3 --permute'")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of: {', '.join(ARMS)}")
    p.add_argument("--tokens", type=int, default=32768, help="training tokens per arm (issue: 32k, 128k, 512k)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", default=None, help="where arm runs go (default: PRUNED/../recovery-runs)")
    p.add_argument("--results", default=None, help="JSONL of results (default: WORK/results.jsonl)")
    p.add_argument("--adapter-ppl", default="demo",
                   help="plain-LoRA arms that also get the unmasked adapter's perplexity (one more eval each)")
    p.add_argument("--dense-ppl", type=float, default=None,
                   help="the dense model's perplexity under the same protocol, when already measured (skips its eval)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the pruned model's own evaluation (another invocation measures it)")
    p.add_argument("--one-arm", help=argparse.SUPPRESS)
    args = p.parse_args()
    pruned = Path(args.pruned)
    args.work = args.work or str(pruned.parent / "recovery-runs")
    if args.one_arm:
        child(args)
        return
    if not (pruned / "config.json").is_file():
        if not args.prune:
            sys.exit(f"{pruned} is not a pruned model dir; add --prune to make it")
        prune(pruned, args.data_dir, args.prune_flags.split())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or work / "results.jsonl")
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    # One baseline per pruned directory (a results file may hold several starting points; older rows name none).
    base = next((r["baseline"] for r in done if "baseline" in r
                 and r["baseline"].get("pruned_dir", str(pruned)) == str(pruned)), None)
    if base is None and args.no_baseline:
        base = {"dense": args.dense_ppl, "pruned": None}
    elif base is None:
        base = baseline(pruned, args.block_size, args.eval_windows, args.data_dir, args.dense_ppl)
        base |= {"pruned_dir": str(pruned), "load": os.getloadavg()[0],
                 "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with results.open("a") as f:
            f.write(json.dumps({"baseline": base}) + "\n")
    print(f"dense {base['dense']}, pruned {base['pruned']} (WikiText-2 test, {args.eval_windows} x "
          f"{args.block_size} tokens)", flush=True)
    for name in args.arms.split(","):
        arm = ARMS[name]
        if any(r.get("arm", {}).get("name") == name and r.get("tokens") == args.tokens and "ppl" in r
               and r.get("pruned_dir", str(pruned)) == str(pruned) for r in done):
            continue
        from prunetune.runinfo import machine

        cmd = [sys.executable, __file__, "--one-arm", name, "--pruned", str(pruned), "--tokens", str(args.tokens),
               "--block-size", str(args.block_size), "--eval-windows", str(args.eval_windows),
               "--data-dir", args.data_dir, "--work", str(work), "--adapter-ppl", args.adapter_ppl]
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-400:]}
        row |= {"arm": asdict(arm), "tokens": args.tokens, "load_before": load_before,
                "load_after": os.getloadavg()[0], "machine": machine(),
                "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        done.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row.get('ppl', row.get('error'))}", flush=True)
    print(table([r for r in done if "arm" in r], base))


if __name__ == "__main__":
    main()
