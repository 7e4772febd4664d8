"""One kernel launch for the quantized layers that read the same input (q/k/v, gate/up).

Why: at decode batch 1 every W4A16 launch pays a fixed cost of about 3 µs (graph node, pipeline
fill, final reduction; docs/design/cuda-w4a16.md) on top of its weight bytes, and a Llama block makes seven
of them. The adapter table already lists which linears of a block read the same input (its
true-sequential groups); stacking their codes along the output dimension makes one layer of
N = sum of the members' outputs, packed once.

The model keeps its modules (names, state_dict, checkpoint writers are unchanged): each member
``QuantizedLinear`` gets a forward (``FusedGroup.member``) that, when called, runs the stacked
layer once for that input and returns its own slice; the other members, called next with the
same input tensor, take their slices of that result without a launch. A member called with any
other tensor (or the same tensor modified in place, where torch tracks versions) runs the stacked
layer again, so the outputs are always those of the member's own weights. The slices are views of
one [.., N] output (last-dim slices; transformers reshapes them with ``view`` over the last
dimension, which views allow).

Works with CUDA graphs: the Python bookkeeping runs at capture, the launches are recorded once.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from compress.nn.qlinear import QuantizedLinear


def _version(x: torch.Tensor) -> int | None:
    # Inference-mode tensors keep no version counter: an in-place change between two members' calls
    # inside inference mode goes unseen (transformers' blocks pass one tensor to q, k and v and do
    # not change it). Asked first: reading ``_version`` of one raises, and the exception cost ~11 us
    # per member call, which eager decode paid 150 times per SmolLM2 token.
    return None if x.is_inference() else x._version


class FusedGroup:
    """A stacked layer ``fn`` (x -> [..., N_total]) shared by members owning output ranges ``bounds``
    (``interleaved``: two members whose rows alternate 8 by 8, see ``stack``)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], bounds: list[tuple[int, int]],
                 names: list[str], interleaved: bool = False):
        self.fn = fn
        self.bounds = bounds
        self.names = names
        self.interleaved = interleaved
        self._x: torch.Tensor | None = None
        self._ver: int | None = None
        self._outs: list[torch.Tensor] | None = None
        self._pending: set[int] = set()

    def _slices(self, x: torch.Tensor, i: int) -> torch.Tensor:
        # Under torch.compile the bookkeeping is traced (identity checks on traced tensors, the
        # attribute updates replayed after the graph); version counters are not traceable, and no
        # in-place change can slip between two members inside one compiled graph unseen by it.
        ver = None if torch.compiler.is_compiling() else _version(x)
        if self._x is not x or ver != self._ver or i not in self._pending:
            y = self.fn(x)
            if self.interleaved:  # member i's rows, in order (a copy)
                self._outs = [t.flatten(-2) for t in deinterleave(y)]
            else:
                self._outs = [y[..., a:b] for a, b in self.bounds]
            self._x, self._ver = x, ver
            self._pending = set(range(len(self.bounds)))
        self._pending.discard(i)
        out = self._outs[i]
        if not self._pending:  # every member has its slice: hold no tensors between calls
            self._x = self._outs = None
        return out

    def member(self, i: int, packed: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward to install on member ``i`` (``packed``: the stacked weight, for tuning; its
        ``restore_codes(rows)`` rebuilds those rows of the stacked layer's uint8 codes exactly)."""
        rows = member_rows(self.bounds, i, self.interleaved)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self._slices(x, i)

        forward.packed = packed
        forward.fused_with = self.names
        forward.restore_codes = lambda: packed.restore_codes(  # this member's rows only
            rows if isinstance(rows, slice) else rows.to(packed.words.device))
        return forward


def member_rows(bounds: list[tuple[int, int]], i: int, interleaved: bool) -> slice | torch.Tensor:
    """Rows of the stacked layer that belong to member ``i``."""
    a, b = bounds[i]
    if not interleaved:
        return slice(a, b)
    total = bounds[-1][1]
    return torch.arange(total).view(-1, 2, INTERLEAVE)[:, i, :].reshape(-1)


INTERLEAVE = 8  # rows of each member in turn when two members are interleaved (``stack``)


def deinterleave(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members' outputs from an interleaved stack's [.., N], as views [.., N/16, 8] (their
    ``flatten(-2)`` is each member's [.., N/2])."""
    pairs = y.unflatten(-1, (-1, 2, INTERLEAVE))
    return pairs[..., 0, :], pairs[..., 1, :]


def can_interleave(mods: list[QuantizedLinear]) -> bool:
    """Two layers of equal out_features, a multiple of ``INTERLEAVE`` (a gated MLP's gate and up)."""
    return (len(mods) == 2 and mods[0].out_features == mods[1].out_features
            and mods[0].out_features % INTERLEAVE == 0)


def stackable(mods: list[QuantizedLinear]) -> str | None:
    """Why these layers cannot be stacked into one (None when they can)."""
    first = mods[0]
    for m in mods[1:]:
        if m.in_features != first.in_features:
            return "different in_features"
        if (m.bits, m.group_size, m.symmetric) != (first.bits, first.group_size, first.symmetric):
            return "different quantization grids"
        if m.scales.dtype != first.scales.dtype or m.qweight.device != first.qweight.device:
            return "different scale dtypes or devices"
        if (m.bias is None) != (first.bias is None):
            return "bias on some members only"
        if not torch.equal(m.g_idx, first.g_idx):
            return "different act-order permutations"
    return None


def stack(mods: list[QuantizedLinear], interleave: bool = False
          ) -> tuple[QuantizedLinear, list[tuple[int, int]]]:
    """One QuantizedLinear whose output rows are the members' in order, and each member's range.

    ``interleave`` (two members of equal width, a multiple of 8: a gated MLP's gate and up): rows
    alternate 8 of the first member and 8 of the second instead, so that a 16-row tile of the CUDA
    kernel holds gate and up of the same 8 outputs (its SiLU-gate epilogue); ``bounds`` then still
    give the widths, ``member_rows`` the rows."""
    bounds, start = [], 0
    for m in mods:
        bounds.append((start, start + m.out_features))
        start += m.out_features
    if interleave and not can_interleave(mods):
        raise ValueError(f"interleaving needs two layers of equal out_features, a multiple of {INTERLEAVE}")
    first = mods[0]

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:  # along the output dimension (dim 0)
        t = torch.cat(ts)
        if interleave:
            t = t.view(2, -1, INTERLEAVE, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return t

    bias = None if first.bias is None else cat([m.bias.detach() for m in mods])
    stacked = QuantizedLinear.from_codes(
        cat([m.qweight for m in mods]), cat([m.scales for m in mods]),
        cat([m.zeros for m in mods]), first.g_idx, first.bits, first.group_size, first.symmetric,
        bias, first.act_order)
    return stacked, bounds
