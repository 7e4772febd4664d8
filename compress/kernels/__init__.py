"""Fast INT4 inference: kernels for ``QuantizedLinear`` and the dispatcher that installs them.

- ``accelerate(model, backend="auto")``: repack every quantized layer once and install the best
  available forward (Triton W4A16 on CUDA, torch's int4 kernel on the CPU, else the dequantize
  fallback), logging which path ran and why. See ``dispatch``.
- ``layout``: pure tensor functions for act-order column order and the Triton packing.
- ``cpu_int4``, ``triton_w4a16`` (imports Triton; only on demand), ``gpu_timing``.

Design and measurements: docs/kernels.md.
"""
from compress.kernels.dispatch import BACKENDS, AccelerationReport, accelerate, packed_weights, tune_triton

__all__ = ["BACKENDS", "AccelerationReport", "accelerate", "packed_weights", "tune_triton"]
