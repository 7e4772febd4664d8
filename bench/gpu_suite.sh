#!/usr/bin/env bash
# One device call: environment, GPU tests, kernel benchmark, end-to-end decode, latency table.
# Usage (on the GPU machine, repo root): bash bench/gpu_suite.sh STAGES   (e.g. "env tests kernel e2e latency";
# also: layout, gemm, e2e_act, fused, attn, cli). $COMPRESS_TILE_LAYOUT (e.g. both_evf) runs every stage in
# that weight layout (cuda_w4a16.TILE_LAYOUTS; default both_evf since session 13).
# Logs and JSON go to $OUT (or bench/results/device when unset).
set -u
# the machine lacks pydantic (compress.recipe imports it): wheels carried in .whl (see bench/gpu_real_model.sh)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${1:-"env tests kernel e2e latency"}
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')" ;;
    tests)
      timeout 240 python3 -m pytest tests/test_kernels.py tests/test_fused_block.py -q -m gpu -p no:cacheprovider -n 8 \
        > "$OUT/pytest_gpu.log" 2>&1
      tail -25 "$OUT/pytest_gpu.log" ;;
    kernel)
      timeout 150 python3 bench/speed/kernel_bench.py --out "$OUT/kernel_bench.json" > "$OUT/kernel_bench.log" 2>&1
      tail -24 "$OUT/kernel_bench.log"
      # the stacked shapes accelerate() makes of Llama-2-7B's q/k/v and gate/up
      timeout 60 python3 bench/speed/kernel_bench.py --shapes 12288x4096,22016x4096 --batches 1 --large-m '' \
        --out "$OUT/kernel_bench_stacked.json" > "$OUT/kernel_bench_stacked.log" 2>&1
      tail -4 "$OUT/kernel_bench_stacked.log" ;;
    e2e)
      # Llama-2-7B's g128 layers all run the CUDA kernel (the Triton plane width would only shape
      # layers it cannot run; e2e_decode's default 16 is the width kernel_bench times Triton at).
      # From this call's kernel benchmark: the batch-1 speedups of the two kernels (rows'
      # speedup_vs_fp16: "ours" = the CUDA kernel, "triton"), so the log says what e2e rests on.
      KB="$OUT/kernel_bench.json" python3 - <<'PY' 2>/dev/null || echo "no batch-1 rows in $OUT/kernel_bench.json"
import json, os, statistics
rows = [r["speedup_vs_fp16"] for r in json.load(open(os.environ["KB"]))["rows"] if r["batch"] == 1]
cuda = statistics.median(r["ours"] for r in rows)
triton = statistics.median(r["triton"] for r in rows if "triton" in r)
print(f"kernel_bench batch 1, median speedup vs fp16 over {len(rows)} shapes: cuda {cuda:.2f}x, triton {triton:.2f}x")
PY
      # compile_pdl (torch.compile with Inductor's PDL, the headline since session 4): ~2 minutes of
      # compilation per model; drop it from --modes for a quick run. --attn compress: our decode
      # attention in both models (the headline since session 7)
      timeout 450 python3 bench/speed/e2e_decode.py gpu --variants fused_pdl --modes cuda_graph,compile_pdl --attn compress \
        --out "$OUT/e2e_gpu.json" > "$OUT/e2e.log" 2>&1
      grep -v Warning "$OUT/e2e.log" | tail -12 ;;
    fused)
      # fused decoder blocks: what the fusions cost per launch, then the 8-layer A/B against stacked
      # launches without them (same call), compiled + Inductor PDL
      timeout 100 python3 bench/speed/fused_kernels.py --batches 1 --out "$OUT/fused_kernels.json" > "$OUT/fused_kernels.log" 2>&1
      tail -5 "$OUT/fused_kernels.log"
      timeout 300 python3 bench/speed/e2e_decode.py gpu --layers 8 --variants fused_pdl,stacked_pdl --modes compile_pdl \
        --out "$OUT/e2e8_fused_blocks.json" > "$OUT/e2e8_fused.log" 2>&1
      grep -v Warning "$OUT/e2e8_fused.log" | tail -4 ;;
    attn)
      # our decode attention kernel: GPU tests, per-call times against SDPA's backends, then the
      # 8-layer compiled decode with it in both models
      timeout 200 python3 -m pytest tests/test_decode_attention.py -q -m gpu -p no:cacheprovider -n 8 \
        > "$OUT/pytest_gpu_attn.log" 2>&1
      tail -5 "$OUT/pytest_gpu_attn.log"
      timeout 120 python3 bench/speed/decode_attention.py --out "$OUT/decode_attention.json" > "$OUT/decode_attention.log" 2>&1
      cat "$OUT/decode_attention.log"
      timeout 300 python3 bench/speed/e2e_decode.py gpu --layers 8 --variants fused_pdl --modes compile_pdl --attn compress \
        --out "$OUT/e2e8_attn.json" > "$OUT/e2e8_attn.log" 2>&1
      grep -v Warning "$OUT/e2e8_attn.log" | tail -4 ;;
    layout)
      # the tile-major layout (session 10, off by default): the GPU tests run every layout, then
      # bench/probes/layout_probe.py tunes and times each against fp16 in interleaved rounds; kernel_bench
      # with --tile-major both gives the full table in the layout if it wins
      timeout 200 python3 -m pytest tests/test_kernels.py -q -m gpu -p no:cacheprovider -n 8 \
        -k "every_config or dequantize_word" > "$OUT/pytest_gpu_layout.log" 2>&1
      tail -4 "$OUT/pytest_gpu_layout.log"
      timeout 330 python3 bench/probes/layout_probe.py --out "$OUT/layout_probe.json" > "$OUT/layout_probe.log" 2>&1
      grep -v skipped "$OUT/layout_probe.log" | tail -8 ;;
    gemm)
      # the W4A16 GEMM for prefill (session 13, off until measured): its GPU tests, the sweep on the
      # products of a 7B prefill, then the 7B prompt through it (decode is unchanged by it)
      timeout 150 python3 -m pytest tests/test_triton_gemm.py -q -m gpu -p no:cacheprovider -n 12 \
        > "$OUT/pytest_gpu_gemm.log" 2>&1
      tail -5 "$OUT/pytest_gpu_gemm.log"
      timeout 240 python3 bench/speed/gemm_bench.py --shapes 4096x4096,12288x4096,22016x4096,4096x11008 \
        --out "$OUT/gemm_bench.json" > "$OUT/gemm_bench.log" 2>&1
      tail -22 "$OUT/gemm_bench.log"
      timeout 200 python3 bench/speed/e2e_decode.py gpu --variants fused_pdl --modes compile_pdl --attn compress --large-m gemm \
        --out "$OUT/e2e_gpu_gemm.json" > "$OUT/e2e_gemm.log" 2>&1
      grep -v Warning "$OUT/e2e_gemm.log" | grep "compile_pdl\|speedup" ;;
    e2e_act)
      # GPTQ-style act-order layers (RTN numerics): the gather costs under compile and CUDA graphs
      timeout 450 python3 bench/speed/e2e_decode.py gpu --variants fused_pdl --modes cuda_graph,compile_pdl --act-order \
        --out "$OUT/e2e_gpu_actorder.json" > "$OUT/e2e_act.log" 2>&1
      grep -v Warning "$OUT/e2e_act.log" | tail -8 ;;
    cli)
      # the compress bench contract on a tiny RTN checkpoint, on the GPU
      timeout 300 python3 - > "$OUT/cli.log" 2>&1 <<'PY'
import argparse, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from compress.adapters import set_submodule
from compress.algos.quant import default_g_idx, rtn_quantize
from compress.commands import bench
from compress.formats import save_checkpoint
from compress.nn.qlinear import QuantizedLinear
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000)
m = LlamaForCausalLM(cfg).eval()
for name, mod in list(m.named_modules()):
    if isinstance(mod, torch.nn.Linear) and name != "lm_head":
        q, s, z = rtn_quantize(mod.weight.data, 4, 128, False)
        set_submodule(m, name, QuantizedLinear.from_codes(q, s, z, default_g_idx(mod.in_features, 128), 4, 128, False))
save_checkpoint(m, None, "/tmp/tiny-w4g128", overwrite=True)
p = argparse.ArgumentParser(); bench.register(p.add_subparsers())
for extra in ([], ["--json"], ["--json", "--mode", "compile"], ["--json", "--mode", "compile", "--inductor-pdl"]):
    a = p.parse_args(["bench", "/tmp/tiny-w4g128", "--device", "cuda", "--prompt", "128", "--generate", "32"] + extra)
    a.func(a)
PY
      tail -22 "$OUT/cli.log" ;;
    latency)
      timeout 400 python3 bench/roofline/gpu_latency.py --out "$OUT/gpu_latency.json" > "$OUT/latency.log" 2>&1
      tail -20 "$OUT/latency.log" ;;
  esac
done
echo "=== done $(date +%T)"
