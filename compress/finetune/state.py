"""Training checkpoints of a fine-tuning pass, for ``compress run --resume``.

One folder per saved step, ``step_000123/``, holding ``state.safetensors`` (the trained tensors, AdamW's
moments flattened as ``optim.<param>.<key>``, and the RNG states) and ``meta.json`` (step, losses, config
fingerprint). Tensors go through safetensors and scalars through JSON, so loading runs no pickle. A folder
is written under a temporary name and renamed when complete, then older ones are removed: an interruption at
any moment leaves the last complete checkpoint readable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError

_PREFIX = "step_"


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise CompressError(f"optimizer state {key!r} is not a tensor; cannot checkpoint it without pickle")
                out[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor]) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    idx = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"optim.{names[id(p)]}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                state[idx] = entry
            idx += 1
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def save_state(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               meta: dict[str, Any]) -> Path:
    """Write the checkpoint of ``step`` (the next step to run) atomically; return its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:06d}"
    tmp = folder / f".{_PREFIX}{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = {id(p): n for n, p in params.items()}
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    tensors.update(_optimizer_tensors(optimizer, names))
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in folder.glob(f"{_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(folder: Path) -> Path | None:
    """The newest complete checkpoint folder under ``folder``, or None."""
    done = sorted(d for d in folder.glob(f"{_PREFIX}*") if (d / "meta.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def read_meta(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "meta.json").read_text())


def load_state(state_dir: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trained tensors, optimizer moments and RNG states in place; return the meta data."""
    tensors = load_file(str(state_dir / "state.safetensors"))
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise CompressError(f"training checkpoint {state_dir} lacks {len(missing)} trained tensors "
                            f"(e.g. {missing[0]}); run without --resume to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    _load_optimizer(optimizer, {id(p): n for n, p in params.items()}, tensors)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return read_meta(state_dir)
