"""A span policy on a transformers model: prefill dense, decode over the policy's blocks.

``install(model, spec)`` registers the attention implementation "compress_span" in transformers'
``AttentionInterface`` (its documented way to add one), switches the model to it and marks the
attention module of every decoder block (found through the adapter table, as
``compress.kernels.attention`` does) with the shared ``SpanState`` and its layer number.

- Prefill (several query positions) runs transformers' SDPA function unchanged and records what the
  policy needs later: per-block key minimum/maximum (quest) and the observation window's votes
  (snapkv).
- Decode (one query position) with a cache longer than the budget reads only the selected blocks:
  the Triton kernel on CUDA where Triton is importable, else the gather + SDPA path.
- ``SpanState.scoring_prefix = P`` makes a full-sequence forward score positions ``>= P`` as if
  each were decoded under the policy after a dense prefill of the first P positions (the mask a
  token-by-token decode would use, in one forward): long-window perplexity with the policy applied.

The KV cache must be transformers' DynamicCache (keys hold exactly the filled positions), the
default of ``generate`` and of ``compress.eval.latency``. ``uninstall`` restores SDPA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.attention_span import policies as P
from compress.attention_span.config import SpanSpec
from compress.attention_span.decode import span_decode_attention
from compress.errors import CompressError

log = logging.getLogger(__name__)

NAME = "compress_span"
_MARK = "_compress_span"  # (SpanState, layer number) on a marked attention module


@dataclass
class LayerStats:
    """What prefill recorded for one layer."""
    length: int = 0  # positions the statistics cover
    kmin: torch.Tensor | None = None  # quest: [B, Hkv, full blocks, D]
    kmax: torch.Tensor | None = None
    votes: torch.Tensor | None = None  # snapkv: [B, Hkv, prompt blocks]


@dataclass
class SpanState:
    """The policy and its per-layer statistics, shared by a model's attention modules."""
    spec: SpanSpec
    layers: dict[int, LayerStats] = field(default_factory=dict)
    #: bool [blocks]: scaffold blocks (kept always); set by a caller that knows the prompt's structure
    scaffold: torch.Tensor | None = None
    #: not None: full-sequence forwards score positions >= this under the policy (perplexity)
    scoring_prefix: int | None = None
    #: counters over decode calls: positions read against positions cached (per layer and KV head)
    read_positions: int = 0
    cached_positions: int = 0
    decode_calls: int = 0
    kernel: str = "dense"  # the path the last decode call took
    #: record the statistics of every policy at prefill, not only this one's
    record_all: bool = False

    def with_spec(self, spec: SpanSpec) -> "SpanState":
        """A state for ``spec`` over copies of this one's prefill statistics (so that several
        policies can decode from one prefill that recorded them all, ``record_all``)."""
        from dataclasses import replace

        same = ("block_size", "observation_window", "pool_kernel")
        if any(getattr(spec, f) != getattr(self.spec, f) for f in same):
            raise CompressError(f"attention_span: policies decoding from one prefill must share {', '.join(same)}")
        return SpanState(spec, layers={i: replace(st) for i, st in self.layers.items()}, scaffold=self.scaffold)

    def reset(self) -> None:
        self.layers.clear()
        self.read_positions = self.cached_positions = self.decode_calls = 0

    @property
    def read_fraction(self) -> float:
        return self.read_positions / self.cached_positions if self.cached_positions else 1.0

    # --- prefill --------------------------------------------------------------------------
    def record_prefill(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        s, length = self.spec, key.shape[2]
        st = self.layers[layer] = LayerStats(length=length)
        if s.policy == "quest" or self.record_all:
            full = length // s.block_size * s.block_size
            st.kmin, st.kmax = P.block_minmax(key, s.block_size, full)
        if s.policy == "snapkv" or self.record_all:
            w = min(s.observation_window, query.shape[2])
            st.votes = P.snapkv_scores(query[:, :, -w:], key, scaling, s.block_size, s.pool_kernel)

    # --- decode ---------------------------------------------------------------------------
    def _quest_minmax(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block min/max over the completed blocks, extended as blocks complete."""
        st = self._stats(layer)
        bs = self.spec.block_size
        done = st.kmin.shape[2]
        full = key.shape[2] // bs
        if full > done:
            lo, hi = P.block_minmax(key[:, :, done * bs: full * bs], bs)
            st.kmin, st.kmax = torch.cat([st.kmin, lo], 2), torch.cat([st.kmax, hi], 2)
        return st.kmin, st.kmax

    def _stats(self, layer: int) -> LayerStats:
        st = self.layers.get(layer)
        if st is None:
            raise CompressError(f"attention_span.policy: {self.spec.policy!r} needs prefill statistics for layer "
                                f"{layer}, but this cache was not filled by a prefill of the model with the policy "
                                "installed; run the prompt through the model after install()")
        return st

    def block_ids(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, max_blocks] for a decode step of ``layer`` (query [B, H, 1, D], key [B, Hkv, L, D])."""
        s = self.spec
        b, hk, length = key.shape[0], key.shape[1], key.shape[2]
        nb = P.num_blocks(length, s.block_size)
        forced = P.forced_blocks(length, s.block_size, s.sink_tokens, s.recent_tokens, self.scaffold)
        if s.policy == "window":
            scores = P.window_scores(b, hk, nb, key.device)
        elif s.policy == "quest":
            lo, hi = self._quest_minmax(layer, key)
            scores = F.pad(P.quest_scores(query[:, :, 0], lo, hi), (0, nb - lo.shape[2]))  # partial block: forced
        elif s.policy == "snapkv":
            scores = P.snapkv_decode_scores(self._stats(layer).votes, nb)
        else:
            raise CompressError("attention_span.policy: 'trained' selects spans from the model's own span "
                                "references, which this model does not emit")
        return P.select_blocks(scores, forced, s.max_blocks)

    # --- scoring: every position past the prefix as a decode step -------------------------
    def span_mask(self, query: torch.Tensor, key: torch.Tensor, start: int, stop: int, prefix: int,
                  scaling: float) -> torch.Tensor:
        """Bool [B, Hkv, stop - start, L]: what query positions ``start..stop-1`` (all >= ``prefix``)
        read when decoded one by one under the policy after a dense prefill of ``prefix`` positions."""
        s = self.spec
        b, hk, length, d = key.shape
        bs, nb, n = s.block_size, P.num_blocks(key.shape[2], s.block_size), stop - start
        t = torch.arange(start, stop, device=key.device)
        cur = t // bs  # the block of each query position; blocks after it do not exist yet
        blk = torch.arange(nb, device=key.device)
        future = blk[None, :] > cur[:, None]  # [n, nb]
        forced = self._forced_rows(t, nb, key.device)
        if s.policy == "window":
            scores = blk.float().expand(b, hk, n, nb).clone()
        elif s.policy == "quest":
            lo, hi = P.block_minmax(key, bs, length // bs * bs)
            lo, hi = F.pad(lo, (0, 0, 0, nb - lo.shape[2])), F.pad(hi, (0, 0, 0, nb - hi.shape[2]))
            h = query.shape[1]
            q = query[:, :, start:stop].float().view(b, hk, h // hk, n, d)
            sc = q.clamp(min=0) @ hi.unsqueeze(2).transpose(-1, -2) + q.clamp(max=0) @ lo.unsqueeze(2).transpose(-1, -2)
            scores = sc.amax(2)  # [B, Hkv, n, nb]; blocks not yet complete are forced or in the future
        elif s.policy == "snapkv":
            w = min(s.observation_window, prefix)
            votes = P.snapkv_scores(query[:, :, prefix - w: prefix], key[:, :, :prefix], scaling, bs, s.pool_kernel)
            scores = P.snapkv_decode_scores(votes, nb).unsqueeze(2).expand(b, hk, n, nb).clone()
        else:
            raise CompressError("attention_span.policy: 'trained' cannot score text without span references")
        scores = scores.masked_fill(future, P.NEG)
        ids = P.select_blocks(scores.reshape(b, hk * n, nb), forced.repeat(hk, 1).unsqueeze(0), s.max_blocks)
        keep = P.block_token_mask(ids, bs, length).view(b, hk, n, length)
        return keep & (torch.arange(length, device=key.device)[None, :] <= t[:, None])

    def _forced_rows(self, t: torch.Tensor, nb: int, device: torch.device) -> torch.Tensor:
        """Bool [n, nb]: forced blocks for cache lengths ``t + 1`` (vectorised ``forced_blocks``)."""
        s = self.spec
        blk = torch.arange(nb, device=device)
        sink = blk < P.num_blocks(s.sink_tokens, s.block_size)
        first_recent = (t + 1 - max(s.recent_tokens, 1)).clamp(min=0) // s.block_size
        keep = sink[None, :] | (blk[None, :] >= first_recent[:, None])
        if self.scaffold is not None:
            sc = torch.zeros(nb, dtype=torch.bool, device=device)
            m = min(nb, self.scaffold.numel())
            sc[:m] = self.scaffold[:m].to(device)
            keep = keep | sc[None, :]
        return keep & (blk[None, :] <= (t // s.block_size)[:, None])  # blocks that exist at length t + 1


def _score_forward(state: SpanState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scaling: float, chunk: int = 512) -> torch.Tensor:
    """Causal attention with positions >= prefix under the policy's decode mask: [B, T, H, D]."""
    b, h, n, d = query.shape
    hk = key.shape[1]
    g = h // hk
    prefix = state.scoring_prefix
    if key.shape[2] != n:
        raise CompressError("span scoring needs a forward without a KV cache (use_cache=False)")
    if not 0 < prefix < n:
        raise CompressError(f"span scoring prefix {prefix} must lie inside the window of {n} positions")
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    outs = [F.scaled_dot_product_attention(query[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix],
                                           is_causal=True, scale=scaling)]
    for start in range(prefix, n, chunk):
        stop = min(start + chunk, n)
        keep = state.span_mask(query, key, start, stop, prefix, scaling).repeat_interleave(g, 1)
        outs.append(F.scaled_dot_product_attention(query[:, :, start:stop], k, v, attn_mask=keep, scale=scaling))
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def _decode(state: SpanState, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    ids = state.block_ids(layer, query, key)
    if query.is_cuda:
        from compress.attention_span import triton_decode

        if triton_decode.available():
            state.kernel = "triton"
            return triton_decode.span_decode(query, key, value, ids, state.spec.block_size, scaling, mask)
    state.kernel = "gather"
    return span_decode_attention(query, key, value, ids, state.spec.block_size, scaling, mask)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (query [B, H, n, D], key/value [B, Hkv, L, D])."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mark = getattr(module, _MARK, None)
    unusual = dropout or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    if mark is None or unusual:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    state, layer = mark
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    n, length = query.shape[2], key.shape[2]
    if n > 1:
        if state.scoring_prefix is not None:
            return _score_forward(state, query, key, value, scale), None
        if length != n:
            raise CompressError("attention_span: a multi-token forward over an existing cache (chunked prefill or "
                                "speculative decoding) is not supported; prefill the whole prompt at once")
        state.record_prefill(layer, query, key, scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    state.cached_positions += length * key.shape[0] * key.shape[1]
    state.decode_calls += 1
    if length <= state.spec.budget_tokens:  # every block fits the budget: dense is the same function
        state.read_positions += length * key.shape[0] * key.shape[1]
        state.kernel = "dense"
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = _decode(state, layer, query, key, value, attention_mask, scale)
    state.read_positions += min(length, state.spec.budget_tokens) * key.shape[0] * key.shape[1]
    return out, None


def why_not(model: nn.Module) -> str | None:
    """Why ``install`` cannot put a span policy on ``model`` (None when it can)."""
    from compress.kernels.attention import registry_or_modules_problem

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in ("sdpa", "eager", NAME):
        return f"the model's attention implementation is {impl!r} (span attention replaces 'sdpa' or 'eager')"
    return registry_or_modules_problem(model)


def install(model: nn.Module, spec: SpanSpec) -> SpanState:
    """Put ``spec`` on ``model`` (in place); returns the shared state. Raises CompressError where the
    model cannot take it (``why_not``) or the policy needs what the model lacks."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from compress.kernels.attention import attention_modules

    reason = why_not(model)
    if reason:
        raise CompressError(f"attention_span: cannot install on this model: {reason}")
    if spec.policy == "trained":
        raise CompressError("attention_span.policy: 'trained' needs a model fine-tuned to emit span references "
                            "(span tokens in its vocabulary); this model has none. Use quest, window or snapkv")
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    state = SpanState(spec)
    for i, m in enumerate(attention_modules(model)):
        setattr(m, _MARK, (state, i))
    model.config._attn_implementation = NAME
    return state


def set_state(model: nn.Module, state: SpanState | None) -> None:
    """Point the marked attention modules of an installed model at ``state`` (None: plain SDPA,
    the dense baseline, on the same model and cache)."""
    from compress.kernels.attention import attention_modules

    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise CompressError("attention_span: set_state needs a model with install() applied")
    for i, m in enumerate(attention_modules(model)):
        if state is None:
            if hasattr(m, _MARK):
                delattr(m, _MARK)
        else:
            setattr(m, _MARK, (state, i))


def installed_state(model: nn.Module) -> SpanState | None:
    for m in model.modules():
        mark = getattr(m, _MARK, None)
        if mark is not None:
            return mark[0]
    return None


def uninstall(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, _MARK):
            delattr(m, _MARK)
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.config._attn_implementation = "sdpa"
