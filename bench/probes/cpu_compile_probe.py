"""Does ``torch.compile`` shorten a CPU decode step? Eager vs compiled, the fp32 model or its INT4 version.

Why: with our C kernel, the quantized layers take well under half of SmolLM2's eager one-token step
on the CPU (``bench/speed/e2e_decode.py cpu`` prints the split); the rest is transformers' Python and small
ops, which Inductor could compile away. The INT4 layers enter the compiled graph as the custom op
``compress::cpu_int4_linear`` (a Python kernel behind the dispatcher). Static KV cache (``gpu_timing._Steps``), inputs
made inside inference mode, best of 3 rounds of ``--steps`` one-token steps after a 128-token prompt.
The first compile takes minutes on 2 cores (Inductor's FX graph cache makes reruns faster).

    python bench/probes/cpu_compile_probe.py --threads 1            # fp32 model
    python bench/probes/cpu_compile_probe.py --threads 1 --int4     # RTN INT4 g64 decoder layers, C kernel
    python bench/probes/cpu_compile_probe.py --op-overhead           # host time of one op call, two registrations

``--op-overhead`` times a do-nothing op ([1, 576] in, an empty [1, 576] out) called through the
dispatcher as ``torch.library.custom_op`` registers it and as a schema plus CPU kernel
(``torch.library.Library``, how ``compress::cpu_int4_linear`` is registered), against a plain
Python call: under compile every INT4 layer pays this once per token.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.kernels import accelerate  # noqa: E402
from compress.kernels.gpu_timing import _Steps  # noqa: E402
from bench.speed.e2e_decode import SMOLLM2, quantize_linears  # noqa: E402


def op_overhead(calls: int = 20000) -> None:
    """Microseconds per call of a do-nothing op under the two registrations (best of 5 runs)."""
    def empty(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
        return x.new_empty((1, n))

    custom = torch.library.custom_op("compress_probe::custom", empty, mutates_args=())
    custom.register_fake(empty)
    lib = torch.library.Library("compress_probe", "FRAGMENT")
    lib.define("plain(Tensor x, int handle, int n) -> Tensor")
    lib.impl("plain", empty, "CPU")
    torch.library.register_fake("compress_probe::plain", empty)
    x = torch.randn(1, 576)
    fns = {"python call": lambda: empty(x, 1, 576),
           "custom_op": lambda: torch.ops.compress_probe.custom.default(x, 1, 576),
           "schema + CPU kernel": lambda: torch.ops.compress_probe.plain.default(x, 1, 576)}
    with torch.inference_mode():
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(5):
                for _ in range(1000):
                    fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                best = min(best, (time.perf_counter() - t0) / calls)
            print(f"{name:20}: {best * 1e6:6.2f} us per call", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--int4", action="store_true", help="RTN INT4 g64 decoder layers on accelerate's CPU path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--op-overhead", action="store_true", help="only time one op call's dispatch, two ways")
    args = ap.parse_args(argv)
    if args.op_overhead:
        torch.set_num_threads(1)
        op_overhead()
        return 0
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tag = "fp32"
    if args.int4:
        quantize_linears(model, 64, True)
        accelerate(model, backend="cpu-int4")
        tag = "int4"
    with torch.inference_mode():
        ids = torch.randint(0, int(model.config.vocab_size), (1, 128), generator=torch.Generator().manual_seed(0))
        for mode in ("eager", "compile"):
            torch._dynamo.reset()
            steps = _Steps(model, ids, args.steps + 8, torch.compile(model, dynamic=False) if mode == "compile" else None)
            t0 = time.perf_counter()
            for _ in range(2):  # the cache's first use and both input shapes compile here
                steps.prefill()
                steps.step()
            warm = time.perf_counter() - t0
            best = float("inf")
            for _ in range(3):
                steps.prefill()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps.step()
                best = min(best, (time.perf_counter() - t0) / args.steps)
            print(f"{tag} {mode:7}: warm-up {warm:6.1f} s, decode {best * 1e3:6.2f} ms/token", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
