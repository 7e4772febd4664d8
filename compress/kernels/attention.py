"""Our decode attention kernel as a transformers attention implementation (``decode_attention``).

transformers looks the attention function up by ``config._attn_implementation`` in its
``AttentionInterface`` (and the mask builder in ``AttentionMaskInterface``); registering a name
there is its documented way to add one. ``install`` registers "compress_decode" (the same function
each time: it runs our kernel only for attention modules ``install`` marked, SDPA for any other),
switches the model from "sdpa" to it and marks the model's attention modules, which the adapter
table names (the parent of the q or qkv projection). Masks are built as for SDPA. ``uninstall``
switches back.

The fp16 baseline of a speed comparison gets the same attention (``compress bench`` and
``bench/speed/e2e_decode.py --attn compress`` install it on both models), so that a speedup credited to
INT4 is not the attention kernel's.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.kernels.decode_attention import NAME, DecodeAttention, unsupported_reason

log = logging.getLogger(__name__)

_MARK = "_compress_decode_attention"  # attribute holding the DecodeAttention on a marked module


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: our kernel for one-token decode on marked
    modules, ``sdpa_attention_forward`` otherwise (prefill, dropout, softcap, attention sinks,
    position biases, CPU)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    da = getattr(module, _MARK, None)
    plain = (da is None or dropout or query.shape[2] != 1 or not query.is_cuda
             or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))
             or kwargs.get("output_attentions"))
    if not plain:
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if torch.compiler.is_compiling():
            return torch.ops.compress.decode_attention(query, key, value, attention_mask, scale, da.handle), None
        if unsupported_reason(query, key, value, attention_mask) is None:
            return da(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder block, by the adapter table (the q/qkv projection's parent)."""
    from compress.adapters import get_adapter, get_submodule

    adapter = get_adapter(model)
    proj = adapter.attn.get("q") or adapter.attn.get("qkv")
    if not proj or "." not in proj:
        return []
    parent = proj.rsplit(".", 1)[0]
    return [get_submodule(block, parent) for block in adapter.blocks(model)]


def why_not(model: nn.Module) -> str | None:
    """Why ``install`` would leave ``model`` as it is (None when it would install)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", NAME):
        return f"the model's attention implementation is {impl!r} (installs over 'sdpa' only)"
    return registry_or_modules_problem(model)


def registry_or_modules_problem(model: nn.Module) -> str | None:
    """What keeps any attention replacement off ``model`` whatever its implementation: a transformers
    without the attention registry, or a model the adapter table names no attention modules for."""
    try:
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
        from transformers.modeling_utils import AttentionInterface  # noqa: F401
    except ImportError as e:
        return f"this transformers has no attention registry ({e})"
    try:
        mods = attention_modules(model)
    except Exception as e:  # noqa: BLE001 - a model the adapter table cannot describe
        return f"no adapter for this model ({e})"
    if not mods:
        return "the adapter table names no attention projections for this model"
    return None


def install(model: nn.Module, pdl: bool = True, config: Any = None) -> int:
    """Run ``model``'s decode attention on our kernel; returns the number of attention modules
    marked (0, with the reason logged, when ``why_not`` objects). ``config``: a
    ``decode_attention.Config`` (default: ``decode_attention.choose_config`` by cache length)."""
    reason = why_not(model)
    if reason:
        log.info("decode attention not installed: %s", reason)
        return 0
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    da = DecodeAttention(pdl=pdl) if config is None else DecodeAttention(config, pdl=pdl)
    mods = attention_modules(model)
    for m in mods:
        setattr(m, _MARK, da)
    model.config._attn_implementation = NAME
    return len(mods)


def installed(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def uninstall(model: nn.Module) -> None:
    """Back to transformers' SDPA attention."""
    for m in model.modules():
        if hasattr(m, _MARK):
            delattr(m, _MARK)
    if installed(model):
        model.config._attn_implementation = "sdpa"
