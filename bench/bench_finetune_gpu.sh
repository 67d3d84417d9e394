#!/usr/bin/env bash
# The fine-tuning speed benchmarks on one GPU, as one prepared run (about 3-5 minutes on an H200).
#
# On a device machine (bare image: python3 with torch/transformers/peft, no internet, 64 MiB carried):
# SmolLM2-135M's weights (98 MB GGUF) cannot travel, so the speed parts run its exact architecture and tokenizer
# with random weights (step time does not depend on the values). Where the real model is on the machine (e.g. the
# GGUF reassembled from parts over warm calls), use it and add the recovery table:
#   MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf PARTS="finite overhead overhead-all bf16 recovery" bash bench/bench_finetune_gpu.sh
# (a .gguf needs the gguf package there; prunetune converts it once into $PRUNETUNE_HOME.)
# Prepare once on the dev machine (an ignored folder, ~6 MB: WikiText-2 + SmolLM2's config and tokenizer):
#   C=runs/bench_finetune_carry; M=$(.venv/bin/python -c "from prunetune.models import *; print(materialize(resolve_model('smollm2-135m')))")
#   mkdir -p $C/data $C/smollm2-135m-config && cp -r ../shared/data/wikitext-2-raw-v1* $C/data/
#   cp $M/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} $C/smollm2-135m-config/
# then:
#   run(command="bash bench/bench_finetune_gpu.sh", carry=["runs/bench_finetune_carry"], timeout_s=480)
# Results: bench/RESULTS.md sections marked "(cuda)" and runs/bench_finetune/*.json, copied to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CARRY=runs/bench_finetune_carry
DATA=${DATA_DIR:-$( [ -d $CARRY/data ] && echo $CARRY/data || echo "$(cd .. && pwd)/shared/data" )}
MODEL=${MODEL:-$( [ -d $CARRY/smollm2-135m-config ] && echo $CARRY/smollm2-135m-config || echo smollm2-135m )}
# Random weights only for a config-only directory (no weights file in it).
RANDOM_FLAG=${RANDOM_FLAG:-$( [ -d "$MODEL" ] && ! ls "$MODEL"/*.safetensors >/dev/null 2>&1 && echo --random-weights || echo "" )}
PARTS=${PARTS:-"finite overhead overhead-all bf16"}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
collect() { if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md "$OUT"/ 2>/dev/null; cp runs/bench_finetune/*.json "$OUT"/ 2>/dev/null; fi; return 0; }
trap collect EXIT
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
COMMON=(--device cuda --data-dir "$DATA" --model "$MODEL" $RANDOM_FLAG --block-size 512)
status=0
for part in $PARTS; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case $part in
    finite)
      $PY bench/bench_finetune_finite_check.py --device cuda || status=1
      $PY bench/bench_finetune_finite_check.py --device cuda --rank 8 --targets q_proj,v_proj || status=1 ;;
    overhead)      # default recipe (q_proj,v_proj r=8): 100 timed steps per run, 2 runs per arm
      $PY bench/bench_finetune.py overhead "${COMMON[@]}" --steps 110 --warmup 10 --repeats 2 || status=1 ;;
    overhead-all)  # all linear modules r=16: the recipe that recovers best, 420 LoRA tensors to monitor
      $PY bench/bench_finetune.py overhead "${COMMON[@]}" --steps 110 --warmup 10 --repeats 2 \
        --lora-targets all-linear --lora-r 16 --lora-alpha 32 || status=1 ;;
    bf16)
      $PY bench/bench_finetune.py bf16 "${COMMON[@]}" --steps 60 --warmup 10 --repeats 1 || status=1 ;;
    recovery)      # needs the real weights: 150 steps x 512 tokens per recipe, the whole WikiText-2 test split
      $PY bench/bench_finetune.py recovery --device cuda --data-dir "$DATA" --model "$MODEL" --block-size 512 \
        --steps 150 --eval-windows 0 --calib-samples 128 --calib-seqlen 512 || status=1 ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
