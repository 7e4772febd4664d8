"""Writing a checkpoint block by block, and resuming an interrupted per-block run.

The output is assembled in ``<parent>/.<name>.partial/``: block ``i``'s compressed tensors go to
``model-{i+1:05d}-of-{n:05d}.safetensors`` as soon as the block is finished (written to a temporary name, then
renamed), the tensors outside the blocks to the last shard, then ``model.safetensors.index.json`` and
``config.json`` are written last and the folder is renamed to the output. The result loads with plain
``from_pretrained`` (dense) or ``compress.formats.load_quantized`` / vLLM (compressed-tensors, GPTQ), exactly as a
checkpoint saved in memory.

For ``--resume``, each rank also keeps the propagated activations after the last finished block
(``acts-{i:05d}-rank{r}.safetensors``) and ``progress.json`` (finished blocks, their per-module stats and the
recipe fingerprint). The order of writes per block is shard, activations, progress, each atomic, so that a run
killed at any point (kill -9) resumes from the last block whose progress entry exists. A resumed run therefore
recomputes nothing it finished and, on the CPU, writes tensors bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
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

PROGRESS = "progress.json"


def partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def export_tensors(prefix: str, module: nn.Module, fmt: str, warnings: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (named ``prefix.*``) in ``fmt``: packed codes for quantized layers
    (as ``compress.formats.io.save_checkpoint`` writes them), the state dict for everything else."""
    pre = f"{prefix}." if prefix else ""
    quant = {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}
    out: dict[str, torch.Tensor] = {}
    for n, m in quant.items():
        if fmt == "compressed-tensors":
            out.update(ct.layer_tensors(pre + n, m))
        elif fmt == "gptq":
            out.update(gptq_v1.layer_tensors(pre + n, m, warnings))
        else:
            raise CompressError(f"save.format {fmt} of a quantized model is not supported; use compressed-tensors or gptq")
    qprefixes = tuple(n + "." for n in quant)
    for k, v in module.state_dict().items():
        if not k.startswith(qprefixes):
            out[pre + k] = v
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StreamWriter:
    """Per-block output shards, activations and progress for one calibrated pass of a per-block run.

    ``fingerprint``: what must match for ``resume`` to continue (model, passes, calibration, dtype, format,
    world size). ``writes_shards``: False on ranks other than 0 (they keep only their activations).
    """

    def __init__(self, output: Path, fmt: str, num_blocks: int, fingerprint: str, resume: bool,
                 world_size: int = 1, writes_shards: bool = True):
        self.output = Path(output)
        self.fmt = fmt
        self.num_blocks = num_blocks
        self.n_shards = num_blocks + 1
        self.fingerprint = fingerprint
        self.world_size = world_size
        self.writes_shards = writes_shards
        self.warnings: list[str] = []
        self.dir = partial_dir(self.output)
        self.progress: dict[str, Any] = {"fingerprint": fingerprint, "world_size": world_size, "blocks": {}}
        if self.dir.exists():
            self._reuse(resume)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _reuse(self, resume: bool) -> None:
        prog = self.dir / PROGRESS
        saved = json.loads(prog.read_text()) if prog.is_file() else None
        if not resume:
            if self.writes_shards:
                log.warning("discarding the unfinished per-block output %s (pass --resume to continue it)", self.dir)
                shutil.rmtree(self.dir)
            return
        if saved is None:
            log.warning("--resume: %s has no progress yet; starting from block 0", self.dir)
            return
        if saved["fingerprint"] != self.fingerprint or saved["world_size"] != self.world_size:
            raise CompressError(f"--resume: {self.dir} was written by a different recipe, model or number of "
                                f"processes ({saved['world_size']}); remove it or run without --resume")
        self.progress = saved
        log.info("resuming after block %d of %d (%s)", self.next_block - 1, self.num_blocks, self.dir)

    # --- per block ---------------------------------------------------------------------------
    @property
    def next_block(self) -> int:
        done = [int(i) for i in self.progress["blocks"]]
        return max(done) + 1 if done else 0

    def block_done(self, i: int, prefix: str, block: nn.Module, outputs: list[torch.Tensor],
                   stats: dict[str, Any], handler: Any, rank: int) -> None:
        meta = {"format": "pt", "compress_format": self.fmt}
        if self.writes_shards:
            _atomic_save(export_tensors(prefix, block, self.fmt, self.warnings),
                         self.dir / shard_name(i, self.n_shards), meta)
        if i + 1 < self.num_blocks:  # the next block's inputs, for a resume
            acts = {f"{j}": x.detach().contiguous().cpu() for j, x in enumerate(outputs)}
            _atomic_save(acts, self.dir / f"acts-{i:05d}-rank{rank}.safetensors", {"windows": str(len(outputs))})
        if self.writes_shards:
            self.progress["blocks"][str(i)] = {"stats": {k: v for k, v in stats.items() if k.startswith(prefix + ".")},
                                               "ignored": [n for n in getattr(handler, "ignored", [])
                                                           if n.startswith(prefix + ".")],
                                               "warnings": list(self.warnings)}
            _atomic_text(self.dir / PROGRESS, json.dumps(self.progress, default=float))
        old = self.dir / f"acts-{i - 1:05d}-rank{rank}.safetensors"
        if old.exists():
            old.unlink()

    def saved_inputs(self, rank: int, device: torch.device) -> list[torch.Tensor] | None:
        k = self.next_block
        if k == 0:
            return None
        path = self.dir / f"acts-{k - 1:05d}-rank{rank}.safetensors"
        if not path.is_file():
            raise CompressError(f"--resume: {path} is missing; remove {self.dir} and run again")
        acts = load_file(path)
        return [acts[str(j)].to(device) for j in range(len(acts))]

    def restore(self, handler: Any) -> dict[str, dict[str, Any]]:
        """Stats (and ignored names) of the blocks finished before the resume."""
        stats: dict[str, dict[str, Any]] = {}
        for entry in self.progress["blocks"].values():
            stats.update(entry["stats"])
            if hasattr(handler, "ignored"):
                handler.ignored.extend(entry["ignored"])
            self.warnings = list(entry["warnings"])
        return stats

    # --- the end -------------------------------------------------------------------------------
    def finish(self, model: nn.Module, adapter: Any, tokenizer: Any, extra_files: dict[str, str],
               gptq_dampening: float | None, overwrite: bool) -> list[str]:
        """Write the tensors outside the blocks, the index and config (last), then move into ``output``."""
        from compress.formats.io import quantized_layers
        from compress.streaming import meta_tensors

        for i in range(self.num_blocks):
            if not (self.dir / shard_name(i, self.n_shards)).is_file():
                raise CompressError(f"block {i} was never written to {self.dir}")
        skip = adapter.blocks_path + "."
        outside: dict[str, torch.Tensor] = {}
        for k, v in model.state_dict().items():
            if not k.startswith(skip):
                outside[k] = v.detach().contiguous().cpu()
        if getattr(model.config, "tie_word_embeddings", False):
            outside.pop("lm_head.weight", None)  # re-tied on load, as save_pretrained does
        left = [n for n in meta_tensors(model) if not n.startswith(skip)]
        if left:
            raise CompressError(f"tensors outside the blocks are still on the meta device: {left[:5]}")
        meta = {"format": "pt", "compress_format": self.fmt}
        _atomic_save(outside, self.dir / shard_name(self.num_blocks, self.n_shards), meta)
        weight_map: dict[str, str] = {}
        total = 0
        from safetensors import safe_open

        for i in range(self.n_shards):
            name = shard_name(i, self.n_shards)
            with safe_open(self.dir / name, framework="pt") as f:
                for k in f.keys():
                    weight_map[k] = name
            total += (self.dir / name).stat().st_size
        for f in self.dir.glob("acts-*"):
            f.unlink()
        (self.dir / PROGRESS).unlink(missing_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.dir)
        for name, text in (extra_files or {}).items():
            (self.dir / name).write_text(text)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        layers = quantized_layers(model)
        if layers:
            ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
            qcfg = (ct.quantization_config(layers, ignore) if self.fmt == "compressed-tensors"
                    else gptq_v1.quantization_config(layers, gptq_dampening))
            cfg = model.config.to_dict()
            cfg["quantization_config"] = qcfg
            (self.dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        else:
            model.config.save_pretrained(self.dir)
        if self.output.exists():
            if not overwrite:
                raise CompressError(f"output {self.output} appeared while writing; not replacing it")
            shutil.rmtree(self.output)
        os.replace(self.dir, self.output)
        log.info("saved %s checkpoint block by block to %s", self.fmt if layers else "dense", self.output)
        return self.warnings
