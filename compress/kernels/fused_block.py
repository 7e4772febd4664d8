"""Decoder blocks whose RMSNorms, SiLU gate and residual adds run inside the W4A16 kernels.

Why: in a compiled decode step of a Llama-7B-shaped model, what INT4 does not shrink is a dozen
small kernels per block. Session 3's profile (docs/design/dispatch.md) puts about 18 us per block on the
small kernels besides our 4 matmuls and attention: two RMSNorms (each fused by Inductor with the
residual add before it, ~2.5 us), SiLU(gate) * up (~1.3 us), rotary and cache writes. Each kernel
pays its launch and ramp whatever its size. The CUDA kernel can do three of them on the side,
because each of its blocks reads all of K for its rows:

- ``norm``: the block reads the RMSNorm's *input* h, sums h^2 over K itself, multiplies h by the
  norm's weights as it loads them, and scales its results by 1 / rms (the q/k/v and gate/up
  launches);
- ``silu_mul``: with the gate and up rows interleaved 8 by 8 (``fused.stack(..., interleave=True)``),
  one lane holds gate and up of the same output and writes silu(gate) * up (the gate/up launch);
- ``residual``: the epilogue adds the block's residual (the o_proj and down_proj launches).

A fused block then runs 4 kernels of ours plus attention and rotary/cache work, instead of also
two norms and the SiLU kernel. ``install`` puts a forward on each decoder block that the adapter
table describes (``Adapter.decode_block``), built from the adapter's names: the block's own modules,
parameters and state_dict are unchanged, and its attention module still runs as transformers wrote
it (rotary, cache, the attention backend). Only the norms, the MLP's activation and the residual
adds move. Inputs the kernel does not take (more than 16 rows, other dtypes, CPU) run the same
arithmetic in torch (the norm module's own forward, dequantize + GEMM); under torch.compile those
ops are traced into the graph, where Inductor fuses them as it does without us.

Measured (H100, Llama-2-7B shape, compiled decode; docs/design/dispatch.md): 5.7 us less per block in an
8-layer A/B, 2.08 ms per token over 32 layers (2.87x over fp16; session 5's code: 2.26 ms, 2.64x,
on another lease). Inside our kernels the fusions cost 3-12% per launch, 2.8 us per block, which is
what 3x still needs.

Numerics against the unfused block: the kernel multiplies h by the norm's weight in the activation
dtype and scales by 1 / rms in float32 after the product (transformers rounds h / rms first); SiLU
and the residual add happen in float32 before one rounding (transformers rounds gate, up and the
projection output first). The differences are of the order of one fp16 rounding (tests check the
bounds).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

SILU_ACTS = ("silu", "swish")


def rms_norm_fp32(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm ``weight * h / sqrt(mean(h^2) + eps)`` in float32 (references and tuning)."""
    h = h.float()
    return weight.float() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def silu_mul_interleaved(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a stacked gate/up output whose columns alternate 8 gate and 8 up."""
    from compress.kernels.fused import deinterleave

    gate, up = deinterleave(y)
    return (nn.functional.silu(gate) * up).flatten(-2)


def key_label(key: tuple) -> str:
    """``tune_triton``'s key of a tuned config as text: "MxNxK", plus "+norm", "+silu", "+residual"
    for a fused launch (``FusedLinear.key`` follows M, N, K)."""
    m, n, k, *fused = key
    flags = zip(("norm", "silu", "residual"), fused[1:]) if fused else ()
    return f"{m}x{n}x{k}" + "".join(f"+{name}" for name, on in flags if on)


class FusedLinear:
    """One packed W4A16 weight (``packed.W4A16Weight``) and the fusions its launch makes.

    ``norm``: the RMSNorm module whose input this layer receives (its ``weight`` and epsilon go to
    the kernel; its own forward runs where the kernel does not); ``silu_mul``: the weight is an
    interleaved gate/up stack and the result is silu(gate) * up; ``residual``: calls pass the
    residual to add. Call it as ``fl(x)`` or ``fl(x, residual)``."""

    def __init__(self, wt: Any, norm: nn.Module | None = None, silu_mul: bool = False,
                 residual: bool = False):
        from compress.kernels import ops

        if silu_mul and not wt.glu_interleaved:
            raise ValueError("silu_mul needs a gate/up weight stacked with interleave=True")
        self.wt = wt
        self.norm = norm
        self.silu_mul = silu_mul
        self.residual = residual
        self.out_features = wt.out_features // 2 if silu_mul else wt.out_features
        if norm is not None and getattr(norm, "weight", None) is None:
            raise ValueError(f"{type(norm).__name__} has no weight (the kernel scales by it)")
        if norm is not None and norm.weight.shape != (wt.in_features,):
            raise ValueError(f"{type(norm).__name__}.weight has shape {tuple(norm.weight.shape)}, "
                             f"not [{wt.in_features}]")
        self.gamma = None if norm is None else norm.weight.detach().contiguous()
        self.eps = None if norm is None else float(norm_eps(norm))
        self.key = ("fused", norm is not None, silu_mul, residual)  # its tuned configs in wt.configs
        self.handle = ops.register(self)  # for torch.compile (ops.w4a16_fused)
        self.wt_handle = ops.register(wt)  # its plain product (ops.w4a16_linear), prefill under compile

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (residual is not None) != self.residual:
            raise ValueError("this fused layer was built " + ("with" if self.residual else "without")
                             + " a residual input")
        if torch.compiler.is_compiling():
            if x.is_cuda and x.numel() > self.wt.max_small_m * x.shape[-1]:
                # prefill-sized (static under compile): the unfused ops in the graph, so that
                # Inductor fuses the norm, SiLU gate and residual add as it does without us
                h = x if self.norm is None else self.norm(x)
                y = torch.ops.compress.w4a16_linear(h, self.wt_handle, self.wt.out_features)
                y = silu_mul_interleaved(y) if self.silu_mul else y
                return y if residual is None else y + residual
            return torch.ops.compress.w4a16_fused(x, self.handle, self.out_features, residual)
        return self.run(x, residual)

    def kernel_ok(self, x2d: torch.Tensor) -> bool:
        """Whether the CUDA kernel takes these activations (else ``reference`` runs)."""
        return (x2d.is_cuda and x2d.dtype in (torch.float16, torch.bfloat16) and x2d.shape[0] <= self.wt.max_small_m
                and self.wt.kernel == "cuda" and self.wt.perm is None
                and (self.gamma is None or self.gamma.dtype == x2d.dtype))

    def run(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        res2d = None if residual is None else residual.reshape(-1, self.wt.out_features)
        if self.kernel_ok(x2d):
            y = self.launch(x2d, res2d, self.config(x2d.shape[0]))
        else:
            y = self.reference(x2d, res2d)
        return y.reshape(*lead, self.out_features)

    def config(self, m: int) -> Any:
        from compress.kernels import cuda_w4a16
        from compress.kernels.triton_w4a16 import _bucket

        b = _bucket(m)
        return (self.wt.configs.get((*self.key, b)) or self.wt.configs.get(b)
                or cuda_w4a16.default_config(m, self.wt.out_features, tiled=self.wt.codes_tiled))

    def launch(self, x2d: torch.Tensor, res2d: torch.Tensor | None, cfg: Any, wt: Any = None) -> torch.Tensor:
        from compress.kernels import cuda_w4a16

        if res2d is not None and res2d.stride(1) != 1:
            res2d = res2d.contiguous()
        return cuda_w4a16.matmul(x2d, wt or self.wt, cfg, norm=None if self.gamma is None else (self.gamma, self.eps),
                                 silu_mul=self.silu_mul, residual=res2d)

    def reference(self, x2d: torch.Tensor, res2d: torch.Tensor | None) -> torch.Tensor:
        """The same function in torch, as the unfused block computes it (large M, other dtypes, CPU)."""
        from compress.kernels.packed import dequantize_packed

        if self.norm is not None:
            x2d = self.norm(x2d)
        if x2d.is_cuda and x2d.dtype in (torch.float16, torch.bfloat16):
            from compress.kernels import triton_w4a16 as tw

            y = tw.w4a16_matmul(x2d, self.wt)
        else:
            w = dequantize_packed(self.wt, x2d.dtype).to(x2d.device)
            y = nn.functional.linear(x2d, w, None if self.wt.bias is None else self.wt.bias.to(x2d.dtype))
        if self.silu_mul:
            y = silu_mul_interleaved(y)
        return y if res2d is None else y + res2d

    def reference_fp32(self, x2d: torch.Tensor, res2d: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 reference of the fused function (tuning and tests)."""
        from compress.kernels.packed import dequantize_packed

        x = x2d.float() if self.norm is None else rms_norm_fp32(x2d, self.gamma, self.eps)
        y = x @ dequantize_packed(self.wt, torch.float32).t().to(x.device)
        if self.wt.bias is not None:
            y = y + self.wt.bias.float()
        if self.silu_mul:
            y = silu_mul_interleaved(y)
        return y if res2d is None else y + res2d.float()

    def tune(self, m: int, dtype: torch.dtype | None = None) -> tuple[Any, list[dict[str, Any]]]:
        """Time the kernel's configs for this fused launch at M rows (``triton_w4a16.tune``: checked
        against ``reference_fp32``) and keep the best for it; returns (best, timed rows).
        ``dtype``: of the activations (default: the norm's, else fp16)."""
        from compress.kernels import triton_w4a16 as tw

        dtype = dtype or (torch.float16 if self.gamma is None else self.gamma.dtype)

        res = (torch.randn(m, self.wt.out_features, device=self.wt.words.device, dtype=dtype)
               if self.residual else None)
        return tw.tune(self.wt, m, dtype, run=lambda x, wt, cfg: self.launch(x, res, cfg, wt),
                       reference=lambda x: self.reference_fp32(x, res), key=(*self.key, tw._bucket(m)))


def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise ValueError(f"{type(norm).__name__} has no epsilon attribute (variance_epsilon / eps)")


class _Slot:
    """What the block forward hands to the projections inside its attention module: whether the
    next q/k/v launch normalizes its input, and the residual the o_proj launch adds. Set right
    before the attention call, consumed by it: a projection called from anywhere else finds it
    empty and computes its plain product."""

    def __init__(self) -> None:
        self.norm_next = False
        self.residual: torch.Tensor | None = None


class FusedBlock:
    """The pieces ``install`` puts on one decoder block (kept on it as ``_compress_fused``)."""

    def __init__(self, block: nn.Module, spec: Any, o_name: str, qkv_group: Any, o_fn: Callable, gate_up: Any,
                 down_fn: Callable):
        from compress.adapters import get_submodule

        self.original = block.forward  # the class's forward, for calls the fused one does not take
        self.slot = _Slot()
        self.attention = get_submodule(block, spec.attention)
        norm1 = get_submodule(block, spec.input_norm)
        norm2 = get_submodule(block, spec.post_attention_norm)
        self.qkv = FusedLinear(qkv_group.fn.packed, norm=norm1)
        self.o = FusedLinear(o_fn.packed, residual=True)
        self.gate_up = FusedLinear(gate_up.fn.packed, norm=norm2, silu_mul=True)
        self.down = FusedLinear(down_fn.packed, residual=True)
        self.linears = [self.qkv, self.o, self.gate_up, self.down]
        slot, plain_qkv, plain_o = self.slot, qkv_group.fn, o_fn

        def qkv_fn(x: torch.Tensor) -> torch.Tensor:  # the stacked q/k/v launch, norm inside when asked
            if slot.norm_next:
                slot.norm_next = False
                return self.qkv(x)
            return plain_qkv(x)
        qkv_fn.packed = plain_qkv.packed
        qkv_group.fn = qkv_fn

        def o_forward(x: torch.Tensor) -> torch.Tensor:
            res, slot.residual = slot.residual, None
            return plain_o(x) if res is None else self.o(x, res)
        o_forward.packed = plain_o.packed
        o_forward.restore_codes = plain_o.restore_codes
        get_submodule(block, o_name).set_backend(o_forward)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``h + attn(norm1(h))``, then ``+ down(silu(gate) * up)`` of its norm, in 4 of our launches."""
        if args:  # transformers passes everything but the hidden states by name; anything else: unfused
            return self.original(hidden_states, *args, **kwargs)
        self.slot.norm_next = True  # q/k/v normalize h themselves
        self.slot.residual = hidden_states  # o_proj adds it
        h = self.attention(hidden_states=hidden_states, **kwargs)[0]
        return self.down(self.gate_up(h), h)


def _returns_tensor(block: nn.Module) -> bool:
    """transformers >= 4.54 decoder layers return the hidden states alone (older ones a tuple)."""
    ann = inspect.signature(type(block).forward).return_annotation
    return ann is torch.Tensor or ann == "torch.Tensor"


def why_not(model: nn.Module, adapter: Any) -> str | None:
    """Why the blocks of ``model`` cannot be fused (None when they can)."""
    if adapter.decode_block is None or adapter.generic:
        return f"the adapter table does not describe {adapter.model_type} blocks as pre-norm RMSNorm + SiLU-gated MLP"
    act = getattr(model.config, "hidden_act", None)
    if act not in SILU_ACTS:
        return f"hidden_act is {act!r}, not SiLU"
    blocks = adapter.blocks(model)
    if len(blocks) and not _returns_tensor(blocks[0]):
        return "this transformers version's decoder layers return tuples (needs transformers >= 4.54)"
    return None


def install(model: nn.Module, adapter: Any, groups: dict[str, Any], forwards: dict[str, Callable]) -> int:
    """Put a fused forward on every block of ``model`` whose projections all run the CUDA kernel:
    ``groups`` maps a stacked layer's member names to its ``fused.FusedGroup`` (the gate/up one
    stacked with ``interleave=True``), ``forwards`` a layer name to its installed forward. Returns
    the number of blocks fused."""
    spec = adapter.decode_block
    done = 0
    for i, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_prefix(i)
        q = groups.get(f"{prefix}.{adapter.attn['q']}")
        gu = groups.get(f"{prefix}.{adapter.mlp['gate']}")
        o = forwards.get(f"{prefix}.{adapter.attn['o']}")
        down = forwards.get(f"{prefix}.{adapter.mlp['down']}")
        pieces = [q, gu, o, down]
        if any(p is None for p in pieces) or not gu.interleaved or set(q.names) != {
                f"{prefix}.{adapter.attn[k]}" for k in ("q", "k", "v")}:
            log.info("accelerate: block %d not fused (its projections are not all stacked on the CUDA kernel)", i)
            continue
        packed = [q.fn.packed, gu.fn.packed, o.packed, down.packed]
        if any(p.kernel != "cuda" or p.perm is not None for p in packed):
            log.info("accelerate: block %d not fused (act-order or Triton-path layers)", i)
            continue
        try:
            fb = FusedBlock(block, spec, adapter.attn["o"], q, o, gu, down)
        except ValueError as e:  # e.g. a norm module without the weight or epsilon the kernel needs
            log.info("accelerate: block %d not fused: %s", i, e)
            continue
        block._compress_fused = fb
        block.forward = fb.forward  # an instance attribute: the class and other instances keep theirs
        done += 1
    return done


def _fused_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "_compress_fused", None), FusedBlock)]


def fused_linears(model: nn.Module) -> list[FusedLinear]:
    """Every FusedLinear of the fused blocks of ``model`` (for tuning)."""
    return [fl for m in _fused_blocks(model) for fl in m._compress_fused.linears]


def uninstall(model: nn.Module) -> None:
    """Give every fused block its class's forward back (``accelerate`` calls it first)."""
    for m in _fused_blocks(model):
        del m._compress_fused
        m.__dict__.pop("forward", None)


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s blocks unfused inside the ``with`` (reference checks against the dequantize
    path, which swap the layers' forwards and must not go through the fused launches)."""
    saved = [(m, m.__dict__.pop("forward")) for m in _fused_blocks(model) if "forward" in m.__dict__]
    try:
        yield
    finally:
        for m, fwd in saved:
            m.forward = fwd
