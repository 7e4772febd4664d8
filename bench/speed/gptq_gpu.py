"""GPTQ wall time and peak GPU memory on a Llama-2-7B-shaped model with random weights (no download).

    python bench/speed/gptq_gpu.py --nsamples 128 --seqlen 2048 [--layers 32] [--out result.json]

The model is built from a LlamaConfig in fp16 on the GPU, then its decoder blocks are offloaded to the
CPU so that the layer-by-layer runner holds one block plus the calibration activations on the GPU, as a
user quantizing a real 7B model would run it. Calibration is random tokens (speed, not quality).
Anchor: GPTQModel quantizes Llama-2-7B in 721 s on an A100-80GB.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks (32 = Llama-2-7B)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.adapters import get_adapter
    from compress.calibration import CalibrationData
    from compress.context import PassContext
    from compress.passes.gptq import GPTQ, GPTQConfig

    dev = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    model.model.layers.to("cpu")
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    calib = CalibrationData(ids, "random tokens", 0, ids.numel())
    ctx = PassContext(adapter=get_adapter(model), device=dev, calibration_factory=lambda: calib)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rep = GPTQ(GPTQConfig(bits=4, group_size=args.group_size, act_order=True)).apply(model, ctx)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    res = {"device": torch.cuda.get_device_name(0), "layers": args.layers, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "group_size": args.group_size, "gptq_seconds": round(secs, 1),
           "seconds_per_layer": round(secs / args.layers, 2), "peak_gpu_gib": round(peak, 2),
           "model_build_seconds": round(build_s, 1), "modules": len(rep.modules),
           "mean_rel_output_error": rep.summary["mean_rel_output_error"], "torch": torch.__version__}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
