"""`prunetune prune`: the CLI face of `engine.run_prune`."""

from __future__ import annotations

import argparse

from prunetune.pruning.config import METHODS, PruneConfig


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id, local model directory, .gguf file or alias (smollm2-135m)")
    parser.add_argument("--method", default="wanda", choices=METHODS,
                        help="wanda: |W|*||x|| (calibrated); magnitude: |W| (no data); sparsegpt: OBS with weight updates (default: wanda)")
    parser.add_argument("--pattern", default="unstructured",
                        help="unstructured | N:M = N ZEROS in every M consecutive input weights (2:4 keeps 2 of 4, "
                             "as in Wanda) | blockHxW = whole HxW tiles pruned (block16x16); default: unstructured")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights set to zero, in [0, 1); default 0.5 (N:M: fixed at N/M)")
    parser.add_argument("--sparsity-map", default=None,
                        help="per-module sparsity, e.g. down_proj=0.3,o_proj=0.4 (module types or name globs)")
    parser.add_argument("--skip", default=None,
                        help="modules left dense, comma separated: types (down_proj) or name globs (model.layers.0.*); "
                             "lm_head and embeddings are never pruned")
    parser.add_argument("--compare", default=None, choices=("row", "matrix", "band", "obs"),
                        help="comparison group: row|matrix for unstructured, matrix|band (H-row bands) for blocks; "
                             "default row for wanda, matrix for magnitude and blocks, obs (SparseGPT's own) for sparsegpt")
    parser.add_argument("--reconstruct", action="store_true",
                        help="update kept weights to minimise each layer's output error on the calibration data "
                             "(exact least squares per row band for blocks, conjugate gradients for unstructured and N:M)")
    parser.add_argument("--calib-dataset", default="c4", help="calibration corpus (train split): c4 (default) | wikitext2 | wikipedia-vital | FILE")
    parser.add_argument("--data-dir", action="append", default=None,
                        help="directory with local corpora (repeatable); default $PRUNETUNE_DATA_DIR, else the hub")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128, as Wanda)")
    parser.add_argument("--seqlen", type=int, default=2048,
                        help="tokens per calibration window (default 2048); must not exceed the model's context")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw (default 0)")
    parser.add_argument("--one-shot", action="store_true",
                        help="calibrate every layer on dense activations instead of the pruned previous layers")
    parser.add_argument("--out", required=True, help="output directory (pruned model, masks.safetensors, prune.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out that holds a different model")
    parser.add_argument("--eval", action="store_true", help="also measure dense and pruned perplexity")
    parser.add_argument("--eval-dataset", default="wikitext2", help="perplexity corpus (default wikitext2)")
    parser.add_argument("--eval-split", default="test", help="perplexity split (default test)")
    parser.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen)")
    parser.add_argument("--eval-max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default float32 on CPU, bfloat16 on CUDA); statistics are float32")
    parser.add_argument("--device", default=None, help="device each layer is computed on (default cuda if available)")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        model=args.model, out=args.out, method=args.method, pattern=args.pattern, sparsity=args.sparsity,
        sparsity_map=args.sparsity_map, skip=args.skip, calib_dataset=args.calib_dataset, data_dir=args.data_dir,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, reconstruct=args.reconstruct,
        compare=args.compare, sequential=not args.one_shot, overwrite=args.overwrite, eval=args.eval,
        eval_dataset=args.eval_dataset, eval_split=args.eval_split, eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.eval_max_windows, dtype=args.dtype, device=args.device,
    )


def main(args: argparse.Namespace) -> int:
    from prunetune.pruning.engine import run_prune

    run_prune(config_from_args(args))
    return 0
