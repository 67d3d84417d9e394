"""`prunetune merge` command line: flags -> `MergeConfig` -> `run_merge` (the library: prunetune.finetune.merge)."""

from __future__ import annotations

import argparse

from prunetune.finetune.merge import MergeConfig, run_merge
from prunetune.models import DTYPES

__all__ = ["MergeConfig", "configure_parser", "main", "run_merge"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory written by `prunetune finetune` (RUN/adapter)")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument(
        "--keep-sparsity", action=argparse.BooleanOptionalAction, default=True,
        help="mask the LoRA delta by the pruning mask so the merged model keeps the pruned pattern (default: on)",
    )
    parser.add_argument("--model", help="pruned model directory (default: the one recorded in the adapter)")
    parser.add_argument("--eval", action="store_true", help="perplexity of the unmerged vs the merged model")
    parser.add_argument("--dataset", default="wikitext2", help="evaluation data: wikitext2 | c4 | wikipedia-vital | file")
    parser.add_argument("--split", default="test", help="train | validation | test (default: test)")
    parser.add_argument("--data-dir", action="append", help="local data directory (repeatable; or PRUNETUNE_DATA_DIR)")
    parser.add_argument("--seqlen", type=int, help="evaluation window (default: min(2048, model context))")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=list(DTYPES), help="load/save dtype (default: the pruned model's own)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged model in --out")
    parser.add_argument("--force", action="store_true",
                        help="merge even when the adapter records another base model (digest mismatch)")


def main(args: argparse.Namespace) -> int:
    cfg = MergeConfig(
        adapter=args.adapter, out=args.out, keep_sparsity=args.keep_sparsity, model=args.model, eval=args.eval,
        dataset=args.dataset, split=args.split, data_dir=args.data_dir, seqlen=args.seqlen,
        max_windows=args.max_windows, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        overwrite=args.overwrite, force=args.force,
    )
    run_merge(cfg)
    return 0
