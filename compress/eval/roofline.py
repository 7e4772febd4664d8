"""Roofline estimate of LLM inference latency and memory on a target device, with and without compression.

Each operator of the forward pass (``roofline_ops``) takes ``max(compute time, memory time)`` plus the
fixed time of its kernels, where compute time = matrix FLOPs / (matrix peak of the compute dtype x
achievable fraction) + vector FLOPs / (fp32 peak x vector fraction) (fused attention: all its FLOPs at
the matrix peak x attention fraction) and memory time = bytes / (bandwidth x achievable fraction;
transformers' unfused elementwise kernels at their own measured fractions). The fixed time is, on GPUs,
a measured cost per kernel, per matrix product and per flash-attention call (launch, ramp-up, drain:
it does not go away in a CUDA graph), with the kernel counts of ``implementation`` (transformers'
PyTorch modules by default, or ``fused``: one kernel per operator). A generate task (prompt P, generate
G, batch B) is one prefill forward (time to first token) and G decode steps at contexts P+1 .. P+G,
averaged into ``decode_ms_per_token``. Devices with a measured framework cost (the CPU of
``this-machine``) add ``per_forward_s + layers x per_layer_s`` per forward and ``per_weight_row_s`` per
output row of each weight matrix streamed (short-row GEMV cost). ``execution: eager`` bounds each
forward from below by the device's measured host time (Python and launches; GPUs with host_overhead).

Recipe snippet (the lead wires ``RooflineSpec`` into ``EvalSpec``)::

    eval:
      roofline: {device: h100, prompt: 1024, generate: 128, batch: 1}

Python::

    from compress.eval.roofline import estimate
    r = estimate("llama-2-7b", {"device": "a100-80gb", "prompt": 1024, "generate": 1},
                 compression={"weight_bits": 4, "group_size": 128})
    r.to_dict()["speedup_decode"]

See docs/roofline.md for the assumptions and the validation against measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import CompressError, ConfigError
from compress.eval import roofline_compress as rc
from compress.eval.roofline_devices import Device, load_device
from compress.eval.roofline_ops import (
    Op,
    WeightFormat,
    embed_ops,
    head_ops,
    kv_cache_bytes,
    layer_ops,
    model_weight_bytes,
)
from compress.eval.roofline_shapes import ModelShape, count_params, load_model_config, model_shape

DTYPES = {"float16": ("fp16", 2), "bfloat16": ("bf16", 2), "float32": ("fp32", 4)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


class RooflineSpec(_Strict):
    """What to estimate: ``eval: {roofline: {device: h100, prompt: 1024, generate: 128, batch: 1}}``."""

    device: str = Field("h100", description="device name or alias from compress/eval/devices, or a .yaml path")
    prompt: int = Field(1024, gt=0, description="prompt tokens per sequence (prefill length)")
    generate: int = Field(128, gt=0, description="decode steps per sequence (tokens generated after prefill)")
    batch: int = Field(1, gt=0, description="sequences decoded together")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="activation/compute dtype")
    kv_cache: Literal["static", "dynamic"] = Field(
        "static", description="static: new KV rows written in place; "
                              "dynamic: transformers DynamicCache (torch.cat copies the cache each step)")
    prefill_logits: Literal["all", "last"] = Field(
        "all", description="lm_head over all prompt tokens (a plain forward) or only the last one")
    overhead: bool = Field(
        True, description="add the device's measured fixed costs (per kernel, per matrix product, per forward, "
                          "per layer, per weight row)")
    implementation: Literal["transformers", "fused", "compress"] = Field(
        "transformers", description="transformers: the kernels and traffic of transformers' PyTorch modules "
                                    "(unfused RMSNorm, rotary, cache update, SiLU*mul); fused: one kernel per "
                                    "operator, each activation read and written once (the floor); compress: "
                                    "compress's compiled runtime with its W4A16 and decode attention kernels "
                                    "(stacked projections, norms/activation/residuals inside the W4A16 launches)")
    execution: Literal["graph", "eager"] = Field(
        "graph", description="graph: each forward replayed from a CUDA graph (or compiled), no host cost; "
                             "eager: a forward takes at least the device's host_overhead (Python and launches)")
    max_cache_len: int | None = Field(
        None, gt=0, description="slots of a static KV cache (default prompt + generate); transformers' "
                                "decode attends to all of them behind a mask")
    device_files: tuple[str, ...] = Field((), strict=False, description="extra device YAML files or folders")

    @model_validator(mode="after")
    def _device_exists(self) -> "RooflineSpec":
        try:
            load_device(self.device, self.device_files)
        except CompressError as e:
            raise ConfigError(f"roofline.device: {e}") from None
        return self


class CompressionSpec(_Strict):
    """Compressed settings of the decoder's linear layers (embeddings stay in the compute dtype)."""

    weight_bits: int | None = Field(None, ge=2, le=8, description="weight-only quantization bits; null keeps the dtype")
    group_size: int = Field(128, description="input columns per scale group; -1 for one scale per output row")
    symmetric: bool = Field(
        False, description="symmetric grid: no zero points stored (asymmetric stores one per group)")
    scale_bits: int = Field(
        16, ge=0, description="bits per stored scale (fp16); 0 leaves scales out (LLM-Viewer's accounting)")
    sparsity: float | Literal["2:4"] | None = Field(None, description='"2:4" or an unstructured fraction in (0, 1)')
    sparse_format: Literal["dense", "bitmask", "csr"] = Field(
        "dense", description="unstructured storage: dense (no gain), bitmask (values + 1 bit/position), csr")
    quantize_lm_head: bool = Field(False, description="also quantize lm_head (GPTQ/AWQ usually keep it in fp16)")
    dequant_ops_per_weight: float = Field(
        4.0, ge=0, description="vector ops per stored weight to dequantize (unpack, convert, -zero, *scale)")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == -1 or v > 0:
            return v
        raise ValueError("must be -1 (per output row) or a positive number of columns")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError('must be "2:4" or a fraction strictly between 0 and 1')
        return v

    @property
    def active(self) -> bool:
        return self.weight_bits is not None or self.sparsity is not None


# ----------------------------------------------------------------------------------------------
@dataclass
class OpRow:
    """One operator summed over the layers it appears in (per forward; decode: averaged per step)."""

    name: str
    count: int
    flops: float = 0.0
    weight_bytes: float = 0.0
    act_bytes: float = 0.0
    kv_bytes: float = 0.0
    compute_ms: float = 0.0
    memory_ms: float = 0.0
    #: fixed time of its kernels (launch, ramp-up, drain), added to max(compute, memory)
    fixed_ms: float = 0.0
    kernels: float = 0.0
    ms: float = 0.0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def bound(self) -> str:
        """What dominates: compute, memory, or the fixed time of its kernels (latency)."""
        if self.fixed_ms > max(self.compute_ms, self.memory_ms):
            return "fixed"
        return "compute" if self.compute_ms > self.memory_ms else "memory"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "flops": self.flops, "bytes": self.bytes,
                "weight_bytes": self.weight_bytes, "act_bytes": self.act_bytes, "kv_bytes": self.kv_bytes,
                "intensity": self.intensity, "bound": self.bound, "compute_ms": self.compute_ms,
                "memory_ms": self.memory_ms, "fixed_ms": self.fixed_ms, "kernels": self.kernels, "ms": self.ms}


@dataclass
class Phase:
    rows: list[OpRow]
    overhead_ms: float
    #: eager execution: the host's time to issue the forward (0 under a CUDA graph)
    host_ms: float = 0.0

    @property
    def device_ms(self) -> float:
        return sum(r.ms for r in self.rows) + self.overhead_ms

    @property
    def ms(self) -> float:
        return max(self.device_ms, self.host_ms)

    @property
    def kernels(self) -> float:
        return sum(r.kernels for r in self.rows)

    @property
    def flops(self) -> float:
        return sum(r.flops for r in self.rows)

    @property
    def bytes(self) -> float:
        return sum(r.bytes for r in self.rows)


@dataclass
class RooflineResult:
    model: str
    device: Device
    spec: RooflineSpec
    compression: CompressionSpec | None
    params: int
    prefill: Phase
    decode: Phase
    weights_bytes: float
    kv_bytes: float
    act_bytes: float
    baseline: "RooflineResult | None" = None
    warnings: list[str] = field(default_factory=list)

    @property
    def prefill_ms(self) -> float:
        return self.prefill.ms

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode.ms

    @property
    def memory_gb(self) -> float:
        return (self.weights_bytes + self.kv_bytes + self.act_bytes) / 1e9

    def to_dict(self, per_op: bool = True) -> dict[str, Any]:
        s = self.spec
        e2e_ms = self.prefill_ms + s.generate * self.decode_ms_per_token
        d: dict[str, Any] = {
            "model": self.model, "params": self.params,
            "device": self.device.name, "device_title": self.device.title,
            "dtype": s.dtype, "batch": s.batch, "prompt": s.prompt, "generate": s.generate,
            "kv_cache": s.kv_cache, "prefill_logits": s.prefill_logits,
            "implementation": s.implementation, "execution": s.execution,
            "prefill_ms": self.prefill_ms, "ttft_ms": self.prefill_ms,
            "decode_ms_per_token": self.decode_ms_per_token,
            "decode_tokens_per_s": s.batch * 1e3 / self.decode_ms_per_token,
            "e2e_ms": e2e_ms, "e2e_tokens_per_s": s.batch * s.generate * 1e3 / e2e_ms,
            "memory_gb": self.memory_gb,
            "memory": {"weights_gb": self.weights_bytes / 1e9, "kv_cache_gb": self.kv_bytes / 1e9,
                       "activations_gb": self.act_bytes / 1e9,
                       "capacity_gb": self.device.memory_capacity.value / 1e9,
                       "fits": self.memory_gb * 1e9 <= self.device.memory_capacity.value},
            "overhead_ms": {"prefill": self.prefill.overhead_ms, "decode_per_token": self.decode.overhead_ms},
            "fixed_ms": {"prefill": sum(r.fixed_ms for r in self.prefill.rows),
                         "decode_per_token": sum(r.fixed_ms for r in self.decode.rows)},
            "host_ms": {"prefill": self.prefill.host_ms, "decode_per_token": self.decode.host_ms},
            "kernels": {"prefill": self.prefill.kernels, "decode_per_token": self.decode.kernels},
            "compression": self.compression.model_dump() if self.compression else None,
            "warnings": list(self.warnings),
        }
        if self.baseline is not None:
            b = self.baseline
            d["baseline"] = {"model": b.model, "params": b.params, "prefill_ms": b.prefill_ms,
                             "decode_ms_per_token": b.decode_ms_per_token, "memory_gb": b.memory_gb}
            d["speedup_decode"] = b.decode_ms_per_token / self.decode_ms_per_token
            d["speedup_prefill"] = b.prefill_ms / self.prefill_ms
            d["memory_ratio"] = self.memory_gb / b.memory_gb
        if per_op:
            d["prefill_ops"] = [r.to_dict() for r in self.prefill.rows]
            d["decode_ops"] = [r.to_dict() for r in self.decode.rows]
        return d


# ----------------------------------------------------------------------------------------------
def _weight_formats(comp: CompressionSpec | None, device: Device, a: int,
                    warnings: list[str]) -> tuple[WeightFormat, WeightFormat]:
    """Formats of the decoder linears and of lm_head under ``comp`` on ``device``."""
    dense = WeightFormat(value_bits=8 * a)
    if comp is None or not comp.active:
        return dense, dense
    kw: dict[str, Any] = {"value_bits": 8 * a}
    if comp.weight_bits is not None:
        kw.update(value_bits=comp.weight_bits, group_size=comp.group_size, scale_bits=comp.scale_bits,
                  zero_bits=0 if comp.symmetric else comp.weight_bits, dequant_ops=comp.dequant_ops_per_weight)
    if comp.sparsity == "2:4":
        kw.update(sparsity="2:4", density=0.5, sparse_units=device.sparse_2_4.value)
        if not device.sparse_2_4.value:
            warnings.append(f"2:4 sparsity gives nothing on {device.name} (no sparse matrix units): "
                            "stored and multiplied dense")
    elif comp.sparsity is not None:
        kw.update(sparsity="unstructured", density=1.0 - float(comp.sparsity), sparse_format=comp.sparse_format)
        if comp.sparse_format == "dense":
            warnings.append("unstructured sparsity with sparse_format=dense: zeros are stored and multiplied, "
                            "no speedup (choose bitmask or csr to model a sparse format)")
    fmt = WeightFormat(**kw)
    head = WeightFormat(**{**kw, "sparsity": "none", "density": 1.0}) if comp.quantize_lm_head else dense
    return fmt, head


def _forward(shape: ModelShape, spec: RooflineSpec, new: int, ctx: int, logits_tokens: int, fmt: WeightFormat,
             head_fmt: WeightFormat, a: int) -> list[tuple[Op, int]]:
    batch, impl = spec.batch, spec.implementation
    m = batch * new
    phase = "prefill" if new > 1 else f"decode_{spec.kv_cache}"
    cache_len = spec.max_cache_len or spec.prompt + spec.generate
    if impl == "compress":  # our runtime: compiled, with our kernels (roofline_compress)
        ops: list[tuple[Op, int]] = [(op, 1) for op in embed_ops(shape, m, a, "fused", phase)]
        for ly, count in shape.layer_groups():
            ops += [(op, count) for op in rc.layer_ops(shape, ly, batch, new, ctx, fmt, a, a, spec.kv_cache, cache_len)]
        return ops + [(op, 1) for op in rc.head_ops(shape, m, batch * logits_tokens, head_fmt, a, batch)]
    ops = [(op, 1) for op in embed_ops(shape, m, a, impl, phase)]
    for ly, count in shape.layer_groups():
        ops += [(op, count) for op in layer_ops(shape, ly, batch, new, ctx, fmt, a, a, spec.kv_cache, impl, cache_len)]
    ops += [(op, 1) for op in head_ops(shape, m, batch * logits_tokens, head_fmt, a, impl, batch)]
    return ops


def _accumulate(rows: dict[str, OpRow], ops: list[tuple[Op, int]], device: Device, mm_key: str,
                scale: float, overhead: bool, prefill: bool) -> None:
    """Add the timed ops into ``rows`` (by name), each weighted by ``scale`` (1/G for decode).
    An op takes max(compute, memory) plus the fixed time of its kernels."""
    bw = device.achievable_bandwidth()
    mm, vec = device.achievable_flops(mm_key), device.achievable_flops("fp32", "vector")
    att = device.achievable_flops(mm_key, "attention")
    o = device.overhead
    per_row = o.per_weight_row_s.value if overhead else 0.0
    per_kernel = o.per_kernel_s.value if overhead else 0.0
    if prefill and overhead and o.prefill_per_kernel_s.value:
        per_kernel = o.prefill_per_kernel_s.value
    per_gemm = o.per_gemm_s.value if overhead else 0.0
    per_attention = (o.per_attention_s.value or per_kernel) if overhead else 0.0
    for op, count in ops:
        t_c = (op.flops / att if op.attention else op.matrix_flops / mm + op.vector_flops / vec) * 1e3
        op_bw = (device.kernel_bandwidth(op.kernel) if op.kernel
                 else device.op_bandwidth(op.kind) if op.unfused else bw)
        t_m = (op.bytes / op_bw + op.weight_rows * per_row) * 1e3
        t_f = (op.kernels * per_kernel + op.gemms * per_gemm + op.flash * per_attention) * 1e3
        if op.kernel and overhead:
            t_f += op.launches * device.kernel_fixed_s(op.kernel) * 1e3
        r = rows.setdefault(op.name, OpRow(op.name, 0))
        w = count * scale
        r.flops += op.flops * w
        r.weight_bytes += op.weight_bytes * w
        r.act_bytes += op.act_bytes * w
        r.kv_bytes += op.kv_bytes * w
        r.compute_ms += t_c * w
        r.memory_ms += t_m * w
        r.fixed_ms += t_f * w
        r.kernels += (op.kernels + op.gemms + op.flash + op.launches) * w
        r.ms += (max(t_c, t_m) + t_f) * w


def _count_rows(rows: dict[str, OpRow], ops: list[tuple[Op, int]]) -> list[OpRow]:
    counts: dict[str, int] = {}
    for op, count in ops:
        counts[op.name] = counts.get(op.name, 0) + count
    for name, r in rows.items():
        r.count = counts[name]
    return list(rows.values())


def _overhead_ms(device: Device, shape: ModelShape, on: bool) -> float:
    if not on:
        return 0.0
    o = device.overhead
    return (o.per_forward_s.value + len(shape.layers) * o.per_layer_s.value) * 1e3


def _host_ms(device: Device, shape: ModelShape, spec: RooflineSpec, warnings: list[str]) -> float:
    """The host's time per eager forward (0 under a CUDA graph or without overheads)."""
    if spec.execution != "eager" or not spec.overhead:
        return 0.0
    h = device.host_overhead
    if h is None:
        if device.kind == "gpu":
            warnings.append(f"{device.name} has no measured host_overhead: the eager estimate leaves out the "
                            "host's launch time (often the larger part of an eager decode step on GPUs)")
        return 0.0
    return (h.per_forward_s.value + len(shape.layers) * h.per_layer_s.value) * 1e3


def _estimate_one(shape: ModelShape, name: str, spec: RooflineSpec, device: Device,
                  comp: CompressionSpec | None) -> RooflineResult:
    mm_key, a = DTYPES[spec.dtype]
    device.peak(mm_key)  # fail early, naming the dtypes the device has
    warnings: list[str] = []
    fmt, head_fmt = _weight_formats(comp, device, a, warnings)
    p, g, b = spec.prompt, spec.generate, spec.batch
    overhead = _overhead_ms(device, shape, spec.overhead)
    host = _host_ms(device, shape, spec, warnings)
    if device.kind == "gpu" and spec.overhead and spec.implementation == "compress":
        missing = rc.missing_terms(device)
        if missing:
            warnings.append(missing)
    if device.kind == "gpu" and spec.overhead and spec.implementation == "transformers" \
            and not device.overhead.per_kernel_s.value:
        warnings.append(f"{device.name} has no measured per-kernel costs: the estimate leaves out kernel launch "
                        "and ramp-up time (on the H100 over half of a 1B model's transformers decode step)")

    logits = p if spec.prefill_logits == "all" else 1
    pre_ops = _forward(shape, spec, p, p, logits, fmt, head_fmt, a)
    pre_rows: dict[str, OpRow] = {}
    _accumulate(pre_rows, pre_ops, device, mm_key, 1.0, spec.overhead, prefill=True)
    prefill = Phase(_count_rows(pre_rows, pre_ops), overhead, host)

    dec_rows: dict[str, OpRow] = {}
    dec_ops: list[tuple[Op, int]] = []
    for i in range(g):  # step i feeds the token at position p+i and attends to p+i+1 keys
        dec_ops = _forward(shape, spec, 1, p + i + 1, 1, fmt, head_fmt, a)
        _accumulate(dec_rows, dec_ops, device, mm_key, 1.0 / g, spec.overhead, prefill=False)
    decode = Phase(_count_rows(dec_rows, dec_ops), overhead, host)

    act = max(op.act_bytes for op, _ in pre_ops)
    res = RooflineResult(
        model=name, device=device, spec=spec, compression=comp, params=count_params(shape),
        prefill=prefill, decode=decode,
        weights_bytes=model_weight_bytes(shape, fmt, head_fmt, a),
        kv_bytes=kv_cache_bytes(shape, b, p + g, a), act_bytes=act, warnings=warnings,
    )
    if res.memory_gb * 1e9 > device.memory_capacity.value:
        res.warnings.append(f"needs {res.memory_gb:.1f} GB but {device.name} has "
                            f"{device.memory_capacity.value / 1e9:.0f} GB")
    return res


def _validated(cls: type[_Strict], value: Any, what: str) -> Any:
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        lines = "; ".join(f"{what}.{'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())
        raise ConfigError(lines) from None


def estimate(config: str | Path | dict[str, Any] | Any,
             spec_or_kwargs: RooflineSpec | dict[str, Any] | None = None,
             compression: CompressionSpec | dict[str, Any] | None = None,
             baseline_config: str | Path | dict[str, Any] | Any | None = None) -> RooflineResult:
    """Estimate latency and memory of ``config`` (built-in name, model folder, config.json, dict, hub
    id or PretrainedConfig) for ``spec``; with ``compression``, also the uncompressed baseline and the
    speedups. ``baseline_config`` (same forms as ``config``): the baseline is that model, uncompressed,
    e.g. the original of a structurally pruned ``config``; it is also estimated when no compression is
    active but the shapes differ. Raises ConfigError for bad settings and CompressError for unknown
    devices/models."""
    spec = _validated(RooflineSpec, spec_or_kwargs or {}, "roofline")
    comp = _validated(CompressionSpec, compression, "compression")
    if comp is not None and not comp.active:
        comp = None
    cfg, name = load_model_config(config)
    shape = model_shape(cfg, name)
    base_shape, base_name = shape, name
    if baseline_config is not None:
        base_cfg, base_name = load_model_config(baseline_config)
        base_shape = model_shape(base_cfg, base_name)
    device = load_device(spec.device, spec.device_files)
    res = _estimate_one(shape, name, spec, device, comp)
    # the names may differ (a saved copy of the same model): compare the geometry only
    if comp is not None or replace(base_shape, name=name) != shape:
        res.baseline = _estimate_one(base_shape, base_name, spec, device, None)
    return res


# ----------------------------------------------------------------------------------------------
def _fmt(x: float, unit: str = "") -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{p}{unit}"
    return f"{x:.0f}{unit}"


def _op_table(title: str, phase: Phase) -> list[str]:
    lines = [title, f"  {'op':<16}{'n':>4}{'FLOP':>10}{'bytes':>10}{'weights':>10}{'kv':>10}{'FLOP/B':>8}"
             f"{'bound':>9}{'ms':>10}{'share':>7}"]
    total = phase.ms or 1.0
    for r in sorted(phase.rows, key=lambda r: -r.ms):
        ai = f"{r.intensity:.1f}" if math.isfinite(r.intensity) else "-"
        lines.append(f"  {r.name:<16}{r.count:>4}{_fmt(r.flops):>10}{_fmt(r.bytes, 'B'):>10}"
                     f"{_fmt(r.weight_bytes, 'B'):>10}{_fmt(r.kv_bytes, 'B'):>10}{ai:>8}{r.bound:>9}"
                     f"{r.ms:>10.3f}{100 * r.ms / total:>6.1f}%")
    if phase.overhead_ms:
        lines.append(f"  {'overhead':<16}{'':>4}{'':>10}{'':>10}{'':>10}{'':>10}{'':>8}{'fixed':>9}"
                     f"{phase.overhead_ms:>10.3f}{100 * phase.overhead_ms / total:>6.1f}%")
    fixed = sum(r.fixed_ms for r in phase.rows)
    if fixed:
        lines.append(f"  (of which fixed per-kernel time: {fixed:.3f} ms over {phase.kernels:.0f} kernels)")
    if phase.host_ms > phase.device_ms:
        lines.append(f"  host-bound (eager): the host needs {phase.host_ms:.3f} ms per forward, the device "
                     f"{phase.device_ms:.3f} ms")
    return lines


def format_table(res: RooflineResult, per_op: bool = False) -> str:
    """Human-readable totals (always) and per-operator tables (``per_op``)."""
    d, s = res.to_dict(per_op=False), res.spec
    dev = res.device
    lines = [
        f"roofline: {res.model} ({res.params / 1e9:.3f} B params) on {dev.title} [{dev.name}]",
        f"  {s.dtype}, batch {s.batch}, prompt {s.prompt}, generate {s.generate}, kv_cache {s.kv_cache}, "
        f"{s.implementation} kernels, {s.execution} execution; "
        f"bandwidth {dev.memory_bandwidth.value / 1e9:.0f} GB/s x {dev.achievable.memory.value:.2f}, "
        f"{DTYPES[s.dtype][0]} peak {dev.peak(DTYPES[s.dtype][0]) / 1e12:.1f} TFLOP/s "
        f"x {dev.achievable.compute.value:.2f}",
    ]
    if res.compression is not None:
        c = res.compression
        parts = [f"W{c.weight_bits} g{c.group_size}{' sym' if c.symmetric else ''}" if c.weight_bits else "",
                 f"sparsity {c.sparsity}" + (f" ({c.sparse_format})" if c.sparsity not in (None, "2:4") else "")
                 if c.sparsity is not None else ""]
        lines.append("  compression: " + ", ".join(p for p in parts if p))
    if per_op:
        lines += [""] + _op_table("prefill (one forward over the prompt)", res.prefill)
        lines += [""] + _op_table(f"decode (per token, averaged over {s.generate} steps)", res.decode)
        lines.append("")
    rows = [("prefill / time to first token", f"{res.prefill_ms:.3f} ms"),
            ("decode per token", f"{res.decode_ms_per_token:.3f} ms"),
            ("decode throughput", f"{d['decode_tokens_per_s']:.1f} tokens/s"),
            ("end to end", f"{d['e2e_ms']:.1f} ms ({d['e2e_tokens_per_s']:.1f} tokens/s)"),
            ("memory", f"{res.memory_gb:.3f} GB (weights {d['memory']['weights_gb']:.3f}, KV "
                       f"{d['memory']['kv_cache_gb']:.3f}, activations {d['memory']['activations_gb']:.3f}; "
                       f"device {d['memory']['capacity_gb']:.0f})")]
    if res.baseline is not None:
        if res.baseline.params != res.params:
            rows.append(("baseline", f"{res.baseline.model} ({res.baseline.params / 1e9:.3f} B params)"))
        rows += [("baseline decode / prefill", f"{res.baseline.decode_ms_per_token:.3f} ms / "
                                                f"{res.baseline.prefill_ms:.3f} ms"),
                 ("speedup decode / prefill", f"{d['speedup_decode']:.2f}x / {d['speedup_prefill']:.2f}x"),
                 ("memory vs baseline", f"{d['memory_ratio']:.2f}x")]
    lines += [f"  {k:<32}{v}" for k, v in rows]
    lines += [f"  warning: {w}" for w in res.warnings]
    return "\n".join(lines)
