"""Achieved sparsity counted from a saved checkpoint, next to the plan the pruning passes followed.

What is counted: the linear weights of the decoder blocks (names from the adapter table), read back
from the ``*.safetensors`` files after saving, so the numbers describe what a user downloads:

- dense weights: exact zeros;
- packed quantized layers (compressed-tensors ``pack-quantized``, GPTQ v1): weights that dequantize to
  exactly 0, i.e. codes equal to their group's zero point (unpacked by the readers in
  ``compress.formats``). Quantization also rounds small weights to the zero point, so a quantized
  model shows zeros that no pruning pass made; the plan says what pruning asked for.

``sparsity_report`` returns the ``sparsity`` section of report.json::

    {"counted_from": ..., "rule": ..., "overall": 0.5, "shown": true,
     "per_module": {"model.layers.0.self_attn.q_proj": {"numel", "zeros", "sparsity", "planned", "alpha"}},
     "per_block": [{"block": 0, "numel", "zeros", "sparsity", "planned", "alpha"}, ...],
     "planned": {"passes": ["alpha_allocation", "wanda"], "overall": 0.5} or null}
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from compress.adapters import ADAPTERS, Adapter
from compress.errors import CompressError

log = logging.getLogger(__name__)

#: Below this fraction of zeros a model without a pruning pass counts as dense. Trained checkpoints hold
#: a few exact zeros by accident (SmolLM2-135M: 0.03% of its block weights); pruning worth reporting
#: removes 10% or more. 1% sits 30x above the first and 10x below the second.
DENSE_THRESHOLD = 0.01


class CheckpointTensors(Mapping):
    """Read-only mapping of tensor name -> tensor over a folder's ``*.safetensors`` files, loading each
    tensor on access so that counting a large model holds one layer at a time."""

    def __init__(self, folder: Path, stack: ExitStack):
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise CompressError(f"{folder} has no *.safetensors files to count sparsity from")
        self._where: dict[str, Any] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            self._where.update({k: handle for k in handle.keys()})
        self.files = [f.name for f in files]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _adapter_for(config: dict[str, Any]) -> Adapter:
    """The adapter of a saved config; architectures outside the table are discovered on a meta model."""
    mt = config.get("model_type")
    if mt in ADAPTERS:
        return ADAPTERS[mt]
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.adapters import discover

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return discover(model, mt)


def _zero_mask(layer: Any) -> torch.Tensor:
    """True where a QuantizedLinear's weight dequantizes to exactly 0: w = (q - z)·s is 0 iff q = z
    (or the group's scale is 0). Compares codes instead of dequantizing: a third of the time."""
    g = layer.g_idx.long()
    return (layer.qweight == layer.zeros[:, g]) | (layer.scales[:, g] == 0)


def _layer_reader(qcfg: dict[str, Any] | None):
    """(format name, rule, fn(prefix, tensors) -> bool zero mask [out, in], or None when not stored packed)."""
    from compress.formats import compressed_tensors as ct
    from compress.formats import gptq_v1
    from compress.formats.io import scheme_for

    method = (qcfg or {}).get("quant_method")
    if method is None:
        return "dense", "exact zeros", lambda prefix, t: None
    if method == "gptq":
        def read(prefix: str, t: Mapping) -> torch.Tensor | None:
            return _zero_mask(gptq_v1.read_layer(prefix, t, qcfg)) if f"{prefix}.qweight" in t else None
        return "gptq", "codes equal to the zero point (dequantize to 0)", read
    if method == "compressed-tensors":
        def read(prefix: str, t: Mapping) -> torch.Tensor | None:
            if f"{prefix}.weight_packed" not in t:
                return None
            return _zero_mask(ct.read_layer(prefix, t, scheme_for(prefix, qcfg)))
        return "compressed-tensors", "codes equal to the zero point (dequantize to 0)", read
    raise CompressError(f"cannot count sparsity of quantization method {method!r} (known: compressed-tensors, gptq)")


def count_checkpoint_zeros(folder: str | Path, adapter: Adapter | None = None) -> dict[str, Any]:
    """Zeros of every decoder-block linear weight stored in ``folder`` (a saved checkpoint).

    Returns ``{"format", "rule", "files", "per_module": {name: {"numel", "zeros"}}, "block_of": {name: i}}``.
    Raises CompressError when a weight the adapter names is missing from the files.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CompressError(f"not a checkpoint folder (no config.json): {folder}")
    config = json.loads(cfg_path.read_text())
    adapter = adapter or _adapter_for(config)
    fmt, rule, read_packed = _layer_reader(config.get("quantization_config"))
    n_blocks = int(config[adapter.config_key("layers")])
    per_module: dict[str, dict[str, int]] = {}
    block_of: dict[str, int] = {}
    with ExitStack() as stack:
        tensors = CheckpointTensors(folder, stack)
        for i in range(n_blocks):
            for n in adapter.linear_names():
                prefix = f"{adapter.block_prefix(i)}.{n}"
                zero = read_packed(prefix, tensors)
                if zero is None:
                    if f"{prefix}.weight" not in tensors:
                        raise CompressError(f"{folder}: no stored weight for {prefix} (looked for {prefix}.weight "
                                            f"and the packed {fmt} tensors)")
                    zero = tensors[f"{prefix}.weight"] == 0
                per_module[prefix] = {"numel": int(zero.numel()), "zeros": int(zero.sum())}
                block_of[prefix] = i
        files = tensors.files
    return {"format": fmt, "rule": rule, "files": files, "per_module": per_module, "block_of": block_of}


def plan_from_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-module planned sparsity and α from the pass reports of report.json.

    A pruning pass records ``target_sparsity`` for each module it pruned (a later pass overrides an
    earlier one); an allocation pass records ``alpha`` (the ESD tail exponent) for each module.
    """
    planned: dict[str, float] = {}
    alpha: dict[str, float] = {}
    sources: list[str] = []
    for p in passes:
        mods = p.get("modules") or {}
        got_plan = {n: float(m["target_sparsity"]) for n, m in mods.items() if m.get("target_sparsity") is not None}
        got_alpha = {n: float(m["alpha"]) for n, m in mods.items() if m.get("alpha") is not None}
        if got_plan or got_alpha:
            sources.append(p["name"])
        planned.update(got_plan)
        alpha.update(got_alpha)
    return {"planned": planned, "alpha": alpha, "sources": sources}


def _weighted(values: dict[str, float], numel: dict[str, int], names: list[str]) -> float:
    total = sum(numel[n] for n in names)
    return sum(values.get(n, 0.0) * numel[n] for n in names) / total if total else 0.0


def summarize(counts: dict[str, Any], passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine counted zeros with the plan: per module, per block (parameter-weighted), overall.

    Planned sparsity of a module no pruning pass touched is 0, so planned and achieved share one
    denominator. Block α is the plain mean over the block's modules (what AlphaPruning's default
    ``block_wise`` mapping allocates from).
    """
    plan = plan_from_passes(passes)
    numel = {n: m["numel"] for n, m in counts["per_module"].items()}
    per_module: dict[str, dict[str, Any]] = {}
    for n, m in counts["per_module"].items():
        per_module[n] = {**m, "block": counts["block_of"][n],
                         "sparsity": m["zeros"] / m["numel"] if m["numel"] else 0.0,
                         "planned": plan["planned"].get(n), "alpha": plan["alpha"].get(n)}
    blocks: dict[int, list[str]] = {}
    for n, b in counts["block_of"].items():
        blocks.setdefault(b, []).append(n)
    per_block = []
    for b in sorted(blocks):
        names = blocks[b]
        alphas = [plan["alpha"][n] for n in names if n in plan["alpha"]]
        per_block.append({
            "block": b, "numel": sum(numel[n] for n in names), "zeros": sum(per_module[n]["zeros"] for n in names),
            "sparsity": _weighted({n: per_module[n]["sparsity"] for n in names}, numel, names),
            "planned": _weighted(plan["planned"], numel, names) if plan["planned"] else None,
            "alpha": sum(alphas) / len(alphas) if alphas else None,
        })
    total = sum(numel.values())
    overall = sum(m["zeros"] for m in per_module.values()) / total if total else 0.0
    planned = None
    if plan["planned"]:
        planned = {"passes": plan["sources"], "overall": _weighted(plan["planned"], numel, list(numel)),
                   "modules": len(plan["planned"])}
    quantized = counts["format"] != "dense"
    return {
        "counted_from": counts["files"], "format": counts["format"], "rule": counts["rule"],
        "overall": overall, "planned": planned,
        # a table and plot only when pruning ran, or when an unquantized model holds zeros no accident makes
        "shown": planned is not None or (not quantized and overall >= DENSE_THRESHOLD),
        "per_module": per_module, "per_block": per_block,
    }


def sparsity_report(folder: str | Path, passes: list[dict[str, Any]], adapter: Adapter | None = None,
                    plot: bool = True) -> dict[str, Any]:
    """The ``sparsity`` section of report.json for the checkpoint saved in ``folder``; writes
    ``folder/sparsity.png`` (alpha, planned and achieved sparsity per block) when the section is shown."""
    section = summarize(count_checkpoint_zeros(folder, adapter), passes)
    section["plot"] = None
    if plot and section["shown"]:
        from compress.eval.plots import plot_sparsity

        plot_sparsity(section, Path(folder) / "sparsity.png")
        section["plot"] = "sparsity.png"
    log.info("achieved sparsity %.4f of decoder linear weights (%s)", section["overall"], section["rule"])
    return section


def sparsity_markdown(section: dict[str, Any] | None) -> list[str]:
    """Lines of report.md for the ``sparsity`` section (empty when there is none)."""
    if not section:
        return []
    out = ["", "## Sparsity of the saved weights", ""]
    rule = f"counted from {', '.join(section['counted_from'])} ({section['format']}: {section['rule']})"
    if not section["shown"]:
        why = ("quantization rounds small weights to the zero point; no pruning pass ran"
               if section["format"] != "dense" else f"below {DENSE_THRESHOLD:.0%}: dense")
        return out + [f"{section['overall']:.2%} of the decoder's linear weights are zero, {rule}; {why}."]
    planned = section["planned"]
    out.append(f"Achieved {section['overall']:.4f} of the decoder's linear weights, {rule}"
               + (f"; planned {planned['overall']:.4f} by {' → '.join(planned['passes'])}." if planned else "."))
    if planned and section["format"] != "dense":
        out.append("Achieved includes weights that quantization rounded to the zero point.")
    has_alpha = any(b["alpha"] is not None for b in section["per_block"])
    out += ["", "| block | planned | achieved |" + (" alpha |" if has_alpha else ""),
            "|---:|---:|---:|" + ("---:|" if has_alpha else "")]
    for b in section["per_block"]:
        row = f"| {b['block']} | {_num(b['planned'], 4)} | {b['sparsity']:.4f} |"
        out.append(row + (f" {_num(b['alpha'], 3)} |" if has_alpha else ""))
    if section.get("plot"):
        out += ["", f"![alpha and sparsity per block]({section['plot']})"]
    return out


def _num(x: float | None, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"
