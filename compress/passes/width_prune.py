"""Width pruning: remove MLP channels and attention heads, leaving a smaller standard model.

Recipe snippet::

    passes:
      - width_prune: {mlp_ratio: 0.2, head_ratio: 0.25, importance: taylor}   # magnitude | activation | taylor

The same ratio applies to every block, so the result is an ordinary config with a smaller
``intermediate_size`` / ``num_attention_heads`` / ``num_key_value_heads`` that plain
``AutoModelForCausalLM.from_pretrained`` loads after ``model.save_pretrained``. GQA stays valid: whole
KV groups are removed with their query heads (``head_mode: kv_groups``) or the same number of query
heads is removed from every group (``per_group``). Scores are in ``compress.algos.structure``;
docs/structural-pruning.md describes the choices and limits.

``importance: magnitude`` needs no data; ``activation`` and ``taylor`` read the run's calibration set.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.adapters import Adapter, get_submodule, set_submodule
from compress.algos import structure as S
from compress.context import PassContext, PassReport
from compress.errors import CompressError, ConfigError
from compress.passes.base import PassConfig
from compress.passes.common import run_calibrated, timed_report

log = logging.getLogger(__name__)


class WidthPruneConfig(PassConfig):
    mlp_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP intermediate channels removed in every block")
    head_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of attention heads removed in every block "
                              "(of KV groups with head_mode kv_groups, of query heads per group with per_group)")
    importance: Literal["magnitude", "activation", "taylor"] = Field(
        "magnitude", description="magnitude: L2 of the structure's weights; activation: sum |W|*||X|| (Wanda) on "
        "calibration data; taylor: sum |W*dL/dW| from the calibration LM loss (LLM-Pruner)")
    head_mode: Literal["kv_groups", "per_group"] = Field(
        "kv_groups", description="kv_groups: remove whole KV groups with their query heads; per_group: remove the same "
        "number of query heads from every KV group (KV heads kept)")
    taylor_samples: int = Field(2, gt=0, description="calibration windows for the taylor gradients (full forward+backward each)")
    channel_multiple: int = Field(1, gt=0, description="keep a multiple of this many MLP channels (e.g. 128 so a "
                                  "later GPTQ group_size 128 divides the new width)")

    @property
    def needs_calibration(self) -> bool:
        """activation and taylor scores read calibration data; magnitude does not (checked at recipe load)."""
        return self.importance != "magnitude"


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings once), as ``from_pretrained`` will load them."""
    return sum(p.numel() for p in model.parameters())


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear keeping output ``rows`` and input ``cols`` (None: all)."""
    W = lin.weight.data
    if rows is not None:
        W = W.index_select(0, rows.to(W.device))
    if cols is not None:
        W = W.index_select(1, cols.to(W.device))
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data.index_select(0, rows.to(W.device))
        new.bias.data.copy_(b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new

class WidthPrune:
    name: ClassVar[str] = "width_prune"
    kind: ClassVar[str] = "structure"
    config_class: ClassVar[type[WidthPruneConfig]] = WidthPruneConfig
    # magnitude needs no data; activation/taylor ask ctx.calibration, which raises a ConfigError without it
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: WidthPruneConfig | None = None):
        self.config = config or WidthPruneConfig()

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        return timed_report(self.name, self.config, lambda r: self._run(model, ctx, r))

    # -------------------------------------------------------------------------------------------
    def _run(self, model: nn.Module, ctx: PassContext, report: PassReport) -> None:
        cfg, adapter = self.config, ctx.adapter
        plan = plan_sizes(cfg, adapter, model.config)
        names = ([adapter.mlp[k] for k in ("gate", "up", "down") if k in adapter.mlp] if plan["mlp_keep"] else []) + (
            [adapter.attn[k] for k in ("q", "k", "v", "o")] if plan["heads"] else [])
        for i, block in enumerate(adapter.blocks(model)):  # all checked before any block changes
            _linears(block, names, adapter.block_prefix(i))
        before = {"params": count_params(model), **adapter.geometry(model.config)}
        norms = _input_norms(model, ctx) if cfg.importance == "activation" else {}
        grads = _taylor_grads(model, ctx, cfg.taylor_samples) if cfg.importance == "taylor" else {}

        def elem(full: str, lin: nn.Linear) -> torch.Tensor:
            return S.element_scores(lin.weight, cfg.importance, norms.get(full), grads.get(full))

        for i, block in enumerate(adapter.blocks(model)):
            prefix = adapter.block_prefix(i)
            if plan["mlp_keep"] is not None:
                report.modules[f"{prefix}.mlp"] = _prune_mlp(block, adapter, prefix, plan["mlp_keep"], elem, cfg)
            if plan["heads"] is not None:
                report.modules[f"{prefix}.attn"] = _prune_heads(block, adapter, prefix, plan, elem, cfg)
        _update_config(model.config, adapter, plan)
        _check_runs(model, adapter)
        after = {"params": count_params(model), **adapter.geometry(model.config)}
        shares = {k: [m["removed_score_share"] for n, m in report.modules.items() if n.endswith(k)] for k in (".mlp", ".attn")}
        report.summary = {
            "importance": cfg.importance,
            "params_before": before["params"], "params_after": after["params"],
            "params_removed_fraction": round(1 - after["params"] / before["params"], 6),
            **{f"{k}_before": before[k] for k in ("intermediate_size", "num_heads", "num_kv_heads", "head_dim")},
            **{f"{k}_after": after[k] for k in ("intermediate_size", "num_heads", "num_kv_heads", "head_dim")},
            "mean_removed_score_share_mlp": _mean(shares[".mlp"]),
            "mean_removed_score_share_attn": _mean(shares[".attn"]),
        }
        log.info("width_prune: %d -> %d parameters", before["params"], after["params"])


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def plan_sizes(cfg: WidthPruneConfig, adapter: Adapter, config: Any) -> dict[str, Any]:
    """New sizes, checked against the model before any work. Raises ConfigError naming the field."""
    g = adapter.geometry(config)
    plan: dict[str, Any] = {"mlp_keep": None, "heads": None, "kv_heads": None, "head_dim": g["head_dim"]}
    if cfg.mlp_ratio > 0:
        if "up" not in adapter.mlp or "down" not in adapter.mlp:
            raise ConfigError(f"mlp_ratio: the {adapter.model_type} adapter names no MLP projections (up/down)")
        inter = g["intermediate_size"]
        m = cfg.channel_multiple
        keep = int(round((inter - round(cfg.mlp_ratio * inter)) / m)) * m
        if keep < 1 or keep > inter:
            raise ConfigError(f"mlp_ratio: {cfg.mlp_ratio} of {inter} channels (kept in multiples of channel_multiple="
                              f"{m}) leaves {keep} channels; choose a ratio that keeps between 1 and {inter}")
        if keep == inter:
            raise ConfigError(f"mlp_ratio: {cfg.mlp_ratio} of {inter} channels removes none (channel_multiple={m}); "
                              f"use a larger ratio or 0 to skip MLP pruning")
        plan["mlp_keep"] = keep
    if cfg.head_ratio > 0:
        if adapter.head_dim_key is None or "qkv" in adapter.attn or not {"q", "k", "v", "o"} <= set(adapter.attn):
            raise ConfigError(f"head_ratio: head pruning is not supported for {adapter.model_type}: its config derives "
                              f"head_dim = hidden_size / num_attention_heads (no explicit head_dim), so fewer heads would "
                              f"change the head size. Use head_ratio: 0 (mlp_ratio still works)")
        heads, kv = g["num_heads"], g["num_kv_heads"]
        if heads % kv:
            raise ConfigError(f"head_ratio: {heads} query heads are not a multiple of {kv} KV heads")
        group = heads // kv
        if cfg.head_mode == "kv_groups":
            remove = round(cfg.head_ratio * kv)
            new_kv, new_heads, unit, total = kv - remove, (kv - remove) * group, "KV groups", kv
        else:
            remove = round(cfg.head_ratio * group)
            new_kv, new_heads, unit, total = kv, kv * (group - remove), "query heads per KV group", group
        if remove == 0:
            raise ConfigError(f"head_ratio: {cfg.head_ratio} of {total} {unit} rounds to removing none; the smallest "
                              f"step is {1 / total:.4g} (head_mode: {cfg.head_mode})")
        if remove >= total:
            raise ConfigError(f"head_ratio: {cfg.head_ratio} of {total} {unit} leaves none; keep at least one "
                              f"(head_ratio < {(total - 0.5) / total:.4g})")
        plan["heads"], plan["kv_heads"] = new_heads, new_kv
    if plan["mlp_keep"] is None and plan["heads"] is None:
        raise ConfigError("mlp_ratio, head_ratio: both are 0, nothing to prune; set at least one above 0")
    return plan


def _score_share(scores: torch.Tensor, kept: torch.Tensor) -> float:
    total = float(scores.double().sum())
    return 0.0 if total == 0 else round(1 - float(scores.double()[kept].sum()) / total, 6)


def _removed(n: int, kept: torch.Tensor) -> list[int]:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten().tolist()


def _linears(block: nn.Module, names: list[str], prefix: str) -> dict[str, nn.Linear]:
    lins = {n: get_submodule(block, n) for n in names}
    for n, m in lins.items():
        if not isinstance(m, nn.Linear):
            raise CompressError(f"{prefix}.{n} is {type(m).__name__}, not nn.Linear: run structural pruning before "
                                f"quantization")
    return lins


def _prune_mlp(block: nn.Module, adapter: Adapter, prefix: str, keep: int, elem, cfg: WidthPruneConfig) -> dict[str, Any]:
    producers = [adapter.mlp[k] for k in ("gate", "up") if k in adapter.mlp]
    down_name = adapter.mlp["down"]
    lins = _linears(block, [*producers, down_name], prefix)
    scores = S.channel_scores([elem(f"{prefix}.{n}", lins[n]) for n in producers],
                              [elem(f"{prefix}.{down_name}", lins[down_name])], cfg.importance)
    kept = S.keep_topk(scores, keep)
    for n in producers:
        set_submodule(block, n, slice_linear(lins[n], rows=kept))
    set_submodule(block, down_name, slice_linear(lins[down_name], cols=kept))
    mlp_mod = get_submodule(block, down_name.rpartition(".")[0]) if "." in down_name else block
    if isinstance(getattr(mlp_mod, "intermediate_size", None), int):  # cached by e.g. LlamaMLP
        mlp_mod.intermediate_size = keep
    return {"channels_before": scores.numel(), "channels_after": keep, "removed": _removed(scores.numel(), kept),
            "removed_score_share": _score_share(scores, kept), "score_min": float(scores.min()),
            "score_max": float(scores.max())}


def _prune_heads(block: nn.Module, adapter: Adapter, prefix: str, plan: dict[str, Any], elem,
                 cfg: WidthPruneConfig) -> dict[str, Any]:
    names = {k: adapter.attn[k] for k in ("q", "k", "v", "o")}
    by_name = _linears(block, list(names.values()), prefix)
    lins = {k: by_name[n] for k, n in names.items()}
    d = plan["head_dim"]
    heads, kv = lins["q"].out_features // d, lins["k"].out_features // d
    group = heads // kv
    es = {k: elem(f"{prefix}.{names[k]}", lins[k]) for k in lins}
    if cfg.head_mode == "kv_groups":
        scores = S.kv_group_scores(es["q"], es["k"], es["v"], es["o"], heads, kv, cfg.importance)
        kept_kv = S.keep_topk(scores, plan["kv_heads"])
        kept_q = S.kv_groups_to_query_heads(kept_kv, group)
        kept_score_idx = kept_kv
    else:
        scores = S.head_scores(es["q"], es["o"], heads, cfg.importance)
        kept_q = S.keep_per_group(scores, kv, plan["heads"] // kv)
        kept_kv = torch.arange(kv)
        kept_score_idx = kept_q
    q_rows, kv_rows = S.expand_heads(kept_q, d), S.expand_heads(kept_kv, d)
    set_submodule(block, names["q"], slice_linear(lins["q"], rows=q_rows))
    set_submodule(block, names["k"], slice_linear(lins["k"], rows=kv_rows))
    set_submodule(block, names["v"], slice_linear(lins["v"], rows=kv_rows))
    set_submodule(block, names["o"], slice_linear(lins["o"], cols=q_rows))
    attn = get_submodule(block, names["q"].rpartition(".")[0])
    # attributes HF attention modules cache from the config at construction
    new_heads, new_kv = len(kept_q), len(kept_kv)
    for attr, val in (("num_key_value_groups", new_heads // new_kv), ("num_heads", new_heads),
                      ("num_attention_heads", new_heads), ("num_key_value_heads", new_kv)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, val)
    return {"heads_before": heads, "heads_after": new_heads, "kv_heads_before": kv, "kv_heads_after": new_kv,
            "heads_removed": _removed(heads, kept_q), "kv_groups_removed": _removed(kv, kept_kv),
            "removed_score_share": _score_share(scores, kept_score_idx), "score_min": float(scores.min()),
            "score_max": float(scores.max())}


def _update_config(config: Any, adapter: Adapter, plan: dict[str, Any]) -> None:
    if plan["mlp_keep"] is not None:
        setattr(config, adapter.config_key("intermediate"), plan["mlp_keep"])
    if plan["heads"] is not None:
        # head_dim must stay explicit: hidden / heads no longer equals it
        setattr(config, adapter.head_dim_key, plan["head_dim"])
        setattr(config, adapter.config_key("heads"), plan["heads"])
        setattr(config, adapter.config_key("kv_heads"), plan["kv_heads"])


@torch.no_grad()
def _check_runs(model: nn.Module, adapter: Adapter) -> None:
    """A short forward must give finite logits of the right vocabulary size, or the pass failed."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:  # blocks offloaded by the runner: a whole-model forward is not possible here
        log.warning("width_prune: post-pruning forward check skipped, model spread over %s", sorted(map(str, devices)))
        return
    ids = torch.arange(8, device=devices.pop()).unsqueeze(0) % model.config.vocab_size
    try:
        out = model(ids, use_cache=False).logits
    except RuntimeError as e:
        raise CompressError(f"width_prune left a model that does not run: {e}") from e
    if not torch.isfinite(out).all():
        raise CompressError("width_prune left a model whose logits are not finite")


# --- calibration statistics ----------------------------------------------------------------------
class _NormObserver:
    """Accumulates sum_t x_tj^2 of a linear layer's input (Wanda's ||X_j||^2)."""

    def __init__(self) -> None:
        self.sumsq: torch.Tensor | None = None

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        s = inp.reshape(-1, inp.shape[-1]).double().square().sum(0)
        self.sumsq = s if self.sumsq is None else self.sumsq + s


class _NormHandler:
    """Runner handler that only observes: records input norms and leaves every module unchanged."""

    def __init__(self) -> None:
        self.norms: dict[str, torch.Tensor] = {}

    def observer(self, name: str, module: nn.Module) -> _NormObserver | None:
        return _NormObserver() if isinstance(module, nn.Linear) else None

    def compress(self, name: str, module: nn.Module, obs: _NormObserver, replace) -> dict[str, Any]:
        self.norms[name] = obs.sumsq.sqrt().float()
        return {}


def _input_norms(model: nn.Module, ctx: PassContext) -> dict[str, torch.Tensor]:
    handler = _NormHandler()
    run_calibrated(model, ctx, handler, desc="width_prune: activation norms")
    return handler.norms


def _taylor_grads(model: nn.Module, ctx: PassContext, samples: int) -> dict[str, torch.Tensor]:
    """dL/dW of every block linear, L the mean LM loss over the first ``samples`` calibration windows.

    Needs the whole model on ``ctx.device`` for the backward pass; it is moved there and back.
    """
    adapter = ctx.adapter
    ids = ctx.calibration.input_ids[:samples]
    weights = {f"{adapter.block_prefix(i)}.{n}": m.weight for i, b in enumerate(adapter.blocks(model))
               for n, m in adapter.block_linears(b).items() if isinstance(m, nn.Linear)}
    home = next(model.parameters()).device
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the loss is the deterministic calibration loss
    grads: dict[str, torch.Tensor] = {}
    try:
        model.to(ctx.device)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for row in ids:
                x = row.unsqueeze(0).to(ctx.device)
                (model(input_ids=x, labels=x, use_cache=False).loss / len(ids)).backward()
        grads = {n: w.grad.detach().clone() for n, w in weights.items()}
    finally:
        for p, flag in saved.items():
            p.grad = None
            p.requires_grad_(flag)
        model.to(home)
        model.train(was_training)
    return grads
