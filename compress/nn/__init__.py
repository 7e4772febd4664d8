from compress.nn.qlinear import QuantizedLinear

__all__ = ["QuantizedLinear"]
