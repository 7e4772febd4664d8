"""The ``cpu-int4`` path of ``accelerate``: which CPU kernel runs a layer, and the forward installed.

Two kernels for few activation rows (decode): our C kernel (``cpu_native``, fp32 arithmetic, built
for this CPU on first use) and torch's int4 kernel (``cpu_int4``, bf16). From a threshold of rows
on (prefill) the layer is dequantized for the call and multiplied densely, in bf16 where the CPU
multiplies bf16 natively, else in fp32. ``dispatch.accelerate`` decides per layer and reports why.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from compress.errors import ConfigError
from compress.nn.qlinear import QuantizedLinear

CPU_PREFILL = ("auto", "bf16", "fp32")
CPU_KERNELS = ("auto", "native", "torch")

#: From this many activation rows on (prefill, larger batches), dequantize the layer to float32 once
#: per call and multiply densely instead of running torch's int4 kernel (bf16 arithmetic). The int4
#: kernel costs ~0.043 ms per row on SmolLM2's 1536x576 layer, the fp32 GEMM ~0.02 ms per row plus
#: ~0.35 ms of dequantization; summed over one SmolLM2 block the two cross between 18 and 20 rows
#: (``python bench/speed/cpu_crossover.py``, 1 thread, docs/design/cpu-kernels.md). Was 48 before ``dequantize_weight``
#: worked in place (dequantization then cost 0.6-2 ms).
CPU_DENSE_MIN_ROWS = 20
#: The same switch for our C kernel (``cpu_native``) and its dense path (dequantized blocks + fp32
#: GEMM): on SmolLM2's layers the two were even at 48 rows, the C kernel ahead below (``python
#: bench/speed/cpu_crossover.py``, 1 thread, an AVX-512 Xeon, 2026-12-06; docs/design/cpu-kernels.md). Where the
#: dense product runs in bf16 (AMX machines) CPU_BF16_DENSE_MIN_ROWS applies to both kernels.
CPU_NATIVE_DENSE_MIN_ROWS = 48
#: The same switch when the dense product runs in bf16 (``cpu_prefill`` "bf16", or "auto" on a CPU
#: with AMX / AVX512-BF16). On such a CPU (session 5's: AMX) the int4 kernel is also about 3x faster
#: than on session 4's, so dense wins later: summed over one SmolLM2 block, int4 1.92 vs dense bf16
#: 1.98 ms at 32 rows, 2.37 vs 2.11 at 40 (``python bench/speed/cpu_crossover.py``, 1 thread,
#: docs/design/cpu-kernels.md), so the switch sits between them. (CPU_DENSE_MIN_ROWS above was measured on
#: session 4's CPU, which is where the fp32 path matters.)
CPU_BF16_DENSE_MIN_ROWS = 36


def prefill_dtype(cpu_prefill: str) -> torch.dtype:
    """The dense product's dtype for ``accelerate``'s ``cpu_prefill`` option."""
    from compress.kernels import cpu_int4

    if cpu_prefill == "auto":
        return torch.bfloat16 if cpu_int4.fast_bf16_matmul() else torch.float32
    return torch.bfloat16 if cpu_prefill == "bf16" else torch.float32


def backend(mod: QuantizedLinear, dense_dtype: torch.dtype, native: bool,
            scratch: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cpu-int4 forward: the C kernel (``native``) or torch's int4 kernel for few activation rows,
    dequantize + dense GEMM for prefill-sized inputs."""
    from compress.kernels import cpu_int4, cpu_native

    min_rows = (CPU_BF16_DENSE_MIN_ROWS if dense_dtype == torch.bfloat16
                else CPU_NATIVE_DENSE_MIN_ROWS if native else CPU_DENSE_MIN_ROWS)
    if native:
        wt = cpu_native.repack(mod.qweight, mod.scales, mod.zeros, mod.g_idx, mod.bits, mod.bias)

        def dense(x: torch.Tensor) -> torch.Tensor:
            return cpu_native.dense_matmul(x, wt, dense_dtype, scratch)

        def kernel(x: torch.Tensor) -> torch.Tensor:
            return cpu_native.matmul(x, wt)
    else:
        wt = cpu_int4.repack(mod.qweight, mod.scales, mod.zeros, mod.g_idx, mod.bits, mod.bias)
        dense = cpu_int4.dense_linear(mod.qweight, mod.scales, mod.zeros, mod.g_idx, mod.bias, dense_dtype)

        def kernel(x: torch.Tensor) -> torch.Tensor:
            return cpu_int4.int4_matmul(x, wt)

    def eager(x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= min_rows * x.shape[-1]:  # prefill: compute-bound, a dense GEMM is faster
            return dense(x)
        return kernel(x)

    if not native:
        forward = eager
    else:  # the C kernel is called through ctypes, which Dynamo cannot trace: a custom op under compile
        from compress.kernels import ops

        handle, out_features = ops.register(eager), mod.out_features

        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                return torch.ops.compress.cpu_int4_linear(x, handle, out_features)
            return eager(x)

        forward.eager = eager  # keeps the registered closure alive as long as the layer's forward
        forward.restore_codes = wt.restore_codes  # the packed copy holds the codes (as on the GPU)
    forward.packed = wt
    forward.dense_dtype = dense_dtype
    forward.min_rows = min_rows
    return forward


def cpu_layer(mod: QuantizedLinear, dense_dtype: torch.dtype, native: tuple[bool, str],
              scratch: Any) -> Callable:
    """The C kernel where it can take this layer, else torch's kernel; ``reason`` on the returned
    forward says which, and why not the C kernel. ``native``: ``kernel_status``'s answer.
    ``scratch``: the model's shared buffer for dequantized prefill blocks (``cpu_native.Scratch``).
    Raises ValueError when neither kernel can take the layer."""
    why = native[1]
    if native[0]:
        try:
            fn = backend(mod, dense_dtype, True, scratch)
            fn.reason = native[1]
            return fn
        except ValueError as e:  # e.g. a group width the C kernel does not tile
            why = f"C kernel cannot run this layer: {e}"
    from compress.kernels import cpu_int4

    ok, torch_why = cpu_int4.available()
    if not ok:
        raise ValueError(f"{why}; {torch_why}")
    try:
        fn = backend(mod, dense_dtype, False)
    except ValueError as e:
        raise ValueError(f"{e}; {why}") from e
    fn.reason = f"torch _weight_int4pack_mm_for_cpu, bf16 activations ({why})"
    return fn


def kernel_status(cpu_kernel: str) -> tuple[bool, str]:
    """(use the C kernel, why / why not) for ``accelerate``'s ``cpu_kernel`` option."""
    if cpu_kernel == "torch":
        return False, "cpu_kernel='torch'"
    from compress.kernels import cpu_native

    ok, why = cpu_native.available()
    if not ok and cpu_kernel == "native":
        raise ConfigError(f"cpu_kernel='native': the C kernel is unavailable here: {why}")
    return ok, why
