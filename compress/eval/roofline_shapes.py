"""Model shapes for the roofline estimator, read from a Hugging Face config dict (no weights, no torch).

What the estimator needs to know per ``model_type`` (norm kind, MLP kind and activation, which
projections carry biases, positions, tied head, where the FFN width lives) is read from the adapter
table, ``compress.adapters.ADAPTERS`` (each entry's ``ArchFacts``), the one place that knows architectures.
Structurally pruned models may give per-layer values: ``intermediate_size`` (or ``ffn_dim``),
``num_attention_heads`` and ``num_key_value_heads`` can be lists with one entry per layer (then
``head_dim`` must be given, since it can no longer be derived from ``hidden_size``).

``load_model_config`` accepts a built-in name (``compress/eval/model_shapes/<name>.json``, real hub
configs kept offline), a local model folder, a ``config.json`` path, a dict, or a hub id (through
``transformers.AutoConfig``, which needs the hub or its cache).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from compress.adapters import ArchFacts
from compress.errors import CompressError, ConfigError, UnsupportedModelError

SHAPES_DIR = Path(__file__).with_name("model_shapes")


@dataclass(frozen=True)
class Arch(ArchFacts):
    """Per-architecture facts the FLOP/byte model needs: the adapter table's ``ArchFacts`` plus what
    the adapter's layout implies (the config key of the FFN width, fused q/k/v, whether compress
    fuses its decoder blocks: ``Adapter.decode_block``)."""

    ffn_key: str = "intermediate_size"
    fused_qkv: bool = False
    decode_block: bool = False


def known_model_types() -> list[str]:
    """model_types the roofline can count: adapter-table entries that carry architecture facts."""
    from compress.adapters import ADAPTERS

    return sorted(t for t, a in ADAPTERS.items() if a.arch is not None)


def architecture(model_type: str | None) -> Arch:
    """The facts for ``model_type`` from the adapter table; UnsupportedModelError naming the known ones."""
    from compress.adapters import ADAPTERS

    adapter = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if adapter is None or adapter.arch is None:
        raise UnsupportedModelError(
            f"roofline: model_type {model_type!r} is not in the adapter table; known: "
            f"{', '.join(known_model_types())} (add an Adapter with its ArchFacts to ADAPTERS in compress/adapters.py)"
        )
    facts = {f.name: getattr(adapter.arch, f.name) for f in fields(ArchFacts)}
    return Arch(**facts, ffn_key=adapter.config_key("intermediate"), fused_qkv=adapter.fused_qkv,
                decode_block=adapter.decode_block is not None)


@dataclass(frozen=True)
class LayerShape:
    """Geometry of one decoder layer. Equal layers compare equal, so they are costed once."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    rotary_dim: int


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    arch: Arch
    hidden: int
    vocab: int
    layers: tuple[LayerShape, ...]
    tie_embeddings: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    #: OPT's word_embed_proj_dim when it differs from hidden (project_in/project_out linears), else None
    embed_proj_dim: int | None = None
    #: rows of a learned position table (OPT: max_position_embeddings + its offset of 2), else 0
    learned_positions: int = 0

    def layer_groups(self) -> list[tuple[LayerShape, int]]:
        """Distinct layer shapes with their counts, in first-seen order."""
        counts: dict[LayerShape, int] = {}
        for layer in self.layers:
            counts[layer] = counts.get(layer, 0) + 1
        return list(counts.items())


# ----------------------------------------------------------------------------------------------
def builtin_model_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_model_config(model: str | Path | dict[str, Any] | Any) -> tuple[dict[str, Any], str]:
    """The config dict and a display name for a built-in name, folder, config.json, dict or hub id."""
    if isinstance(model, dict):
        return dict(model), str(model.get("_name_or_path") or model.get("model_type", "config"))
    if hasattr(model, "to_dict") and not isinstance(model, (str, Path)):
        d = model.to_dict()  # a transformers PretrainedConfig
        return d, str(d.get("_name_or_path") or d.get("model_type", "config"))
    text = str(model)
    builtin = SHAPES_DIR / f"{text.lower()}.json"
    path = Path(text)
    if builtin.is_file() and not path.exists():
        return json.loads(builtin.read_text()), text.lower()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CompressError(f"model folder {model} has no config.json")
    if path.is_file():
        try:
            return json.loads(path.read_text()), str(model)
        except json.JSONDecodeError as e:
            raise CompressError(f"{path} is not valid JSON: {e}") from None
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return _hub_config(text), text
    raise CompressError(
        f"model {text!r} is not a built-in shape ({', '.join(builtin_model_names())}), a folder with "
        f"config.json, a config.json file, or a hub id"
    )


def _hub_config(repo_id: str) -> dict[str, Any]:
    try:
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise CompressError(f"reading hub id {repo_id!r} needs transformers: {e}") from None
    try:
        return AutoConfig.from_pretrained(repo_id).to_dict()
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one actionable line
        raise CompressError(
            f"cannot read the config of hub id {repo_id!r} ({type(e).__name__}: {str(e)[:200]}); offline, "
            f"pass a local folder or config.json, or a built-in name: {', '.join(builtin_model_names())}"
        ) from None


def _int(cfg: dict[str, Any], key: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config field {key!r} must be a positive integer, got {v!r}")
    return v


def _per_layer(cfg: dict[str, Any], key: str, n_layers: int) -> list[int]:
    """A config value that may be one int or a list of one int per layer (structural pruning)."""
    v = cfg.get(key)
    if isinstance(v, list):
        if len(v) != n_layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise ConfigError(
                f"config field {key!r} is a list, so it must hold {n_layers} non-negative integers "
                f"(one per layer); got {v!r}"
            )
        return list(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config field {key!r} must be a positive integer or a per-layer list, got {v!r}")
    return [v] * n_layers


def _flag(cfg: dict[str, Any], rule: tuple[str | None, bool]) -> bool:
    key, default = rule
    v = cfg.get(key) if key else None
    return bool(default if v is None else v)


def _rotary_fraction(cfg: dict[str, Any]) -> float:
    """Partial rotary (GPT-NeoX ``rotary_pct``; transformers 5 keeps it in ``rope_parameters``)."""
    rope = cfg.get("rope_parameters") or {}
    for v in (cfg.get("rotary_pct"), cfg.get("partial_rotary_factor"), rope.get("partial_rotary_factor")):
        if v is not None:
            return float(v)
    return 1.0


def model_shape(cfg: dict[str, Any], name: str = "model") -> ModelShape:
    """Turn a config dict into a ``ModelShape``. Unknown ``model_type`` raises UnsupportedModelError."""
    mt = cfg.get("model_type")
    arch = architecture(mt)
    hidden = _int(cfg, "hidden_size")
    n_layers = _int(cfg, "num_hidden_layers")
    heads = _per_layer(cfg, "num_attention_heads", n_layers)
    # OPT and GPT-NeoX have no GQA: KV heads equal query heads.
    kv_heads = _per_layer(cfg, "num_key_value_heads", n_layers) if cfg.get("num_key_value_heads") is not None \
        else list(heads)
    ffn = _per_layer(cfg, arch.ffn_key, n_layers)
    if cfg.get("head_dim") is not None:
        head_dim = _int(cfg, "head_dim")
    elif isinstance(cfg.get("num_attention_heads"), list):
        raise ConfigError("config has per-layer num_attention_heads, so it must give head_dim explicitly")
    else:
        head_dim = hidden // heads[0]
    rot = int(head_dim * _rotary_fraction(cfg)) if arch.positions == "rope" else 0
    layers = []
    for i, (h, kv, inter) in enumerate(zip(heads, kv_heads, ffn)):
        if h and (kv == 0 or h % kv):
            raise ConfigError(f"layer {i}: num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
        layers.append(LayerShape(n_heads=h, n_kv_heads=kv if h else 0, head_dim=head_dim,
                                 intermediate=inter, rotary_dim=rot))
    proj = cfg.get("word_embed_proj_dim") if mt == "opt" else None
    tie = cfg.get("tie_word_embeddings")
    return ModelShape(
        name=name,
        model_type=mt,
        arch=arch,
        hidden=hidden,
        vocab=_int(cfg, "vocab_size"),
        layers=tuple(layers),
        tie_embeddings=arch.tie_default if tie is None else bool(tie),
        qkv_bias=_flag(cfg, arch.qkv_bias),
        out_bias=_flag(cfg, arch.out_bias),
        mlp_bias=_flag(cfg, arch.mlp_bias),
        embed_proj_dim=proj if proj and proj != hidden else None,
        learned_positions=_int(cfg, "max_position_embeddings") + 2 if arch.positions == "learned" else 0,
    )


def count_params(shape: ModelShape) -> int:
    """Parameter count implied by the shape (weights and biases, tied head counted once)."""
    h, n = shape.hidden, 0
    e = shape.embed_proj_dim or h
    n += shape.vocab * e
    n += shape.learned_positions * h
    if shape.embed_proj_dim:
        n += 2 * e * h
    norm_params = h if shape.arch.norm == "rms" else 2 * h
    for ly in shape.layers:
        q, kv = ly.n_heads * ly.head_dim, ly.n_kv_heads * ly.head_dim
        n += h * (q + 2 * kv) + q * h + (q + 2 * kv) * shape.qkv_bias + h * shape.out_bias
        up = 2 if shape.arch.mlp == "gated" else 1
        n += up * h * ly.intermediate + ly.intermediate * h
        n += (up * ly.intermediate + h) * shape.mlp_bias
        n += 2 * norm_params + (2 * ly.head_dim if shape.arch.qk_norm else 0)
    n += norm_params
    if not shape.tie_embeddings:
        n += shape.vocab * e
    return n

