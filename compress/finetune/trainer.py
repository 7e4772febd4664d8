"""The fine-tuning loop: which parameters train, the objective, and one masked AdamW step.

One step = ``grad_accum`` micro-batches of ``batch_size`` windows: forward (under bf16 autocast if asked),
loss / grad_accum, backward; then masked gradients are zeroed, the gradient norm clipped, AdamW steps at
``lr · lr_factor(step)``, and the masks are re-applied to the weights (``compress.finetune.masks``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.algos.distill import causal_lm_loss, hidden_state_loss, kd_loss, lr_factor, mix_loss, topk_kd_loss
from compress.errors import ConfigError
from compress.finetune.data import Windows
from compress.finetune.masks import apply_masks, zero_masked_grads
from compress.finetune.teacher import TeacherOut, autocast
from compress.passes.common import matches

if TYPE_CHECKING:
    from compress.adapters import Adapter
    from compress.finetune.config import SparseFinetuneConfig


def block_linears(model: nn.Module, adapter: "Adapter") -> dict[str, nn.Module]:
    """Every linear layer the adapter names in the decoder blocks, by full name, in block order."""
    return {f"{adapter.block_prefix(i)}.{n}": m for i, block in enumerate(adapter.blocks(model))
            for n, m in adapter.block_linears(block).items()}


def select_linears(model: nn.Module, adapter: "Adapter", patterns: list[str] | None, field: str) -> dict[str, nn.Linear]:
    """The decoder-block linears matching ``patterns`` (None: all). A pattern matching nothing is an error."""
    every = block_linears(model, adapter)
    if patterns is None:
        chosen = every
    else:
        for p in patterns:
            if not any(matches(n, [p]) for n in every):
                raise ConfigError(f"{field}: {p!r} matches no linear layer of the decoder blocks "
                                  f"(names look like {next(iter(every))})")
        chosen = {n: m for n, m in every.items() if matches(n, patterns)}
    for n, m in chosen.items():
        if type(m) is not nn.Linear:  # a QuantizedLinear has integer codes: nothing to train
            raise ConfigError(f"{field}: {n} is {type(m).__name__}, not nn.Linear; fine-tune before quantizing "
                              "(put sparse_finetune before gptq/rtn)")
    return chosen


def norm_params(model: nn.Module, adapter: "Adapter") -> dict[str, nn.Parameter]:
    """1-D parameters of the decoder blocks outside their linear layers: the norms' scales (and shifts)."""
    linear_params = {id(p) for m in block_linears(model, adapter).values() for p in m.parameters()}
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for n, p in block.named_parameters():
            if p.dim() == 1 and id(p) not in linear_params:
                out[f"{adapter.block_prefix(i)}.{n}"] = p
    return out


def objective(cfg: "SparseFinetuneConfig", logits: torch.Tensor, hidden: tuple[torch.Tensor, ...] | None,
              teacher: TeacherOut | None, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss of one micro-batch and its parts (for logging)."""
    parts: dict[str, torch.Tensor] = {}
    if cfg.loss in ("ce", "mix"):
        parts["ce"] = causal_lm_loss(logits, ids)
    if cfg.loss in ("kd", "mix"):
        if teacher.logits is not None:
            parts["kd"] = kd_loss(logits, teacher.logits, cfg.temperature)
        else:
            parts["kd"] = topk_kd_loss(logits, teacher.topk_values, teacher.topk_indices, cfg.temperature)
    if cfg.loss == "mix":
        loss = mix_loss(parts["ce"], parts["kd"], cfg.kd_weight)
    else:
        loss = parts[cfg.loss]
    if cfg.hidden_weight > 0:
        parts["hidden"] = hidden_state_loss(hidden, teacher.hidden)
        loss = loss + cfg.hidden_weight * parts["hidden"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


class Loop:
    """AdamW over ``params`` with masks on the entries named in ``masks`` (a subset of ``params``' names)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
                 windows: Windows, teacher: Any, cfg: "SparseFinetuneConfig", device: torch.device, warmup: int):
        self.model, self.params, self.masks = model, params, masks
        self.windows, self.teacher, self.cfg, self.device, self.warmup = windows, teacher, cfg, device, warmup
        # weight decay on matrices only: decaying norm scales towards 0 is not a regulariser
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)

    def step(self, k: int) -> dict[str, Any]:
        cfg, w = self.cfg, self.windows
        lr = cfg.lr * lr_factor(k, cfg.steps, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total, parts_sum = 0.0, {}
        for m in range(w.grad_accum):
            ids = w.batch(k, m).to(self.device)
            t_out = self.teacher(k, m, ids) if self.teacher is not None else None
            with autocast(self.device, cfg.autocast):
                out = self.model(input_ids=ids, use_cache=False, output_hidden_states=cfg.hidden_weight > 0)
            hidden = tuple(out.hidden_states[1:]) if cfg.hidden_weight > 0 else None
            loss, parts = objective(cfg, out.logits, hidden, t_out, ids)
            (loss / w.grad_accum).backward()
            total += float(loss.detach()) / w.grad_accum
            for key, v in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + v / w.grad_accum
        zero_masked_grads(self.params, self.masks)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm))
        self.optimizer.step()
        apply_masks(self.params, self.masks)
        return {"loss": total, "lr": lr, "grad_norm": grad_norm, **parts_sum}
