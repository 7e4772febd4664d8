"""Writing checkpoints atomically, and reading quantized ones back."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import CompressError
from compress.formats import compressed_tensors as ct
from compress.formats import gptq_v1
from compress.nn.qlinear import QuantizedLinear

log = logging.getLogger(__name__)

_SHARD_BYTES = 4 * 1024**3


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def check_output_path(output: Path, inputs: list[str], overwrite: bool) -> None:
    """Never write into (or over) the input model; refuse an existing output unless asked."""
    out = output.resolve()
    for src in inputs:
        p = Path(src).expanduser()
        if p.exists():
            src_dir = (p if p.is_dir() else p.parent).resolve()
            if out == src_dir or src_dir.is_relative_to(out) or out.is_relative_to(src_dir):
                raise CompressError(f"output {output} is or contains the input model {src}; choose another folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CompressError(f"output {output} exists and is not empty; remove it, choose another, or pass --overwrite")


def save_checkpoint(model: nn.Module, tokenizer: Any, output: str | Path, fmt: str = "compressed-tensors",
                    extra_files: dict[str, str] | None = None, gptq_dampening: float | None = None,
                    overwrite: bool = False) -> list[str]:
    """Write the model (+ tokenizer, generation config, extra text files) into ``output`` atomically.

    Returns warnings to put in the report.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    layers = quantized_layers(model)
    warnings: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        if not layers or fmt == "dense":
            _save_dense(model, tmp, layers)
        else:
            _save_quantized(model, tmp, layers, fmt, warnings, gptq_dampening)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if output.exists():
            if not overwrite:
                raise CompressError(f"output {output} appeared while writing; not replacing it")
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint to %s", fmt if layers else "dense", output)
    return warnings


def save_reports_only(output: str | Path, files: dict[str, str], overwrite: bool = False) -> list[str]:
    """``save.format: none``: write only the report files, atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    for name, text in files.items():
        (tmp / name).write_text(text)
    if output.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise CompressError(f"output {output} appeared while writing; not replacing it")
        shutil.rmtree(output)
    os.replace(tmp, output)
    return []


def _save_dense(model: nn.Module, folder: Path, layers: dict[str, QuantizedLinear]) -> None:
    if layers:
        raise CompressError("save.format dense of a quantized model is not supported; use compressed-tensors or gptq")
    model.save_pretrained(folder, safe_serialization=True)


def _save_quantized(model: nn.Module, folder: Path, layers: dict[str, QuantizedLinear], fmt: str,
                    warnings: list[str], dampening: float | None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors.update(ct.layer_tensors(name, m) if fmt == "compressed-tensors"
                       else gptq_v1.layer_tensors(name, m, warnings))
    quant_prefixes = tuple(n + "." for n in layers)
    for k, v in model.state_dict().items():
        if not k.startswith(quant_prefixes):
            tensors[k] = v
    if getattr(model.config, "tie_word_embeddings", False):
        # tied lm_head shares storage with the embedding; transformers re-ties it on load
        tensors.pop("lm_head.weight", None)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    qcfg = (ct.quantization_config(layers, ignore) if fmt == "compressed-tensors"
            else gptq_v1.quantization_config(layers, dampening))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    _write_shards(tensors, folder, fmt)


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, fmt: str) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt", "compress_format": fmt}
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata=meta)
        return
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata=meta)
        index["weight_map"].update({k: fname for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------------
def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressError(f"{folder} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def load_quantized(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a compressed-tensors pack-quantized or GPTQ v1 checkpoint into QuantizedLinear layers.

    Returns (model, tokenizer). ``dtype`` defaults to the checkpoint's ``torch_dtype``/``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CompressError(f"not a checkpoint folder (no config.json): {folder}")
    raw = json.loads((folder / "config.json").read_text())
    qcfg = raw.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") not in ("compressed-tensors", "gptq"):
        raise CompressError(f"{folder} is not a compressed-tensors or GPTQ checkpoint; load it with from_pretrained")
    config = AutoConfig.for_model(**raw)
    dt = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    tensors = _read_tensors(folder)
    if qcfg["quant_method"] == "gptq":
        prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
        layers = {p: gptq_v1.read_layer(p, tensors, qcfg) for p in prefixes}
        used = (".qweight", ".qzeros", ".scales", ".g_idx", ".bias")
    else:
        prefixes = [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]
        layers = {p: ct.read_layer(p, tensors, scheme_for(p, qcfg)) for p in prefixes}
        used = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".bias")
    for p in prefixes:
        for s in used:
            tensors.pop(p + s, None)
    from compress.adapters import set_submodule

    model.to_empty(device="cpu")
    for p, layer in layers.items():
        layer.scales.data = layer.scales.data.to(dt)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dt)
        set_submodule(model, p, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quant_keys = {f"{p}.{b}" for p in layers for b in ("qweight", "scales", "zeros", "g_idx")}
    missing = [k for k in missing if k not in quant_keys and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CompressError(f"{folder}: checkpoint does not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    _init_nonpersistent(model, config)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tok


def _init_nonpersistent(model: nn.Module, config) -> None:
    """Rotary inverse frequencies are non-persistent buffers that a meta-device build leaves empty:
    rebuild each rotary module from its config on the CPU."""
    from compress.adapters import set_submodule

    for name, m in list(model.named_modules()):
        if "inv_freq" in getattr(m, "_buffers", {}):
            try:
                fresh = type(m)(config=getattr(m, "config", config))
            except TypeError as e:
                raise CompressError(f"cannot rebuild rotary embedding {name} ({type(m).__name__}): {e}") from None
            set_submodule(model, name, fresh)


def scheme_for(prefix: str, qcfg: dict[str, Any]) -> dict[str, Any]:
    """The ``weights`` scheme of the compressed-tensors config group that targets layer ``prefix``
    (by its name or by ``Linear``); CompressError when none does."""
    groups = list(qcfg["config_groups"].values())
    for g in groups:
        if prefix in g["targets"] or "Linear" in g["targets"]:
            return g["weights"]
    raise CompressError(f"no quantization scheme in config_groups targets {prefix}")
