"""Checkpoint writers and readers.

- ``compressed-tensors`` (default for quantized models): ``pack-quantized``; transformers loads it
  with the ``compressed-tensors`` package, vLLM reads the same format.
- ``gptq``: GPTQ v1 (``quant_method: gptq``), for loaders built around AutoGPTQ/GPTQModel.
- ``dense``: plain ``save_pretrained`` safetensors (pruned models keep their zeros; quantized layers
  are written dequantized).

``save_checkpoint`` writes into a temporary folder beside the target and renames it when complete.
``load_quantized`` reads either quantized format back into a model with ``QuantizedLinear`` layers.
"""
from compress.formats.io import load_quantized, save_checkpoint

__all__ = ["save_checkpoint", "load_quantized"]
