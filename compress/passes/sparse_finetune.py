"""sparse_finetune: recover a pruned model's quality by training on text, keeping its sparsity exact.

Composable after any pruning or structural pass. Entries that are exactly zero when the pass starts stay
exactly 0.0 after every step (their gradients are zeroed and the mask re-applied after each AdamW step);
structurally pruned models are simply smaller dense models and keep their shapes. Losses: cross-entropy
on the data (``ce``), distillation from the uncompressed model (``kd``: T²·KL on temperature-softened
logits, Hinton et al. 2015), or ``mix`` = (1 - kd_weight)·ce + kd_weight·kd; ``hidden_weight`` adds
per-block hidden-state matching. The teacher is the model as it was before the recipe's first pass,
re-loaded through ``ctx.teacher_factory``. Full fine-tuning of the chosen linears, or LoRA (peft)
merged back with the masks re-applied. docs/finetuning.md has every option.

Recipe snippet::

    passes:
      - wanda: {sparsity: 0.5}
      - sparse_finetune: {dataset: ../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl, steps: 200,
                          lr: 1.0e-4, loss: kd, temperature: 2.0, seqlen: 512, batch_size: 4}
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapters import Adapter
from compress.context import PassContext, PassReport
from compress.errors import CompressError, ConfigError
# the options live in the finetune package (the training loop reads them); imported here, the pass's public name
from compress.finetune.config import SparseFinetuneConfig
from compress.finetune.data import Windows, read_training_text
from compress.finetune.masks import apply_masks, capture_masks, masked_count, masked_nonzero
from compress.finetune.state import latest_state, load_state, read_meta, save_state
from compress.finetune.teacher import DiskTeacher, LiveTeacher
from compress.finetune.trainer import Loop, norm_params, select_linears
from compress.passes.common import timed_report

log = logging.getLogger(__name__)

_NAME = "sparse_finetune"


class TrainingStopped(CompressError):
    """Raised when a run was asked to stop early (``stop_at``); its checkpoint lets --resume continue."""


class SparseFinetune:
    name: ClassVar[str] = _NAME
    kind: ClassVar[str] = "finetune"
    config_class: ClassVar[type[SparseFinetuneConfig]] = SparseFinetuneConfig
    needs_calibration: ClassVar[bool] = False  # it reads its own `dataset`
    #: stop (after writing a checkpoint) once this many steps are done: splits long runs; tests use it
    stop_at: int | None = None

    def __init__(self, config: SparseFinetuneConfig | None = None):
        self.config = config or SparseFinetuneConfig()

    def preflight(self, model: nn.Module, adapter: Adapter, save_format: str) -> list[str]:
        """Fail on bad layer patterns or a missing local dataset before the earlier passes spend their time."""
        cfg = self.config
        select_linears(model, adapter, cfg.modules, f"{_NAME}.modules")
        if cfg.lora is not None and cfg.lora.targets is not None:
            select_linears(model, adapter, cfg.lora.targets, f"{_NAME}.lora.targets")
        p = Path(cfg.dataset).expanduser()
        if (cfg.dataset.startswith((".", "/", "~")) or p.suffix in (".txt", ".raw", ".jsonl", ".json")) and not p.is_file():
            raise ConfigError(f"{_NAME}.dataset: file not found: {cfg.dataset}")
        return []

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        return timed_report(self.name, self.config, lambda r: self._run(model, ctx, r))

    # -------------------------------------------------------------------------------------------
    def _run(self, model: nn.Module, ctx: PassContext, report: PassReport) -> None:
        cfg = self.config
        seed = ctx.seed if cfg.seed is None else cfg.seed
        windows = self._windows(ctx, seed)
        if cfg.lora is not None and cfg.lora.targets is not None:  # the config allows only one of the two
            linears = select_linears(model, ctx.adapter, cfg.lora.targets, f"{_NAME}.lora.targets")
        else:
            linears = select_linears(model, ctx.adapter, cfg.modules, f"{_NAME}.modules")
        weights = {f"{n}.weight": m.weight for n, m in linears.items()}
        masks = capture_masks(weights)
        before = {n: w.detach().to("cpu", copy=True) for n, w in weights.items()}
        fingerprint = self._fingerprint(seed, windows, weights, masks)
        ckdir = self._checkpoint_dir(ctx)
        state_dir = self._resume_point(ckdir, ctx.resume, fingerprint, report)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        scratch = tempfile.TemporaryDirectory(prefix="compress-teacher-") if ckdir is None else None
        gc_on, peft_model, remask = False, None, None
        try:
            with torch.random.fork_rng(devices=_rng_devices(ctx.device)):
                torch.manual_seed(seed)
                model.requires_grad_(False)
                peft_model, params = self._trainables(model, ctx.adapter, linears)
                teacher, t_cache_s, t_info = self._teacher(ctx, model, windows, (ckdir or Path(scratch.name)) / "teacher")
                warmup = round(cfg.warmup_ratio * cfg.steps)
                loop = Loop(model, params, {} if cfg.lora else masks, windows, teacher, cfg, ctx.device, warmup)
                start, history = 0, []
                if state_dir is not None:
                    meta = load_state(state_dir, params, loop.optimizer)
                    start, history = meta["step"], meta["history"]
                    log.info("%s: resuming at step %d of %d from %s", _NAME, start, cfg.steps, state_dir)
                if cfg.gradient_checkpointing:
                    _enable_checkpointing(model)
                    gc_on = True
                model.train()
                t0 = time.perf_counter()
                self._train(loop, start, history, ckdir, fingerprint)
                train_s = time.perf_counter() - t0
                del loop, teacher
                if peft_model is not None:
                    remask = self._merge_lora(peft_model, weights, masks)
        finally:
            if peft_model is not None and remask is None:  # interrupted: take the adapters out unmerged
                peft_model.unload()
            if gc_on:
                model.gradient_checkpointing_disable()
            model.train(was_training)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, False))
            if scratch is not None:
                scratch.cleanup()
        apply_masks(weights, masks)  # no-op for full fine-tuning, where every step re-applied them
        bad = masked_nonzero(weights, masks)
        if bad:
            raise CompressError(f"{_NAME}: {bad} masked weights are non-zero after training (a bug: please report)")
        self._summarize(report, cfg, windows, history, start, params, weights, before, masks, train_s, t_cache_s,
                        teacher_info=t_info, remask=remask)
        report.summary["masked_nonzero_after"] = bad
        if ckdir is not None:
            shutil.rmtree(ckdir, ignore_errors=True)
            if ckdir.parent.is_dir() and not any(ckdir.parent.iterdir()):
                ckdir.parent.rmdir()

    def _windows(self, ctx: PassContext, seed: int) -> Windows:
        cfg = self.config
        if ctx.tokenizer is None:
            raise CompressError(f"{_NAME} needs the run's tokenizer in the pass context (ctx.tokenizer)")
        text = read_training_text(cfg.dataset, cfg.text_field, cfg.split, cfg.subset, ctx.eval_texts,
                                  cfg.allow_eval_overlap, _NAME)
        ids = ctx.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        return Windows.build(ids, cfg.seqlen, cfg.batch_size, cfg.grad_accum, cfg.steps, seed, _NAME)

    def _trainables(self, model: nn.Module, adapter: Adapter,
                    linears: dict[str, nn.Linear]) -> tuple[Any, dict[str, nn.Parameter]]:
        """(peft model or None, trained parameters by name), with requires_grad set on exactly those."""
        cfg = self.config
        peft_model = None
        if cfg.lora is None:
            params = {f"{n}.{k}": p for n, m in linears.items() for k, p in m.named_parameters()}
        else:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise CompressError(f"{_NAME}.lora needs peft: pip install 'compress[finetune]'") from None
            spec = cfg.lora
            peft_model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                          target_modules=list(linears), bias="none"))
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if cfg.train_norms:
            params.update(norm_params(model, adapter))
        for p in params.values():
            p.requires_grad_(True)
        return peft_model, params

    def _teacher(self, ctx: PassContext, student: nn.Module, windows: Windows,
                 cache_dir: Path) -> tuple[LiveTeacher | DiskTeacher | None, float, dict[str, Any]]:
        """(teacher or None, seconds spent loading it and building its cache, description for the report)."""
        cfg = self.config
        if not cfg.needs_teacher:
            return None, 0.0, {"mode": "none"}
        if ctx.teacher_factory is None:
            raise ConfigError(f"{_NAME}: loss {cfg.loss} (or hidden_weight) needs the uncompressed teacher, but the pass "
                              "context has no teacher_factory (compress.runner sets it)")
        t0 = time.perf_counter()
        model = ctx.teacher_factory()
        if cfg.hidden_weight > 0 and ctx.adapter.num_blocks(model) != ctx.adapter.num_blocks(student):
            raise ConfigError(f"{_NAME}.hidden_weight: the student has {ctx.adapter.num_blocks(student)} blocks and the "
                              f"teacher {ctx.adapter.num_blocks(model)} (depth pruning); per-block matching needs the same "
                              "depth; set hidden_weight: 0")
        if cfg.teacher_cache == "off":
            teacher = LiveTeacher(model, ctx.device, cfg.autocast, hidden=cfg.hidden_weight > 0)
        else:
            teacher = DiskTeacher(cache_dir, cfg.teacher_topk, ctx.device)
            teacher.build(model, windows, cfg.steps, cfg.autocast)
            del model  # the cache replaces it: training runs without the teacher in memory
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        return teacher, time.perf_counter() - t0, teacher.describe()

    def _train(self, loop: Loop, start: int, history: list[dict[str, float]], ckdir: Path | None, fingerprint: str) -> None:
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=start, desc=_NAME)
        try:
            for k in range(start, cfg.steps):
                rec = loop.step(k)
                history.append({key: v for key, v in rec.items() if key != "grad_norm" and v is not None})
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                done = k + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log.info("%s step %d/%d loss %.4f lr %.3g", _NAME, done, cfg.steps, rec["loss"], rec["lr"])
                stop = self.stop_at is not None and done == self.stop_at and done < cfg.steps
                due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps
                if ckdir is not None and (due or stop):
                    save_state(ckdir / "train", done, loop.params, loop.optimizer,
                               {"fingerprint": fingerprint, "history": history})
                if stop:
                    how = "run again with --resume to continue" if ckdir is not None else "no checkpoint (no output folder)"
                    raise TrainingStopped(f"{_NAME}: stopped after step {done} of {cfg.steps} as asked; {how}")
        finally:
            bar.close()

    def _merge_lora(self, peft_model: Any, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Merge the adapters into the weights; report how much re-masking then changed them."""
        peft_model.merge_and_unload()
        rel = {}
        with torch.no_grad():
            for n, m in masks.items():
                w = weights[n]
                rel[n] = float(w[m].float().norm() / w.float().norm().clamp_min(1e-30))
        return {"remask_rel_change_mean": sum(rel.values()) / len(rel) if rel else 0.0,
                "remask_rel_change_max": max(rel.values(), default=0.0)}

    # --- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_dir(self, ctx: PassContext) -> Path | None:
        """``<output>.ckpt/<pass index>_sparse_finetune`` beside the output; None without an output."""
        if ctx.run_dir is None:
            return None
        run_dir = Path(ctx.run_dir)
        return run_dir.parent / f"{run_dir.name}.ckpt" / f"{ctx.pass_index}_{self.name}"

    def _fingerprint(self, seed: int, windows: Windows, weights: dict[str, torch.Tensor],
                     masks: dict[str, torch.Tensor]) -> str:
        """What must be equal for a checkpoint to continue this run: config, seed, data, shapes, masks."""
        cfg = self.config.model_dump(mode="json", exclude={"checkpoint_every", "log_every"})
        d = {"config": cfg, "seed": seed, "windows": windows.fingerprint,
             "shapes": {n: list(w.shape) for n, w in weights.items()}, "masked": {n: int(m.sum()) for n, m in masks.items()}}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def _resume_point(self, ckdir: Path | None, resume: bool, fingerprint: str, report: PassReport) -> Path | None:
        if ckdir is None:
            return None
        if not resume:
            if ckdir.exists():
                msg = f"found the checkpoint folder of an earlier interrupted run, {ckdir}; starting over (use --resume to continue it)"
                log.warning("%s: %s", _NAME, msg)
                report.warnings.append(msg)
                shutil.rmtree(ckdir)
            return None
        state = latest_state(ckdir / "train")
        if state is None:
            log.info("%s: --resume, but no training checkpoint in %s: starting at step 0", _NAME, ckdir)
            return None
        if read_meta(state).get("fingerprint") != fingerprint:
            raise CompressError(f"{_NAME}: the checkpoint {state} was written for another configuration, data or "
                                "model; run without --resume to start over")
        return state

    # --- report ------------------------------------------------------------------------------------
    def _summarize(self, report: PassReport, cfg: SparseFinetuneConfig, windows: Windows, history: list[dict[str, float]],
                   start: int, params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                   before: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], train_s: float, cache_s: float,
                   teacher_info: dict[str, Any], remask: dict[str, Any] | None) -> None:
        changes = {}
        for n, w in weights.items():
            b = before[n]
            changes[n] = float((w.detach().cpu().float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            report.modules[n[: -len(".weight")]] = {"shape": list(w.shape), "masked": int(masks[n].sum()) if n in masks else 0,
                                                    "rel_weight_change": changes[n]}
        losses = [h["loss"] for h in history]
        edge = max(1, len(losses) // 10)
        last_parts = {k: _mean([h[k] for h in history[-edge:] if k in h]) for k in ("ce", "kd", "hidden")}
        report.summary = {
            "loss": cfg.loss, "steps": cfg.steps, "steps_this_run": cfg.steps - start, "resumed_from_step": start,
            "tokens_seen": cfg.steps * windows.tokens_per_step, "tokens_this_run": (cfg.steps - start) * windows.tokens_per_step,
            "text_tokens": windows.ids.numel(), "seconds_training": round(train_s, 2), "seconds_teacher": round(cache_s, 2),
            "loss_start": _mean(losses[:edge]), "loss_end": _mean(losses[-edge:]),
            "loss_parts_end": {k: v for k, v in last_parts.items() if v is not None},
            "loss_curve": _curve(losses), "trainable_params": sum(p.numel() for p in params.values()),
            "trained_modules": len(weights), "masked_entries": masked_count(masks),
            "mean_rel_weight_change": _mean(list(changes.values())), "teacher": teacher_info,
            "lora": None if cfg.lora is None else {**cfg.lora.model_dump(mode="json"), **(remask or {})},
        }
        dtypes = {str(p.dtype) for p in params.values()}
        if dtypes - {"torch.float32"}:
            report.warnings.append(f"trained weights are {', '.join(sorted(dtypes))}: AdamW steps in half precision lose "
                                   "small updates; load in float32 (load.dtype) and use autocast: bf16 for speed")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """[[last step of bucket, mean loss of bucket], ...]: at most ``points`` buckets of consecutive steps."""
    n = len(losses)
    size = max(1, -(-n // points))
    return [[min(i + size, n), round(_mean(losses[i : i + size]), 5)] for i in range(0, n, size)]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _enable_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{_NAME}.gradient_checkpointing: {type(model).__name__} does not support it; set false")
    # non-reentrant: the frozen embeddings give inputs without grad, which the reentrant variant would cut off
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
