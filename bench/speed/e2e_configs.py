"""Does the kernel tuner's choice hold end to end? Compiled decode with other CUDA-kernel configs.

``tune`` times each layer's configs in a chain of our own kernels (64 calls in a CUDA graph). In a
compiled model each of our kernels follows one of Inductor's small kernels instead, so a config that
prefetches more weights before ``griddepcontrol.wait`` (more stages) or leaves room on the SMs (fewer
warps per block) might win there. This builds a Llama-2-7B-shaped model (``--layers`` of its 32),
RTN INT4 g128, tunes it for batch 1, times compiled decode (``time_generation(mode="compile",
inductor_pdl=True)``), then overrides every layer's batch-1 config and times again:

- ``stages4`` / ``stages8``: the tuned config with a deeper copy pipeline (fewer warps per block where
  48 KB per block would overflow; with ``--dynamic-smem`` only where the device's opt-in limit would);
- ``half_kw``: half the warps per block, 4 stages where they fit;
- ``default_config``: ``cuda_w4a16.default_config``, untuned;
- ``tuned again``: back to the tuned configs (the spread between the two tuned rows is the noise).

    python3 bench/speed/e2e_configs.py --layers 8        # GPU machine, sm_90+: about 4 minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from bench.speed.e2e_decode import LLAMA2_7B, quantize_linears  # noqa: E402

from compress.kernels import accelerate, cuda_w4a16 as cw, tune_triton  # noqa: E402
from compress.kernels.dispatch import packed_weights  # noqa: E402
from compress.kernels.gpu_timing import random_llama, time_generation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--dynamic-smem", action="store_true",
                    help="deeper configs may use the device's opt-in shared memory (session 5) instead of "
                         "shrinking to 48 KB per block as session 4 did")
    args = ap.parse_args(argv)
    model = random_llama({**LLAMA2_7B, "num_hidden_layers": args.layers})
    quantize_linears(model, 128, False)
    # the overrides below set the plain launches' configs; fused blocks tune and read their own
    # (compress.kernels.fused_block), which would keep these rows from seeing them
    accelerate(model, backend="triton", fuse_blocks=False)
    tune_triton(model, (1,))
    wts = list({id(w): w for w in packed_weights(model).values()}.values())
    if any(w.kernel != "cuda" for w in wts):
        raise SystemExit("every layer must run the CUDA kernel for this comparison")
    tuned = {id(w): w.configs[1] for w in wts}

    def shape(w) -> str:
        return f"{w.out_features}x{w.in_features}"

    def run(tag: str) -> None:
        r = time_generation(model, args.prompt, args.generate, 1, mode="compile", repeats=3, warmup=1, inductor_pdl=True)
        print(f"{tag:15} {r['decode_ms_per_token']:.4f} ms/token  tokens_match_eager={r['tokens_match_eager']}  "
              f"configs {sorted({(shape(w), tuple(dataclasses.astuple(w.configs[1]))) for w in wts})}", flush=True)

    limit = cw.smem_limit("cuda") if args.dynamic_smem else cw.SMEM_LIMIT

    def fitted(c: cw.CudaConfig, base: cw.CudaConfig) -> cw.CudaConfig:
        if c.smem_bytes() > limit:  # fewer warps per block, same shared memory per block
            c = dataclasses.replace(c, kw=max(1, c.kw * base.stages // c.stages))
        return c if c.smem_bytes() <= limit else base

    run("tuned")
    for stages in (4, 8):
        for w in wts:
            w.configs[1] = fitted(dataclasses.replace(tuned[id(w)], stages=stages), tuned[id(w)])
        run(f"stages{stages}")
    for w in wts:
        w.configs[1] = fitted(dataclasses.replace(tuned[id(w)], kw=max(1, tuned[id(w)].kw // 2), stages=4),
                              dataclasses.replace(tuned[id(w)], kw=max(1, tuned[id(w)].kw // 2)))
    run("half_kw")
    for w in wts:
        w.configs[1] = cw.default_config(1, w.out_features, tiled=w.codes_tiled)
    run("default_config")
    for w in wts:
        w.configs[1] = tuned[id(w)]
    run("tuned again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
