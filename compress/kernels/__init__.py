"""Fast INT4 inference: kernels for ``QuantizedLinear`` and the dispatcher that installs them.

- ``accelerate(model, backend="auto")``: repack every quantized layer once and install the best
  available forward (on CUDA the W4A16 CUDA kernel, else the Triton kernels; torch's int4 kernel on
  the CPU; else the dequantize fallback), logging which path ran and why. See ``dispatch``.
- ``layout``: pure tensor functions for act-order column order and the CUDA and Triton packings.
- ``cuda_w4a16``: the W4A16 CUDA kernel (1..16 rows; compiled at run time with NVRTC), reached through
  ``triton_w4a16.repack`` / ``w4a16_matmul``.
- ``cpu_int4``, ``triton_w4a16`` (imports Triton; only on demand; also the GPU entry point), ``gpu_timing``.

Use and results: docs/int4-kernels.md; design and measurements: docs/design/.
"""
from compress.kernels.dispatch import BACKENDS, AccelerationReport, accelerate, packed_weights, tune_triton

__all__ = ["BACKENDS", "AccelerationReport", "accelerate", "packed_weights", "tune_triton"]
