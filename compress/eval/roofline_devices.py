"""Device catalog for the roofline estimator: one YAML file per device, every number with its source.

The built-in files live in ``compress/eval/devices/`` (package data). Users add a device by writing a
YAML file of the same shape and passing it (or the folder holding it) with ``--device-file PATH``, or
by naming the file directly: ``--device path/to/my-gpu.yaml``.

Shape of a device file (all numbers are SI units: bytes, bytes/s, FLOP/s, seconds)::

    name: h100
    title: NVIDIA H100 SXM5 80 GB
    kind: gpu                      # gpu | cpu | soc
    aliases: [h100-sxm]
    note: free text
    memory_bandwidth: {value: 3.35e+12, source: "NVIDIA H100 datasheet"}
    memory_capacity: {value: 80.0e+9, source: "NVIDIA H100 datasheet"}
    peak_flops:                    # dense (no sparsity) peaks; fp32 is the non-matrix SIMD/CUDA-core rate
      fp32: {value: 67.0e+12, source: ...}
      fp16: {value: 989.4e+12, source: ...}   # matrix units (tensor cores / AMX) where present
    achievable:
      compute: {value: 0.7, source: ...}      # fraction of peak FLOP/s reached by real GEMMs
      memory: {value: 0.7, source: ...}       # fraction of peak bandwidth reached by real kernels
      attention: {value: 0.5, source: ...}    # optional: fused attention (default: compute)
      vector: {value: 0.7, source: ...}       # optional: elementwise/norm ops at fp32 (default: compute)
      elementwise: {value: 0.6, source: ...}  # optional: transformers' unfused elementwise ops (default: memory)
      by_op:                                  # optional: per operator kind (rotary, kv_cache_update, norm, ...)
        rotary: {value: 0.4, source: ...}
    overhead:                                  # fixed costs added to the roofline time (optional)
      per_forward_s: {value: 0.0, source: ...}
      per_layer_s: {value: 0.0, source: ...}
      per_weight_row_s: {value: 0.0, source: ...}  # per output row of a weight matrix (CPU GEMV)
      per_kernel_s: {value: 2.0e-6, source: ...}   # per GPU kernel launched (in a CUDA graph)
      prefill_per_kernel_s: {value: 2.0e-6, source: ...}  # the same in a prefill forward (default: per_kernel_s)
      per_gemm_s: {value: 4.0e-6, source: ...}     # per matrix-product kernel, instead of per_kernel_s
      per_attention_s: {value: 1.0e-5, source: ...}  # per fused attention call, instead of per_kernel_s
    host_overhead:                             # optional (GPUs): the host's time to issue one eager forward
      per_forward_s: {value: 3.0e-3, source: ...}
      per_layer_s: {value: 6.0e-4, source: ...}
    sparse_2_4: {value: true, source: ...}     # 2:4 sparse matrix units (halve the matrix FLOPs)

Keys of ``peak_flops``: fp32, tf32, fp16, bf16, fp8, int8. Matrix products run at the peak of the
compute dtype; everything else (norms, softmax, activations, dequantization) at ``fp32``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.errors import CompressError

BUILTIN_DIR = Path(__file__).with_name("devices")
PEAK_KEYS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Quantity(_Strict):
    """A number and where it comes from (datasheet, measurement script, or a stated assumption)."""

    value: float = Field(ge=0)
    source: str = Field(min_length=3)


class Flag(_Strict):
    value: bool
    source: str = Field(min_length=3)


class Achievable(_Strict):
    """Fractions of peak that real kernels reach. ``attention`` (fused attention, all its FLOPs at the
    matrix peak) and ``vector`` (norms, activations, rotary, dequantization at the fp32 peak) default
    to ``compute``; CPUs running eager PyTorch need their own, measured values."""

    compute: Quantity
    memory: Quantity
    attention: Quantity | None = None
    vector: Quantity | None = None
    #: transformers' unfused elementwise operators (one PyTorch op per kernel: RMSNorm's fp32 steps,
    #: SiLU then mul, residual adds) as a fraction of nominal bandwidth
    elementwise: Quantity | None = None
    #: measured fractions for transformers' own kernels, keyed by operator kind (norm, mlp_act, residual,
    #: rotary, kv_cache_update, attention_decode); they win over ``elementwise`` for that kind. Also
    #: compress's own kernels by name (w4a16, decode_attention), which otherwise stream at ``memory``
    by_op: dict[str, Quantity] = Field(default_factory=dict)


_NOT_GIVEN = Quantity(value=0.0, source="not given: roofline only (no fixed overhead)")


class Overhead(_Strict):
    """Fixed costs on top of the roofline, measured where they matter.

    ``per_forward_s`` and ``per_layer_s`` are framework costs of a CPU running eager PyTorch (tiny
    models). ``per_weight_row_s`` is the time per output row of a weight-streaming matrix product
    beyond its bytes / bandwidth: CPU matrix-vector kernels reach far less bandwidth on short rows
    (hidden 576) than on long ones (fitted over row lengths 512..8192). On GPUs every kernel costs
    a fixed time however little it does (launch, ramp-up, drain, the gap to the next kernel, even in
    a CUDA graph): ``per_kernel_s`` for each elementwise/reduction kernel, ``per_gemm_s`` for each
    matrix product (cuBLAS's intercept, about twice a small kernel's) and ``per_attention_s`` for each
    fused attention call (unset: ``per_kernel_s``)."""

    per_forward_s: Quantity = _NOT_GIVEN
    per_layer_s: Quantity = _NOT_GIVEN
    per_weight_row_s: Quantity = _NOT_GIVEN
    per_kernel_s: Quantity = _NOT_GIVEN
    #: per kernel of a prefill forward (kernels over many tokens ramp up longer); unset: per_kernel_s
    prefill_per_kernel_s: Quantity = _NOT_GIVEN
    per_gemm_s: Quantity = _NOT_GIVEN
    #: each fused (flash) attention call, instead of per_kernel_s: its latency at short prompts
    per_attention_s: Quantity = _NOT_GIVEN
    #: each launch of one of compress's own kernels, by name (w4a16, decode_attention; see
    #: roofline_compress); unset: per_gemm_s for w4a16, per_attention_s for decode_attention
    by_kernel: dict[str, Quantity] = Field(default_factory=dict)


class HostOverhead(_Strict):
    """The host's time (Python, transformers, PyTorch dispatch, launch calls) to issue one forward
    when it is not replayed from a CUDA graph. With ``execution: eager`` a forward takes the larger
    of this and the device's time: the GPU waits for the host or the host for the GPU."""

    per_forward_s: Quantity
    per_layer_s: Quantity


_NO_OVERHEAD = Overhead()
_NO_SPARSE = Flag(value=False, source="not given: assume no 2:4 sparse matrix units")


class Device(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    title: str
    kind: Literal["gpu", "cpu", "soc"]
    aliases: tuple[str, ...] = Field((), strict=False)
    note: str = ""
    memory_bandwidth: Quantity
    memory_capacity: Quantity
    peak_flops: dict[Literal["fp32", "tf32", "fp16", "bf16", "fp8", "int8"], Quantity]
    achievable: Achievable
    overhead: Overhead = _NO_OVERHEAD
    host_overhead: HostOverhead | None = None
    sparse_2_4: Flag = _NO_SPARSE

    def peak(self, key: str) -> float:
        """Peak FLOP/s for a dtype key; an error names the keys this device has."""
        if key not in self.peak_flops:
            raise CompressError(
                f"device {self.name!r} has no peak_flops.{key}; it lists {sorted(self.peak_flops)}. "
                f"Pick another dtype or add {key} to its YAML file."
            )
        return self.peak_flops[key].value

    def achievable_bandwidth(self) -> float:
        return self.memory_bandwidth.value * self.achievable.memory.value

    def op_bandwidth(self, kind: str = "") -> float:
        """Bandwidth of one of transformers' own (unfused) operators: the measured fraction for its kind
        if the device has one, else the elementwise fraction, else the memory fraction."""
        a = self.achievable
        frac = a.by_op.get(kind) or a.elementwise or a.memory
        return self.memory_bandwidth.value * frac.value

    def kernel_bandwidth(self, kernel: str) -> float:
        """Bandwidth of one of compress's own kernels: its measured fraction, else the memory fraction."""
        frac = self.achievable.by_op.get(kernel) or self.achievable.memory
        return self.memory_bandwidth.value * frac.value

    def kernel_fixed_s(self, kernel: str) -> float:
        """Fixed time per launch of one of compress's own kernels (see ``Overhead.by_kernel``)."""
        o = self.overhead
        if kernel in o.by_kernel:
            return o.by_kernel[kernel].value
        if kernel == "w4a16":
            return o.per_gemm_s.value
        if kernel == "decode_attention":
            return o.per_attention_s.value or o.per_kernel_s.value
        return o.per_kernel_s.value

    def achievable_flops(self, key: str, kind: Literal["matrix", "attention", "vector"] = "matrix") -> float:
        a = self.achievable
        frac = {"matrix": a.compute, "attention": a.attention or a.compute, "vector": a.vector or a.compute}[kind]
        return self.peak(key) * frac.value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3.35e12`` as a float (YAML 1.1 wants ``3.35e+12``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def read_device_file(path: str | Path) -> Device:
    """Parse and validate one device YAML file. Raises CompressError naming the file and the field."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise CompressError(f"cannot read device file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CompressError(f"device file {path} must hold a mapping, got {type(raw).__name__}")
    try:
        return Device.model_validate(raw)
    except ValidationError as e:
        lines = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CompressError(f"invalid device file {path}: {lines}") from None


def _yaml_files(where: str | Path) -> list[Path]:
    p = Path(where)
    if p.is_dir():
        return sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
    if p.is_file():
        return [p]
    raise CompressError(f"device file or folder {p} does not exist")


def catalog(extra: tuple[str | Path, ...] | list[str | Path] = ()) -> dict[str, Device]:
    """All known devices by name and alias: built-in files, then ``extra`` files/folders (which win)."""
    found: dict[str, Device] = {}
    for source in (BUILTIN_DIR, *extra):
        for f in _yaml_files(source):
            dev = read_device_file(f)
            for key in (dev.name, *dev.aliases):
                found[key.lower()] = dev
    return found


def load_device(name_or_path: str, extra: tuple[str | Path, ...] | list[str | Path] = ()) -> Device:
    """A device by name/alias (built-in or from ``extra``), or from a path to a YAML file.

    >>> load_device("h100").memory_bandwidth.value
    3350000000000.0
    """
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return read_device_file(name_or_path)
    known = catalog(extra)
    dev = known.get(name_or_path.lower())
    if dev is None:
        names = sorted({d.name for d in known.values()})
        raise CompressError(
            f"unknown device {name_or_path!r}; known devices: {', '.join(names)} "
            f"(or pass a YAML file with --device path/to/device.yaml or a folder with --device-file)"
        )
    return dev


def known_device_names(extra: tuple[str | Path, ...] | list[str | Path] = ()) -> list[str]:
    return sorted({d.name for d in catalog(extra).values()})
