"""llm-compressor's WandaPruningModifier on prunetune's exact calibration windows (issue 22, item 4: is the gap
between the two tools' Wanda sampling or scoring?). Runs inside its own pinned virtualenv, never prunetune's:

    python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install -r bench/llmcompressor/requirements.txt
    .venv/bin/python bench/bench_calib_precision.py --windows-out /tmp/w0.pt --seed 0     # prunetune's windows
    HF_HUB_OFFLINE=1 .venv-llmc/bin/python bench/llmcompressor/wanda_oneshot.py --model MODEL_DIR \\
        --windows /tmp/w0.pt --mask-structure 2:4 --out /tmp/llmc-24-s0
    .venv/bin/python bench/bench_calib_precision.py --score PRUNETUNE_DIR /tmp/llmc-24-s0   # same test windows

MODEL_DIR is the Transformers directory prunetune converted the GGUF into ($PRUNETUNE_HOME/models/...). The
windows go in as a DataLoader of (1, seqlen) batches, unshuffled, full attention: llm-compressor's own sampling
and tokenisation are bypassed, so both tools calibrate on the same tokens. The model is loaded and calibrated in
float32 (llm-compressor's Wanda statistics are float32 too). Prints one JSON line: seconds of `oneshot` (tracing,
calibration and pruning; loading and saving excluded), versions.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Transformers model directory")
    parser.add_argument("--windows", required=True, help="(nsamples, seqlen) int64 tensor file")
    parser.add_argument("--mask-structure", default="2:4", help="N:M, or 0:0 for unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import compressed_tensors
    import transformers
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    import llmcompressor
    from llmcompressor import oneshot

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    windows = torch.load(args.windows)  # (nsamples, seqlen)
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    loader = DataLoader(rows, batch_size=1, shuffle=False)  # default collate: (1, seqlen) tensors
    # lm_head left dense, as prunetune leaves it. A plain "lm_head" matches nothing in 0.14 (it names the module
    # "lm_head.") and SmolLM2's lm_head is tied to the embeddings: pruning it zeroed half of them (perplexity 535).
    recipe = WandaPruningModifier(sparsity=args.sparsity, mask_structure=args.mask_structure, ignore=["re:.*lm_head"])
    t = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - t
    model.save_pretrained(args.out, save_compressed=False)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "oneshot_s": round(seconds, 2), "windows": list(windows.shape),
                      "mask_structure": args.mask_structure, "threads": torch.get_num_threads(),
                      "load": os.getloadavg()[0],
                      "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__,
                                   "compressed_tensors": compressed_tensors.__version__}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
