"""Depth pruning: remove whole decoder blocks, leaving a shallower standard model.

Recipe snippet::

    passes:
      - depth_prune: {num_blocks: 4, metric: block_influence}   # or perplexity

``block_influence`` (ShortGPT, Men et al., 2024) ranks blocks by 1 - cos(h_in, h_out) on the calibration
windows, one block at a time through the runner's capture + ``run_block``. ``perplexity`` drops each block
in turn and measures the rise of the calibration LM loss on ``ppl_samples`` windows (needs the whole model
on ``ctx.device``). The blocks that change the model least are removed; the kept blocks are renumbered
(``layer_idx`` of their attention modules follows, so the KV cache indexes correctly) and
``num_hidden_layers`` plus the per-block config fields named by the adapter (``layer_types``,
``max_window_layers``) are updated.

``keep_first`` / ``keep_last`` protect the first and last blocks (default one each): ShortGPT and later
layer-pruning studies find them the most damaging to remove, and with 30 blocks this costs little choice.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compress.adapters import Adapter, set_submodule
from compress.algos import structure as S
from compress.context import PassContext, PassReport
from compress.errors import CompressError, ConfigError
from compress.passes.base import PassConfig
from compress.passes.common import timed_report
from compress.passes.width_prune import count_params
from compress.sequential import capture_block_inputs, run_block

log = logging.getLogger(__name__)


class DepthPruneConfig(PassConfig):
    num_blocks: int = Field(gt=0, description="decoder blocks to remove")
    metric: Literal["block_influence", "perplexity"] = Field(
        "block_influence", description="block_influence: 1 - cos(input, output) of each block (ShortGPT); perplexity: "
        "calibration loss rise when the block is dropped")
    keep_first: int = Field(1, ge=0, description="the first N blocks are never removed")
    keep_last: int = Field(1, ge=0, description="the last N blocks are never removed")
    ppl_samples: int = Field(4, gt=0, description="calibration windows scored per dropped block (metric: perplexity)")


class DepthPrune:
    name: ClassVar[str] = "depth_prune"
    kind: ClassVar[str] = "structure"
    config_class: ClassVar[type[DepthPruneConfig]] = DepthPruneConfig
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: DepthPruneConfig):
        self.config = config

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        return timed_report(self.name, self.config, lambda r: self._run(model, ctx, r))

    def _run(self, model: nn.Module, ctx: PassContext, report: PassReport) -> None:
        cfg, adapter = self.config, ctx.adapter
        n = adapter.num_blocks(model)
        protected = protected_blocks(n, cfg)
        if cfg.num_blocks > n - len(protected):
            raise ConfigError(f"num_blocks: {cfg.num_blocks} exceeds the {n - len(protected)} removable blocks of this "
                              f"{n}-block model (keep_first={cfg.keep_first}, keep_last={cfg.keep_last} protect "
                              f"{len(protected)}); at least one block must remain")
        params_before = count_params(model)
        if cfg.metric == "block_influence":
            scores = block_influences(model, adapter, ctx.calibration.input_ids, ctx.device)
        else:
            scores = loss_rise(model, adapter, ctx.calibration.input_ids[:cfg.ppl_samples], ctx.device)
        remove = S.blocks_to_remove(scores, cfg.num_blocks, protected)
        kept = remove_blocks(model, adapter, remove)
        new_index = {old: new for new, old in enumerate(kept)}
        for i, s in enumerate(scores):
            report.modules[adapter.block_prefix(i)] = {"score": s, "removed": i in remove,
                                                       "new_index": new_index.get(i), "protected": i in protected}
        report.summary = {
            "metric": cfg.metric, "removed_blocks": remove, "num_layers_before": n, "num_layers_after": len(kept),
            "params_before": params_before, "params_after": count_params(model),
            "params_removed_fraction": round(1 - count_params(model) / params_before, 6),
            "removed_scores": [scores[i] for i in remove],
            "kept_score_min": min(scores[i] for i in kept if i not in protected) if len(kept) > len(protected) else None,
        }
        log.info("depth_prune: removed blocks %s (%s)", remove, cfg.metric)


def protected_blocks(n: int, cfg: DepthPruneConfig) -> set[int]:
    return set(range(min(cfg.keep_first, n))) | set(range(max(n - cfg.keep_last, 0), n))


@torch.no_grad()
def block_influences(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, device: torch.device) -> list[float]:
    """ShortGPT block influence of every block, propagating the unpruned model's hidden states."""
    was_training = model.training
    model.eval()
    inputs, kwargs = capture_block_inputs(model, adapter, input_ids, device)
    scores = []
    for block in adapter.blocks(model):
        home = next(block.parameters()).device
        block.to(device)
        outputs = run_block(block, inputs, kwargs)
        total, count = 0.0, 0
        for x, y in zip(inputs, outputs):
            s, c = S.block_influence(x, y)
            total, count = total + s, count + c
        scores.append(total / count)
        block.to(home)
        inputs = outputs
    model.train(was_training)
    return scores


@torch.no_grad()
def loss_rise(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, device: torch.device) -> list[float]:
    """Rise of the mean calibration LM loss when each block is replaced by the identity."""
    was_training = model.training
    model.eval()
    home = next(model.parameters()).device
    model.to(device)

    def mean_loss() -> float:
        losses = []
        for row in input_ids:
            x = row.unsqueeze(0).to(device)
            logits = model(x, use_cache=False).logits[0, :-1].float()
            losses.append(float(F.cross_entropy(logits, x[0, 1:])))
        return sum(losses) / len(losses)

    try:
        base = mean_loss()
        rises = []
        for block in adapter.blocks(model):
            handle = block.register_forward_hook(_identity_hook, with_kwargs=True)
            try:
                rises.append(mean_loss() - base)
            finally:
                handle.remove()
    finally:
        model.to(home)
        model.train(was_training)
    return rises


def _identity_hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """Make a block return its input hidden states (the block is skipped in effect)."""
    hs = args[0] if args else kwargs["hidden_states"]
    return (hs, *out[1:]) if isinstance(out, tuple) else hs


def remove_blocks(model: nn.Module, adapter: Adapter, remove: list[int]) -> list[int]:
    """Drop blocks ``remove`` in place, renumber the rest, update the config. Returns the kept old indices."""
    blocks = adapter.blocks(model)
    n = len(blocks)
    kept = [i for i in range(n) if i not in set(remove)]
    if not kept:
        raise ConfigError("num_blocks: removing every block leaves no model")
    set_submodule(model, adapter.blocks_path, nn.ModuleList([blocks[i] for i in kept]))
    for new, block in enumerate(adapter.blocks(model)):
        # KV caches are indexed by layer_idx: it must be the block's new position
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    _update_config(model, adapter, n, kept)
    return kept


def _update_config(model: nn.Module, adapter: Adapter, n: int, kept: list[int]) -> None:
    config = model.config
    setattr(config, adapter.config_key("layers"), len(kept))
    for key in adapter.layer_list_keys:
        val = getattr(config, key, None)
        if val is None:
            continue
        if len(val) != n:
            raise CompressError(f"config.{key} has {len(val)} entries for {n} blocks; cannot tell which to keep")
        setattr(config, key, [val[i] for i in kept])
    for key in adapter.layer_prefix_keys:
        val = getattr(config, key, None)
        if isinstance(val, int):
            setattr(config, key, sum(1 for i in kept if i < val))
    # some base models cache a flag derived from layer_types (e.g. Qwen3Model.has_sliding_layers)
    parent = model.get_submodule(adapter.blocks_path.rpartition(".")[0])
    layer_types = getattr(config, "layer_types", None)
    if isinstance(getattr(parent, "has_sliding_layers", None), bool) and layer_types is not None:
        parent.has_sliding_layers = "sliding_attention" in layer_types
