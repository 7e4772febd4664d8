"""The only place that knows model architectures.

An ``Adapter`` says where the decoder blocks are, which linear layers a block has in true-sequential
order (groups whose inputs are the same tensor are compressed together, each group after the previous
one was compressed), the attention/MLP geometry (for structural pruning and roofline), and the
architecture facts that FLOP/byte counting needs (``ArchFacts``: norm kind, gated MLP, biases, qk-norm,
positions, tied head; read by ``compress.eval.roofline_shapes``). Detection is by ``config.model_type``.
An architecture missing from the table falls back to generic discovery (the longest ``nn.ModuleList`` of
identical blocks that contain linear layers, linears in registration order) with a warning, or fails
with an error naming what to add.

torch is imported only where a model is walked, so that the roofline (pure arithmetic on a config)
can read this table without it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from compress.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchFacts:
    """What counting FLOPs and bytes from a config needs to know of an architecture family."""

    norm: Literal["rms", "layer"]
    mlp: Literal["gated", "plain"]
    #: vector FLOPs per intermediate element of the activation (silu(g)*u counts exp, add, div, mul)
    act_flops: float
    #: config key that switches q/k/v biases, and its default when absent (None: no switch)
    qkv_bias: tuple[str | None, bool]
    #: config keys that switch the output-projection and the MLP biases, and their defaults
    out_bias: tuple[str | None, bool]
    mlp_bias: tuple[str | None, bool]
    #: tie_word_embeddings when the config does not say
    tie_default: bool
    positions: Literal["rope", "learned"]
    #: RMSNorm over head_dim on q and k (Qwen3)
    qk_norm: bool = False
    #: parallel residual (GPT-NeoX): attention and MLP read the same input; counts are unchanged
    parallel_residual_key: str | None = None


@dataclass(frozen=True)
class DecodeBlock:
    """Names (relative to a decoder block) of a block computing
    ``h = h + attn(norm1(h)); h = h + down(silu(gate(norm2(h))) * up(norm2(h)))`` with RMSNorms
    ``weight * x / rms(x)`` (not Gemma's ``(1 + weight)``); the projections are the adapter's
    ``attn`` and ``mlp`` entries."""

    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"


@dataclass(frozen=True)
class Adapter:
    model_type: str
    #: dotted path from the CausalLM to the ModuleList of decoder blocks
    blocks_path: str
    #: linear layers of one block (names relative to the block), in true-sequential groups
    sequential_groups: tuple[tuple[str, ...], ...]
    #: attention projections (relative to the block); "qkv" for a fused projection
    attn: dict[str, str] = field(default_factory=dict)
    #: MLP projections: "up" (and "gate" when gated) produce the intermediate, "down" consumes it
    mlp: dict[str, str] = field(default_factory=dict)
    #: config attribute names for geometry
    config_keys: dict[str, str] = field(default_factory=dict)
    generic: bool = False
    #: config key that sets the attention head dim explicitly (None: the model derives it as hidden / heads,
    #: so head pruning cannot keep it); used by structural width pruning
    head_dim_key: str | None = None
    #: config keys holding one entry per decoder block (filtered when blocks are removed)
    layer_list_keys: tuple[str, ...] = ("layer_types",)
    #: config keys counting "the first N blocks" (e.g. Qwen2 max_window_layers); recounted over kept blocks
    layer_prefix_keys: tuple[str, ...] = ()
    #: architecture facts for FLOP/byte counting (roofline); None for generically discovered models
    arch: ArchFacts | None = None
    #: pre-norm block with RMSNorms and a SiLU-gated MLP whose norms, activation and residual adds the
    #: W4A16 kernels can take over at decode (``compress.kernels.fused_block``); None: not known to be
    decode_block: DecodeBlock | None = None
    #: dotted paths from the CausalLM to the norm after the last block and to the output head; early exit
    #: (``compress.runtime.early_exit``) applies both to an intermediate hidden state. None: not known
    final_norm: str | None = None
    lm_head: str | None = None

    @property
    def fused_qkv(self) -> bool:
        """One projection produces q, k and v (GPT-NeoX's query_key_value)."""
        return "qkv" in self.attn

    # --- navigation -------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def linear_names(self) -> list[str]:
        return [n for g in self.sequential_groups for n in g]

    def input_groups(self, model: nn.Module) -> list[list[str]]:
        """Full names of every block's linear layers, grouped by the input they read (the
        true-sequential groups: for Llama q/k/v, o, gate/up, down)."""
        return [[f"{self.block_prefix(i)}.{n}" for n in group]
                for i in range(self.num_blocks(model)) for group in self.sequential_groups]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {n: _get(block, n) for n in self.linear_names()}

    # --- geometry ------------------------------------------------------------------------
    def config_key(self, what: str) -> str:
        """The HF config attribute for ``what`` (hidden, heads, kv_heads, intermediate, layers)."""
        return {**_DEFAULT_KEYS, **self.config_keys}[what]

    def geometry(self, config: Any) -> dict[str, int]:
        """Head counts, head dim, hidden and intermediate sizes from a HF config."""
        k = {**_DEFAULT_KEYS, **self.config_keys}
        hidden = getattr(config, k["hidden"])
        heads = getattr(config, k["heads"])
        kv = getattr(config, k["kv_heads"], None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return {
            "hidden_size": hidden,
            "num_heads": heads,
            "num_kv_heads": kv,
            "head_dim": head_dim,
            "intermediate_size": getattr(config, k["intermediate"]),
            "num_layers": getattr(config, k["layers"]),
        }


_DEFAULT_KEYS = {
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
}

_LLAMA_LIKE = dict(
    blocks_path="model.layers",
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    mlp={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    head_dim_key="head_dim",
    decode_block=DecodeBlock(),
    final_norm="model.norm",
    lm_head="lm_head",
)

_LLAMA_ARCH = ArchFacts(norm="rms", mlp="gated", act_flops=5.0, qkv_bias=("attention_bias", False),
                        out_bias=("attention_bias", False), mlp_bias=("mlp_bias", False), tie_default=False,
                        positions="rope")

ADAPTERS: dict[str, Adapter] = {
    t: Adapter(model_type=t, arch=_LLAMA_ARCH, **_LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3")
}
# Qwen2 has q/k/v biases and no bias on o_proj; there is no config switch for either.
ADAPTERS["qwen2"] = replace(ADAPTERS["qwen2"], layer_prefix_keys=("max_window_layers",), arch=replace(
    _LLAMA_ARCH, qkv_bias=(None, True), out_bias=(None, False), mlp_bias=(None, False)))
# Qwen3 drops the q/k/v biases and adds an RMSNorm over head_dim on q and k.
ADAPTERS["qwen3"] = replace(ADAPTERS["qwen3"], layer_prefix_keys=("max_window_layers",), arch=replace(
    _LLAMA_ARCH, mlp_bias=(None, False), qk_norm=True))
ADAPTERS["opt"] = Adapter(
    model_type="opt",
    blocks_path="model.decoder.layers",
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
    mlp={"up": "fc1", "down": "fc2"},
    config_keys={"intermediate": "ffn_dim", "kv_heads": "num_attention_heads"},
    # OPT-350m projects after the norm (project_out): early exit refuses it, the head then reads another width
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    # fc1 -> ReLU -> fc2, biases everywhere, learned positions, no GQA, tied head by default
    arch=ArchFacts(norm="layer", mlp="plain", act_flops=1.0, qkv_bias=("enable_bias", True),
                   out_bias=("enable_bias", True), mlp_bias=("enable_bias", True), tie_default=True,
                   positions="learned"),
)
ADAPTERS["gpt_neox"] = Adapter(
    model_type="gpt_neox",
    blocks_path="gpt_neox.layers",
    sequential_groups=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    attn={"qkv": "attention.query_key_value", "o": "attention.dense"},
    mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
    config_keys={"kv_heads": "num_attention_heads"},
    final_norm="gpt_neox.final_layer_norm",
    lm_head="embed_out",
    # GELU (erf, ~8 FLOPs), partial rotary (rotary_pct), parallel residual
    arch=ArchFacts(norm="layer", mlp="plain", act_flops=8.0, qkv_bias=("attention_bias", True),
                   out_bias=("attention_bias", True), mlp_bias=(None, True), tie_default=False,
                   positions="rope", parallel_residual_key="use_parallel_residual"),
)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` by ``config.model_type``, or a generic one discovered from its modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        adapter = ADAPTERS[model_type]
        _check(adapter, model)
        return adapter
    adapter = discover(model, model_type)
    log.warning(
        "model_type %r is not in the adapter table (%s); using generic discovery: blocks at %r, "
        "linears compressed one at a time in registration order. Add an entry to compress/adapters.py "
        "for true-sequential groups and structural pruning.",
        model_type, ", ".join(sorted(ADAPTERS)), adapter.blocks_path,
    )
    return adapter


def discover(model: nn.Module, model_type: str | None = None) -> Adapter:
    """Find the longest ModuleList of same-class blocks containing nn.Linear layers."""
    from torch import nn

    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(b) for b in mod}) == 1 and any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise UnsupportedModelError(
            f"cannot find the decoder blocks of model_type {model_type!r}: no ModuleList of identical blocks "
            f"with linear layers. Add an Adapter for it to ADAPTERS in compress/adapters.py "
            f"(blocks_path, sequential_groups, attn, mlp)."
        )
    name, blocks = best
    linears = tuple((n,) for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear))
    return Adapter(model_type=model_type or "unknown", blocks_path=name, sequential_groups=linears, generic=True)


def _check(adapter: Adapter, model: nn.Module) -> None:
    from torch import nn

    try:
        block = adapter.blocks(model)[0]
        for n in adapter.linear_names():
            if not isinstance(_get(block, n), nn.Module):
                raise AttributeError(n)
    except (AttributeError, IndexError) as e:
        raise UnsupportedModelError(
            f"model_type {adapter.model_type!r} does not have the layout its adapter expects "
            f"({adapter.blocks_path}.0.{e}); update compress/adapters.py"
        ) from None


def _get(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def get_submodule(root: nn.Module, dotted: str) -> Any:
    return _get(root, dotted)


def set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = _get(root, parent_name) if parent_name else root
    setattr(parent, child, new)
