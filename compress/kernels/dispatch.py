"""Install the fastest available forward on every ``QuantizedLinear`` of a model.

``accelerate(model, backend="auto")`` repacks each layer's buffers once for a kernel and installs it
with ``QuantizedLinear.set_backend``. Paths, as the report names them:

- ``cuda``: the W4A16 CUDA kernel (``cuda_w4a16``; 1..16 rows; above, ``large_m``: the W4A16 GEMM
  ``triton_gemm`` or dequantize + cuBLAS), for
  layers on a CUDA device that it can run (see ``triton_w4a16.repack``); fp16/bf16 activations.
- ``triton``: the W4A16 Triton kernels (``triton_w4a16``), the other GPU layers; fp16/bf16
  activations. On both GPU paths other activation dtypes run the dequantize fallback for that call.
- ``cpu-int4``: an INT4 kernel for layers on the CPU: our C kernel (``cpu_native``, fp32 arithmetic,
  compiled for this CPU on first use; it also takes 5- to 8-bit codes) where it builds, else torch's int4 kernel (``cpu_int4``, bf16
  arithmetic); ``cpu_kernel`` picks one explicitly. From a threshold of activation rows on (prefill)
  the layer is dequantized for that call and multiplied densely (faster there than either kernel):
  in bf16 where the CPU multiplies bf16 natively (AMX, AVX512-BF16; ``cpu_prefill="auto"``), else in
  float32 (exact).
- ``dequant-fallback``: no kernel installed; the layer's own forward dequantizes its weight and
  calls ``F.linear`` (always correct, slow, no memory saved at run time).

``backend``: ``triton`` asks for the GPU W4A16 path (each layer then runs ``cuda`` or ``triton``),
``cpu-int4`` for the CPU kernel, ``auto`` for whichever fits the layer's device, ``dequant`` for
none. A named backend that cannot serve a layer falls back for that layer. Every path that ran is
logged as a WARNING naming it and the reason, and the returned ``AccelerationReport`` lists it per
layer.

On the GPU paths and the C kernel's CPU path the packed words hold the codes, so the layer's uint8
``qweight`` (1 byte per weight) is released (``QuantizedLinear.release_codes``). Whatever reads
``qweight`` later gets it back, rebuilt exactly, on first access and keeps it: the dequantize
forward (``set_backend(None)``, e.g. a reference check), ``dequantize()`` (``compress bench``
densifying for its baseline), checkpoint writers and ``state_dict()``, and another ``accelerate``
call.

Note: the packed copies live in the installed closure, not in the module's buffers: call
``accelerate`` after the model is on its final device, and again after moving it (released codes do
not move with ``.to()``; they are restored on the packed copy's device).
"""
from __future__ import annotations

import importlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from compress.errors import ConfigError
from compress.kernels.cpu_backend import (  # noqa: F401  (the thresholds are public here too)
    CPU_BF16_DENSE_MIN_ROWS, CPU_DENSE_MIN_ROWS, CPU_KERNELS, CPU_NATIVE_DENSE_MIN_ROWS, CPU_PREFILL,
    cpu_layer as _cpu_layer, kernel_status as _cpu_kernel_status, prefill_dtype as _cpu_prefill_dtype)
from compress.nn.qlinear import QuantizedLinear

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu-int4", "dequant")
LARGE_M = ("auto", "dequant", "gemm", "triton")


@dataclass
class AccelerationReport:
    """Which path each quantized layer runs, and why (JSON-serializable via ``as_dict``)."""

    requested: str
    layers: dict[str, str] = field(default_factory=dict)  # name -> path
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why this path
    fused: list[list[str]] = field(default_factory=list)  # layers stacked into one launch
    #: decoder blocks whose norms, SiLU gate and residual adds run inside the kernels (fused_block)
    fused_blocks: int = 0
    fused_blocks_reason: str = ""

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.layers.values()))

    @property
    def paths(self) -> list[str]:
        return sorted(set(self.layers.values()))

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "counts": self.counts(), "layers": self.layers,
                "reasons": self.reasons, "fused": self.fused, "fused_blocks": self.fused_blocks,
                "fused_blocks_reason": self.fused_blocks_reason}


def _triton_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        importlib.import_module("compress.kernels.triton_w4a16")  # imports triton
    except ImportError as e:
        return False, f"Triton is not importable ({e})"
    return True, ""


def _triton_backend(mod: QuantizedLinear, large_m: str, width: int, pdl: bool = True
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    from compress.kernels import triton_w4a16 as tw

    wt = tw.repack(mod.qweight, mod.scales, mod.zeros, mod.g_idx, mod.bits, mod.symmetric,
                   mod.bias, mod.qweight.device, width=width, pdl=pdl)
    wt.large_m = large_m
    warned = []
    from compress.kernels import ops

    handle = ops.register(wt)  # for torch.compile: the kernel as an opaque custom op
    # act-order on the CUDA kernel: under compile the gather is a graph op (ops.py says why)
    graph_perm = wt.perm.long() if wt.perm is not None and wt.kernel == "cuda" else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda:
            if torch.compiler.is_compiling():
                if graph_perm is not None:
                    return torch.ops.compress.w4a16_linear(x.index_select(-1, graph_perm), handle,
                                                           wt.out_features, True)
                return torch.ops.compress.w4a16_linear(x, handle, wt.out_features)
            return tw.w4a16_matmul(x, wt)
        if not warned:
            log.warning("%s W4A16 kernel got %s activations on %s; this layer runs the "
                        "dequantize fallback for them", wt.kernel, x.dtype, x.device)
            warned.append(True)
        w = tw.dequantize_packed(wt, x.dtype).to(x.device)
        return nn.functional.linear(x, w, None if wt.bias is None else wt.bias.to(x.dtype))

    forward.packed = wt  # for tuning and inspection
    forward.restore_codes = wt.restore_codes  # this layer's uint8 codes, rebuilt from the words
    return forward


def _choose(mod: QuantizedLinear, backend: str, triton_ok: tuple[bool, str],
            cpu_ok: tuple[bool, str], native: tuple[bool, str]) -> tuple[str, str]:
    """(path to try, reason) for one layer."""
    on_cuda = mod.qweight.is_cuda
    if backend == "dequant":
        return "dequant-fallback", "requested"
    want = backend if backend != "auto" else ("triton" if on_cuda else "cpu-int4")
    if want == "triton":
        if not on_cuda:
            return "dequant-fallback", "triton needs the layer on a CUDA device"
        if not triton_ok[0]:
            return "dequant-fallback", triton_ok[1]
        return "triton", "GPU W4A16"  # renamed by the kernel the layer was packed for (_gpu_path)
    if on_cuda:
        return "dequant-fallback", "cpu-int4 needs the layer on the CPU"
    if not native[0] and not cpu_ok[0]:
        return "dequant-fallback", f"{cpu_ok[1]}; C kernel: {native[1]}"
    return "cpu-int4", "CPU INT4 kernel"  # the installed forward names which (cpu_backend.cpu_layer)


def _gpu_path(kernel: str, large_m: str) -> tuple[str, str]:
    """(path, reason) of a layer packed for ``W4A16Weight.kernel``, ``large_m`` as given to accelerate."""
    if kernel == "cuda":
        from compress.kernels import triton_gemm

        above = "dequantize + cuBLAS above"
        if large_m == "gemm":
            above = "the W4A16 GEMM (triton_gemm) above"
        elif large_m == "auto" and triton_gemm.AUTO_MAX_M > 16:
            above = f"the W4A16 GEMM (triton_gemm) for 17-{triton_gemm.AUTO_MAX_M} rows, {above}"
        return "cuda", f"W4A16 CUDA kernel (cuda_w4a16) for 1-16 rows, {above}; fp16/bf16 activations"
    return "triton", "W4A16 Triton kernel (the CUDA kernel cannot run this layer), fp16/bf16 activations"


def accelerate(model: nn.Module, backend: str = "auto", large_m: str = "auto",
               plane_width: int = 16, fuse: bool = True, pdl: bool = True,
               cpu_prefill: str = "auto", fuse_blocks: bool = True, cpu_kernel: str = "auto") -> AccelerationReport:
    """Repack every QuantizedLinear of ``model`` for the best available kernel and install it.

    ``backend``: one of BACKENDS. ``large_m``: path for more than 16 activation rows (prefill) on
    the GPU. Layers on the CUDA kernel: "gemm" (``triton_gemm``: codes unpacked in the GEMM's tiles),
    "dequant" (dequantize the layer + cuBLAS per call) or "auto" (the GEMM where it measured faster,
    ``triton_gemm.AUTO_MAX_M``). Layers on the Triton kernels: "triton" (its tensor-core kernel at
    BLOCK_M = 64), else dequantize + cuBLAS.
    ``plane_width`` (Triton path only): words per row and packed block, 16, 32 or 64 (docs/design/dispatch.md).
    ``fuse`` (GPU paths): stack the layers of a block that read the same input (q/k/v, gate/up; the
    adapter table's true-sequential groups) into one launch (``compress.kernels.fused``).
    ``pdl`` (CUDA kernel, sm_90+): programmatic dependent launch, so a kernel's weight copies start
    while the previous kernel finishes.
    ``fuse_blocks`` (with ``fuse``; CUDA kernel): in decoder blocks the adapter table describes as
    pre-norm RMSNorm + SiLU-gated MLP, the norms, SiLU(gate) * up and the residual adds run inside
    the four launches of the block (``compress.kernels.fused_block``).
    ``cpu_prefill`` (cpu-int4 path): arithmetic of the dense product that prefill-sized inputs take,
    "bf16" (activations and dequantized weights rounded to bf16, fp32 accumulation; fast on CPUs
    with AMX or AVX512-BF16), "fp32" (exact) or "auto" (bf16 where the CPU has native bf16 GEMMs).
    ``cpu_kernel`` (cpu-int4 path): "native" (our C kernel; ConfigError where it cannot be built),
    "torch" (torch's int4 kernel) or "auto" (the C kernel where it builds, else torch's).

    Example::

        report = accelerate(model)            # logs e.g. "224 quantized layer(s) run cuda (...)"
        report.counts()                       # {"cuda": 224}
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if large_m not in LARGE_M:
        raise ConfigError(f"large_m must be one of {', '.join(LARGE_M)}; got {large_m!r}")
    if plane_width not in (16, 32, 64):
        raise ConfigError(f"plane_width must be 16, 32 or 64; got {plane_width!r}")
    if cpu_prefill not in CPU_PREFILL:
        raise ConfigError(f"cpu_prefill must be one of {', '.join(CPU_PREFILL)}; got {cpu_prefill!r}")
    if cpu_kernel not in CPU_KERNELS:
        raise ConfigError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}; got {cpu_kernel!r}")
    from compress.kernels import cpu_int4

    triton_ok = _triton_status() if backend in ("auto", "triton") else (False, "not requested")
    cpu_ok = cpu_int4.available()
    mods = {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantizedLinear)}
    wants_cpu = backend in ("auto", "cpu-int4") and any(not m.qweight.is_cuda for m in mods.values())
    native = _cpu_kernel_status(cpu_kernel) if wants_cpu else (False, "not requested")
    scratch = None
    if native[0]:
        from compress.kernels import cpu_native

        scratch = cpu_native.Scratch()  # one dequantization buffer for all of this model's layers
    dense_dtype = _cpu_prefill_dtype(cpu_prefill)  # cpu-int4 layers' prefill arithmetic, asked once
    report = AccelerationReport(requested=backend)
    from compress.kernels import fused_block

    fused_block.uninstall(model)  # a previous call's fused blocks hold the layers it installed
    choice = {name: _choose(mod, backend, triton_ok, cpu_ok, native) for name, mod in mods.items()}
    done: set[str] = set()
    adapter, groups = None, {}
    if fuse:
        adapter = _known_adapter(model)
        if fuse_blocks and adapter is not None:
            report.fused_blocks_reason = fused_block.why_not(model, adapter) or ""
        glu = fuse_blocks and adapter is not None and not report.fused_blocks_reason
        for names in _fusion_groups(model, mods, adapter):
            if all(choice[n][0] == "triton" for n in names):
                interleave = glu and _is_gate_up(names, adapter)
                group = _install_fused(names, [mods[n] for n in names], large_m, plane_width, pdl, report,
                                       interleave)
                groups.update({n: group for n in names if group is not None})
                done.update(n for n in names if n in report.layers)
    for name, mod in mods.items():
        if name in done:
            continue
        path, reason = choice[name]
        try:
            if path == "triton":
                fn = _triton_backend(mod, large_m, plane_width, pdl)
                mod.set_backend(fn)
                path, reason = _gpu_path(fn.packed.kernel, large_m)
                # the packed words hold the codes: free the uint8 copy (see the module docstring)
                mod.release_codes(fn.restore_codes)
            elif path == "cpu-int4":
                fn = _cpu_layer(mod, dense_dtype, native, scratch)
                mod.set_backend(fn)
                if hasattr(fn, "restore_codes"):  # the C kernel's packed copy holds the codes
                    mod.release_codes(fn.restore_codes)
                reason = f"{fn.reason}; prefill-sized inputs: dequantize + dense {str(dense_dtype)[6:]} GEMM"
            else:
                mod.set_backend(None)
        except ValueError as e:  # the layer's grid is outside what the kernel handles
            path, reason = "dequant-fallback", f"{path} cannot run this layer: {e}"
            mod.set_backend(None)
        report.layers[name] = path
        report.reasons[name] = reason
    if fuse_blocks:
        _fuse_blocks(model, fuse, adapter, groups, mods, report)
    if torch.cuda.is_available() and any(p in ("cuda", "triton") for p in report.layers.values()):
        # A PDL launch reads its weights before waiting for the previous kernel: make sure the
        # repacking kernels have finished before any of them runs.
        torch.cuda.synchronize()
    _log_summary(report)
    return report


def _fuse_blocks(model: nn.Module, fuse: bool, adapter: Any, groups: dict[str, Any],
                 mods: dict[str, QuantizedLinear], report: AccelerationReport) -> None:
    """Install fused block forwards where every projection of a block is on the CUDA kernel
    (``fused_block.install``); the report says how many, or why none."""
    from compress.kernels import fused_block

    if report.fused_blocks_reason:  # fused_block.why_not said so before stacking
        return
    if not fuse or adapter is None:
        report.fused_blocks_reason = "fuse=False" if not fuse else "no adapter-table entry for this model"
        return
    forwards = {n: m._backend for n, m in mods.items() if getattr(m._backend, "packed", None) is not None}
    if groups:
        report.fused_blocks = fused_block.install(model, adapter, groups, forwards)
    if report.fused_blocks:
        log.warning("accelerate: %d decoder block(s) run their RMSNorms, SiLU gate and residual adds "
                    "inside the W4A16 kernels (fused_block)", report.fused_blocks)
    else:
        report.fused_blocks_reason = ("no block has all its projections stacked on the CUDA kernel "
                                      "(CPU path, Triton path or act-order layers)")


def _known_adapter(model: nn.Module) -> Any:
    """The model's adapter-table entry (None for models the table does not know)."""
    from compress.adapters import get_adapter
    from compress.errors import CompressError

    try:
        adapter = get_adapter(model)
    except CompressError:
        return None
    return None if adapter.generic else adapter


def _is_gate_up(names: list[str], adapter: Any) -> bool:
    return (len(names) == 2 and "gate" in adapter.mlp and names[0].endswith("." + adapter.mlp["gate"])
            and names[1].endswith("." + adapter.mlp["up"]))


def _fusion_groups(model: nn.Module, mods: dict[str, QuantizedLinear], adapter: Any) -> list[list[str]]:
    """Names of the quantized layers of each block that read the same input, from the adapter
    table (none for models it does not know: generic discovery gives one layer per group)."""
    if adapter is None:
        return []
    return [names for names in adapter.input_groups(model) if len(names) > 1 and all(n in mods for n in names)]


def _install_fused(names: list[str], mods: list[QuantizedLinear], large_m: str, width: int, pdl: bool,
                   report: AccelerationReport, interleave: bool = False) -> Any:
    """Stack ``mods`` into one packed layer and install member forwards; leaves ``report`` untouched
    (so the layers are accelerated one by one) when they cannot be stacked or packed. Returns the
    ``fused.FusedGroup`` (None when not stacked). ``interleave``: a gate/up pair for the SiLU-gate
    epilogue (``fused.stack``)."""
    from compress.kernels import fused

    why = fused.stackable(mods)
    interleave = interleave and fused.can_interleave(mods)
    if why is not None:
        log.info("accelerate: not fusing %s: %s", ", ".join(names), why)
        return None
    stacked, bounds = fused.stack(mods, interleave=interleave)
    try:
        fn = _triton_backend(stacked, large_m, width, pdl)
    except ValueError as e:
        log.info("accelerate: not fusing %s: %s", ", ".join(names), e)
        return None
    fn.packed.glu_interleaved = interleave
    group = fused.FusedGroup(fn, bounds, names, interleaved=interleave)
    path, reason = _gpu_path(fn.packed.kernel, large_m)
    short = ", ".join(n.rsplit(".", 1)[-1] for n in names)
    for i, (name, mod) in enumerate(zip(names, mods)):
        member = group.member(i, fn.packed)
        mod.set_backend(member)
        mod.release_codes(member.restore_codes)
        report.layers[name] = path
        report.reasons[name] = f"{reason}; one launch with {short}"
    report.fused.append(names)
    return group


def _log_summary(report: AccelerationReport) -> None:
    if not report.layers:
        log.warning("accelerate: the model has no QuantizedLinear layers; nothing installed")
        return
    groups = Counter((report.layers[n], report.reasons[n]) for n in report.layers)
    for (path, reason), count in sorted(groups.items()):
        log.warning("accelerate: %d quantized layer(s) run %s (%s)", count, path, reason)


def packed_weights(model: nn.Module) -> dict[str, Any]:
    """The repacked weight object of each accelerated layer (for tuning and benchmarks)."""
    out = {}
    for name, mod in model.named_modules():
        fn = getattr(mod, "_backend", None) if isinstance(mod, QuantizedLinear) else None
        if fn is not None and hasattr(fn, "packed"):
            out[name] = fn.packed
    return out


def tune_triton(model: nn.Module, batch_sizes: tuple[int, ...] = (1,)) -> dict[tuple, Any]:
    """Time the Triton configs once per distinct layer shape and share the winners (call before
    CUDA-graph capture: tuning synchronizes). Returns {(M, N, K): KernelConfig}.

    Layers with the same shape and grid share one ``configs`` dict, so tuning one tunes all."""
    from compress.kernels import triton_w4a16 as tw

    chosen: dict[tuple, Any] = {}
    shared: dict[tuple, dict] = {}
    for wt in packed_weights(model).values():
        if not isinstance(wt, tw.W4A16Weight):
            continue
        shape = (wt.out_features, wt.in_features, wt.group, wt.width, wt.zeros is None, wt.perm is not None)
        if shape not in shared:
            for m in batch_sizes:
                cfg, _ = tw.tune(wt, m)
                chosen[(m, wt.out_features, wt.in_features)] = cfg
            shared[shape] = wt.configs
        wt.configs = shared[shape]
    # The fused launches of fused blocks (other register and shared-memory needs: tuned on their own)
    from compress.kernels import fused_block

    tuned_fused: set[tuple] = set()
    for fl in fused_block.fused_linears(model):
        sig = (fl.key, id(fl.wt.configs))  # same-shaped layers share one configs dict (above)
        if sig in tuned_fused:
            continue
        tuned_fused.add(sig)
        for m in batch_sizes:
            chosen[(m, fl.wt.out_features, fl.wt.in_features, *fl.key)] = fl.tune(m)[0]
    return chosen
