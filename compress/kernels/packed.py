"""The repacked form of a quantized layer that the GPU kernels read (no Triton or CUDA needed to
hold or inspect one: packing, restoring and the plain-torch dequantize run anywhere, which is what
lets the CPU tests check everything around the kernels with real packed weights)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from compress.kernels import layout


@dataclass
class W4A16Weight:
    """A QuantizedLinear repacked for ``w4a16_matmul`` (all tensors on the GPU).

    ``kernel`` says which kernels read it and so which layout ``words`` has: "cuda"
    (``cuda_w4a16``, ``layout.pack_chunked``, width 1) or "triton" (``layout.pack_planar``)."""

    words: torch.Tensor  # int32 [N, Kp/8]
    scales: torch.Tensor  # [G, N]: fp16 (triton); the layer's fp16/bf16 dtype (cuda)
    zeros: torch.Tensor | None  # uint8 [G, N]; None when symmetric (z = 8)
    perm: torch.Tensor | None  # int32 [K] columns of x in group order; None when already in order
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    group: int  # columns per group after reordering (in_features for per-channel)
    width: int = layout.PLANE_WIDTH  # words per row and block; a block is 8 * width columns
    #: path for M > max_small_m: Triton weights "triton" (BLOCK_M = 64) or else dequantize + cuBLAS;
    #: CUDA weights "gemm" (``triton_gemm``), "dequant", or "auto" (the GEMM up to
    #: ``triton_gemm.AUTO_MAX_M`` rows, where it measured faster)
    large_m: str = "triton"
    max_small_m: int = 16
    configs: dict[Any, Any] = field(default_factory=dict)  # tuned config per M bucket (fused variants: per key)
    kernel: str = "triton"
    #: CUDA kernel only: launch with programmatic dependent launch (sm_90+; see cuda_w4a16.GRID_WAIT)
    pdl: bool = False
    #: a stacked gate/up layer whose rows alternate 8 gate rows and 8 up rows (``fused.stack(...,
    #: interleave=True)``), which the kernel's SiLU-gate epilogue needs
    glu_interleaved: bool = False
    #: CUDA kernel only: ``words`` in ``layout.tile_major`` order / ``scales`` and ``zeros`` in
    #: ``layout.tile_groups`` order (same shapes; a 16-row tile's bytes contiguous)
    codes_tiled: bool = False
    sz_tiled: bool = False
    #: CUDA kernel only: the weight copies carry an L2 evict-first policy (``bench/probes/layout_probe.py``)
    evict_first: bool = False
    _scales_as: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)
    #: CUDA kernel only: launch objects per (config, dtype, rows > 8, pdl); they hold this weight's
    #: data pointers, so a copy (``clone``) starts with none
    launchers: dict[tuple, Any] = field(default_factory=dict, repr=False)
    _in_group_order: "W4A16Weight | None" = field(default=None, repr=False)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.words.shape[1] // self.width

    def nbytes(self) -> int:
        """Bytes a matmul must read for the weight (codes + scales + zeros; padding not read)."""
        codes = self.out_features * self.in_features // 2
        return codes + sum(x.numel() * x.element_size() for x in (self.scales, self.zeros) if x is not None)

    def scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        """Scales in ``dtype`` (the CUDA kernel multiplies in the activation dtype), converted once.
        Call it outside CUDA-graph capture the first time (``tune`` and a warm-up call do)."""
        if self.scales.dtype == dtype:
            return self.scales
        if dtype not in self._scales_as:
            self._scales_as[dtype] = self.scales.to(dtype)
        return self._scales_as[dtype]

    def restore_codes(self, rows: slice | None = None) -> torch.Tensor:
        """The layer's uint8 codes [N, K] in the ORIGINAL column order, rebuilt exactly from the
        packed words (lets ``QuantizedLinear.release_codes`` free its copy); ``rows``: only those
        output rows (a stacked layer's member: each row's words are packed on their own)."""
        words = self.row_major_words()
        words = words if rows is None else words[rows]
        return layout.restore_codes(words, self.in_features, self.width, self.perm)

    def row_major_words(self) -> torch.Tensor:
        """``words`` with one row per output row (undoing ``layout.tile_major``)."""
        return layout.row_major(self.words) if self.codes_tiled else self.words

    def group_major(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``scales`` or ``zeros`` as plain [G, N] (undoing ``layout.tile_groups``)."""
        return layout.untile_groups(t) if t is not None and self.sz_tiled else t

    def in_group_order(self) -> "W4A16Weight":
        """This weight for activations already gathered into group order (``x[..., perm]``): the
        same tensors, tuned configs, converted scales and launch objects (the CUDA kernel never
        sees ``perm``: the gather is a launch of its own), no permutation. Made once."""
        if self.perm is None:
            return self
        if self._in_group_order is None:
            self._in_group_order = replace(self, perm=None, configs=self.configs, _scales_as=self._scales_as,
                                           launchers=self.launchers)
        return self._in_group_order

    def clone(self) -> "W4A16Weight":
        """A copy with its own tensors (benchmarks rotate copies so L2 does not hold the weight)."""
        c = replace(self, configs=self.configs, _scales_as={}, launchers={}, _in_group_order=None)
        for name in ("words", "scales", "zeros", "perm", "bias"):
            t = getattr(self, name)
            setattr(c, name, None if t is None else t.clone())
        for dtype in self._scales_as:
            c.scales_for(dtype)
        return c


def dequantize_packed(wt: W4A16Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype``, columns in the ORIGINAL order (plain torch ops; any device,
    any dtype; for activations the kernels do not take)."""
    codes = layout.unpack_planar(wt.row_major_words(), wt.in_features, wt.width).to(torch.float32)
    gidx = torch.arange(wt.in_features, device=codes.device) // wt.group
    z = 8.0 if wt.zeros is None else wt.group_major(wt.zeros).t().to(torch.float32)[:, gidx]
    w = (codes - z) * wt.group_major(wt.scales).t().to(torch.float32)[:, gidx]
    if wt.perm is not None:
        w = torch.empty_like(w).index_copy_(1, wt.perm.long(), w)
    return w.to(dtype)
