"""`prunetune evaluate`: the command line of `prunetune.evaluate.run_evaluate`."""

from __future__ import annotations

import argparse

from prunetune.evaluate import EvalConfig, run_evaluate
from prunetune.models import DTYPES


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="alias (smollm2-135m), hub id, model directory or .gguf file")
    parser.add_argument("--adapter", help="LoRA adapter directory written by `prunetune finetune`")
    parser.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | wikipedia-vital | path to a data file")
    parser.add_argument("--split", default="test", help="train | validation | test (default: test)")
    parser.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int,
                        help="windows per forward pass (default: automatic, up to 4 while the logits fit in memory)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto (default): bf16 where the CPU/GPU computes it natively, else float32")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--data-dir", action="append", help="local data directory (repeatable; or PRUNETUNE_DATA_DIR)")
    parser.add_argument("--out", help="write the results JSON here (e.g. eval.json)")


def main(args: argparse.Namespace) -> int:
    cfg = EvalConfig(
        model=args.model, adapter=args.adapter, dataset=args.dataset, split=args.split, seqlen=args.seqlen,
        max_windows=args.max_windows, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        data_dir=args.data_dir, out=args.out,
    )
    run_evaluate(cfg)
    return 0
