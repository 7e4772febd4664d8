"""Per-block loading: a model built on the meta device, each decoder block read from disk when its turn comes.

``load: {strategy: per_block}`` compresses a model that does not fit in memory. The model is built from its
config on the meta device (no weights allocated); embeddings, final norm and head are read once; block ``i``
is read from the safetensors shards (``model.safetensors.index.json``'s weight_map, memory-mapped
``safe_open``, opened per block so that no mapping of the whole model stays resident), compressed by the one
sequential runner, written to its output shard (``compress.checkpoint_stream``) and sent back to meta.

Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints: they are rebuilt from the config by
transformers' own initializer for their module, and any tensor still on meta afterwards is an error.

Example::

    load: {strategy: per_block}   # or auto: per_block when the weights do not fit in free memory
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from compress.errors import CompressError, UnsupportedModelError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


class ShardedCheckpoint:
    """The tensors of a safetensors checkpoint folder (one file or an index of shards), read on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CompressError(f"{self.folder} has no model.safetensors or {INDEX}; per-block loading reads "
                                "safetensors only")

    def keys(self) -> set[str]:
        return set(self.weight_map)

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as tensors that own their memory (each shard is mapped only while read)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise CompressError(f"{self.folder}: tensor {n} is not in the checkpoint")
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for fname, keys in sorted(by_file.items()):
            with safe_open(self.folder / fname, framework="pt", device="cpu") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def model_dtype(config: Any, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, d) if isinstance(d, str) else d


def build_meta_model(folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``folder``'s config with every parameter and buffer on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype(config, dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise CompressError(f"{dotted} is neither a parameter nor a buffer of the model")


def _persistent_names(module: nn.Module) -> list[str]:
    """Parameters and persistent buffers of ``module`` (what a checkpoint holds), tied ones once."""
    names = [n for n, _ in module.named_parameters()]
    for mod_name, mod in module.named_modules():
        for b in mod._buffers:
            if mod._buffers[b] is not None and b not in mod._non_persistent_buffers_set:
                names.append(f"{mod_name}.{b}" if mod_name else b)
    return names


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def load_into(model: nn.Module, ckpt: ShardedCheckpoint, prefix: str, module: nn.Module, dtype: torch.dtype,
              skip: tuple[str, ...] = ()) -> None:
    """Read ``module``'s parameters and persistent buffers (named ``prefix.<name>`` in ``ckpt``) into it and
    rebuild its non-persistent buffers; names starting with one of ``skip`` are left alone."""
    local = [n for n in _persistent_names(module) if not n.startswith(skip)]
    full = {n: f"{prefix}.{n}" if prefix else n for n in local}
    tensors = ckpt.read(full.values())
    for n in local:
        _set_tensor(module, n, _cast(tensors.pop(full[n]), dtype))
    rebuild_buffers(model, module, skip)


def rebuild_buffers(model: nn.Module, root: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Non-persistent buffers left on meta, recomputed by the model's own initializer of their module."""
    for mod_name, mod in root.named_modules():
        if mod_name.startswith(skip):
            continue
        meta = [b for b in mod._non_persistent_buffers_set if mod._buffers.get(b) is not None
                and mod._buffers[b].is_meta]
        if not meta:
            continue
        if any(True for _ in mod.parameters(recurse=False)) or not hasattr(model, "_init_weights"):
            raise UnsupportedModelError(
                f"{mod_name} ({type(mod).__name__}) has non-persistent buffers {meta} next to parameters; "
                "per-block loading cannot rebuild them. Use load: {strategy: in_memory}")
        mod.to_empty(device="cpu", recurse=False)
        model._init_weights(mod)


def meta_tensors(module: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()]
            if t.is_meta and not n.startswith(skip)]


def check_keys(model: nn.Module, ckpt: ShardedCheckpoint) -> None:
    """Every tensor the model expects is in the checkpoint under the same name (transformers may rename keys
    on load for some architectures; per-block loading does not, so it refuses them here, before any work).
    A tied head is listed once, under the embeddings' name."""
    missing = sorted(set(_persistent_names(model)) - ckpt.keys())
    if missing:
        raise UnsupportedModelError(
            f"{ckpt.folder}: {len(missing)} tensors of the model are not in the checkpoint under their module "
            f"names (e.g. {missing[0]}); per-block loading reads tensors by name. Use load: {{strategy: in_memory}}")


def load_outside_blocks(model: nn.Module, adapter: Any, ckpt: ShardedCheckpoint, dtype: torch.dtype) -> None:
    """Embeddings, final norm, head (and rotary buffers): everything but the decoder blocks, read once."""
    skip = (adapter.blocks_path + ".",)
    load_into(model, ckpt, "", model, dtype, skip=skip)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            raise CompressError("tie_word_embeddings is set but the head could not be tied to the embeddings")
    left = meta_tensors(model, skip)
    if left:
        raise CompressError(f"per-block loading left tensors on the meta device: {', '.join(left[:5])}")


class BlockStream:
    """The block source of ``compress.sequential.run_sequential`` for per-block loading.

    ``load(i)`` materializes block ``i`` from ``ckpt`` on the CPU; ``done(i, block, outputs, stats)`` hands
    the compressed block to ``writer`` (``compress.checkpoint_stream.StreamWriter``; None on ranks that do
    not write), then frees it (back to meta). ``start`` and ``resume_inputs`` come from the writer's saved
    progress when resuming.
    """

    def __init__(self, model: nn.Module, adapter: Any, ckpt: ShardedCheckpoint, dtype: torch.dtype,
                 writer: Any = None, rank: int = 0):
        self.model, self.adapter, self.ckpt, self.dtype = model, adapter, ckpt, dtype
        self.writer = writer
        self.rank = rank
        self.loaded: set[int] = set()
        #: peak resident set size seen after each block (bytes), for the report
        self.peak_rss: list[int] = []

    def load(self, i: int) -> None:
        if i in self.loaded:
            return
        block = self.adapter.blocks(self.model)[i]
        load_into(self.model, self.ckpt, self.adapter.block_prefix(i), block, self.dtype)
        left = meta_tensors(block)
        if left:
            raise CompressError(f"block {i} still has tensors on the meta device after loading: {left[:5]}")
        self.loaded.add(i)

    def done(self, i: int, block: nn.Module, outputs: list[torch.Tensor], stats: dict[str, Any],
             handler: Any = None) -> None:
        if self.writer is not None:
            self.writer.block_done(i, self.adapter.block_prefix(i), block, outputs, stats, handler, self.rank)
        block.to("meta")
        self.loaded.discard(i)
        self.peak_rss.append(peak_rss_bytes())

    # --- resume -------------------------------------------------------------------------------
    @property
    def start(self) -> int:
        return self.writer.next_block if self.writer is not None else 0

    def resume_inputs(self, device: torch.device) -> list[torch.Tensor] | None:
        return self.writer.saved_inputs(self.rank, device) if self.writer is not None else None

    def restore(self, handler: Any) -> dict[str, dict[str, Any]]:
        return self.writer.restore(handler) if self.writer is not None else {}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory(device: torch.device) -> int:
    """Bytes free for weights on ``device``: CUDA free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
