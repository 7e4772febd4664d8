#!/usr/bin/env bash
# Benchmarks of the real SmolLM2-135M-Instruct on a lent GPU (device tool), one group per argument:
#   structure  issue 4: width grid (3 ratios x 3 criteria), depth 2/4/6 (block influence)
#   structure2 issue 4: heads, depth by perplexity rise, perplexity at 128 tokens (LLM-Pruner's anchor)
#   alpha      issue 3: AlphaPruning epsilon sweep at 70% for Wanda and SparseGPT
#   finetune   issue 7: 50% / 2:4 Wanda and 20% width, then cross-entropy vs distillation fine-tuning
#   bnb        issue 5: bitsandbytes NF4 / INT8 quality (real model) and speed (7B-shaped, random weights)
#
# The model's GGUF (98 MB) exceeds what one call carries, so it travels in two pieces (docs/benchmarks.md):
# call 1 copies .gg/part_aa to /tmp/gg on the warm machine, call 2 carries .gg/part_ab and runs this script.
# Data: .gg/wiki.test.raw and .gg/dolly_hhrlhf_train_small.jsonl (copies of ../shared/assets files);
# wheels for what the machine lacks in .whl (pydantic, gguf; bitsandbytes for `bnb`).
#   bash bench/gpu_real_model.sh "structure alpha"
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
M=/tmp/gg/smollm2-135m-instruct.gguf
[ -f "$M" ] || cat /tmp/gg/part_aa .gg/part_ab > "$M" || exit 1
W=.gg/wiki.test.raw
C=.gg/dolly_hhrlhf_train_small.jsonl
COMMON="--model $M --device cuda --eval-text $W --calibration $C"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

for what in ${1:-structure alpha finetune}; do
  echo "=== $what $(date -u +%H:%M:%S)"
  case $what in
    structure)
      python3 bench/quality/structure_bench.py $COMMON --nsamples 32 --repeats 0 --out "$OUT/structure_grid.json" ;;
    structure2)
      python3 bench/quality/structure_bench.py $COMMON --nsamples 32 --repeats 0 --head-ratio 0.34 \
        --width-ratios 0.0,0.2,0.3 --criteria activation,taylor --depths "" --out "$OUT/structure_heads.json"
      python3 bench/quality/structure_bench.py $COMMON --nsamples 32 --repeats 0 --width-ratios "" --depths 2,4,6 \
        --depth-metric perplexity --out "$OUT/structure_depth_ppl.json"
      # LLM-Pruner's anchor is perplexity at 128 tokens
      python3 bench/quality/structure_bench.py $COMMON --nsamples 32 --repeats 0 --seqlen 128 --head-ratio 0.34 \
        --width-ratios 0.2 --criteria taylor --depths 4 --out "$OUT/structure_seq128.json" ;;
    alpha)
      S=""
      for m in wanda sparsegpt; do for e in 0.1 0.2 0.5; do S="$S,$m-70%-alpha-eps$e"; done; done
      python3 bench/quality/quant_bench.py $COMMON --nsamples 128 --settings "${S#,}" --out "$OUT/alpha_eps.json" ;;
    finetune)
      python3 bench/quality/finetune_bench.py $COMMON --train-data $C --autocast bf16 --out "$OUT/finetune.json" ;;
    bnb)
      python3 bench/quality/bnb_compare.py quality $COMMON --out "$OUT/bnb_quality.json"
      python3 bench/quality/bnb_compare.py speed --out "$OUT/bnb_speed.json" ;;
    *) echo "unknown group $what"; exit 2 ;;
  esac
done
