"""The distillation teacher: the uncompressed model run on the fly, or its top-k logits cached on disk.

A full-vocabulary cache is too large to keep (SmolLM2: 49,152 logits per token, 400 KB per token in
float32), so the disk cache stores each token's ``topk`` largest logits in float16 with their int32
indices, one safetensors file per training step, and the KD loss is taken on that support
(``compress.algos.distill.topk_kd_loss``). The cache is built before training, after which the teacher is
freed; files already present (from an interrupted run with the same windows) are kept.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from compress.algos.distill import topk_logits
from compress.finetune.data import Windows

log = logging.getLogger(__name__)


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``mode == "bf16"``; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


@dataclass
class TeacherOut:
    logits: torch.Tensor | None = None  # [B, L, V] (live teacher)
    topk_values: torch.Tensor | None = None  # [B, L, k] float16 (disk cache)
    topk_indices: torch.Tensor | None = None  # [B, L, k] int32
    hidden: tuple[torch.Tensor, ...] | None = None  # per block (live teacher with hidden matching)


class LiveTeacher:
    """Runs the teacher model under no_grad on each batch."""

    def __init__(self, model: torch.nn.Module, device: torch.device, autocast_mode: str, hidden: bool):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.autocast_mode = autocast_mode
        self.hidden = hidden

    @torch.no_grad()
    def __call__(self, step: int, micro: int, ids: torch.Tensor) -> TeacherOut:
        with autocast(self.device, self.autocast_mode):
            out = self.model(input_ids=ids, use_cache=False, output_hidden_states=self.hidden)
        return TeacherOut(logits=out.logits, hidden=tuple(out.hidden_states[1:]) if self.hidden else None)

    def describe(self) -> dict[str, Any]:
        return {"mode": "live", "hidden_states": self.hidden}


class DiskTeacher:
    """Top-k teacher logits of every training step, read back from ``folder``."""

    def __init__(self, folder: Path, topk: int, device: torch.device):
        self.folder = folder
        self.topk = topk
        self.device = device
        self.built = 0
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None  # one step's file, read once for all micro-batches

    def _file(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}.safetensors"

    def build(self, model: torch.nn.Module, windows: Windows, steps: int, autocast_mode: str) -> None:
        """Write the cache files that are missing; a cache made for other windows or k is replaced."""
        meta = {"windows": windows.fingerprint, "topk": self.topk, "autocast": autocast_mode}
        meta_file = self.folder / "meta.json"
        if self.folder.is_dir() and (not meta_file.is_file() or json.loads(meta_file.read_text()) != meta):
            log.warning("teacher cache %s was made for other windows or settings; rebuilding it", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(meta))
        todo = [k for k in range(steps) if not self._file(k).is_file()]
        if not todo:
            return
        model = model.to(self.device).eval()
        with torch.no_grad():
            for k in tqdm(todo, desc="teacher cache"):
                tensors = {}
                for m in range(windows.grad_accum):
                    with autocast(self.device, autocast_mode):
                        logits = model(input_ids=windows.batch(k, m).to(self.device), use_cache=False).logits
                    vals, idx = topk_logits(logits, self.topk)
                    tensors[f"values.{m}"], tensors[f"indices.{m}"] = vals.cpu(), idx.cpu()
                tmp = self.folder / f".{self._file(k).name}.tmp"
                save_file(tensors, str(tmp))
                os.replace(tmp, self._file(k))
        self.built = len(todo)

    def __call__(self, step: int, micro: int, ids: torch.Tensor) -> TeacherOut:
        if self._loaded is None or self._loaded[0] != step:
            self._loaded = (step, load_file(str(self._file(step)), device=str(self.device)))
        t = self._loaded[1]
        return TeacherOut(topk_values=t[f"values.{micro}"], topk_indices=t[f"indices.{micro}"])

    def describe(self) -> dict[str, Any]:
        return {"mode": "disk", "topk": self.topk, "files_built_this_run": self.built}
