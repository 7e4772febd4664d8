"""``run(recipe)``: load, calibrate, apply passes, evaluate, save, report. The CLI calls this too."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.adapters import get_adapter
from compress.calibration import build_calibration
from compress.context import PassContext, PassReport
from compress.eval.perplexity import PerplexityResult, eval_text, perplexity
from compress.eval.report import model_card, render_markdown
from compress.formats.io import check_output_path, save_checkpoint, save_reports_only
from compress.modeling import load_model, resolve_device
from compress.recipe import Recipe
from compress.registry import get_pass_class

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    report: dict[str, Any]
    output: Path
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compress")
    except PackageNotFoundError:
        return "unknown"


def environment() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def check_local_inputs(recipe: Recipe) -> None:
    """Fail on a missing local data file before spending minutes loading a model."""
    from compress.errors import CompressError
    from compress.eval.perplexity import dataset_path

    c = recipe.calibration
    if c is not None and (c.dataset.startswith((".", "/", "~")) or Path(c.dataset).suffix in (".txt", ".raw", ".jsonl", ".json")):
        if not Path(c.dataset).expanduser().is_file():
            raise CompressError(f"calibration dataset not found: {c.dataset}")
    if recipe.eval.perplexity is not None:
        dataset_path(recipe.eval.perplexity.dataset)


def _tasks(model: Any, tok: Any, spec: Any) -> dict[str, Any]:
    from compress.eval.tasks import run_tasks

    return run_tasks(model, tok, spec.names, spec.limit, spec.batch_size, spec.assets_dir, spec.num_fewshot).to_dict()


def compression_settings(model: Any, recipe: Recipe) -> dict[str, Any]:
    """What the roofline needs to know of the compressed model: weight bits and sparsity."""
    from compress.formats.io import quantized_layers

    comp: dict[str, Any] = {}
    q = quantized_layers(model)
    if q:
        first = next(iter(q.values()))
        comp.update(weight_bits=first.bits, group_size=first.group_size, symmetric=first.symmetric)
    for entry in recipe.passes:
        mask = getattr(entry.config, "mask", None)
        if mask == "2:4":
            comp["sparsity"] = "2:4"
        elif get_pass_class(entry.name).kind == "prune" and isinstance(getattr(entry.config, "sparsity", None), float):
            comp["sparsity"] = entry.config.sparsity
    return comp


def roofline_for(model: Any, recipe: Recipe, original_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Roofline estimate of the compressed model's shapes and formats, with the original as baseline.

    ``original_config``: the model's config dict before the passes. Structural passes shrink
    ``model.config`` in place, so without it the baseline would be the pruned shape, uncompressed."""
    from compress.eval.roofline import estimate

    res = estimate(model.config, recipe.eval.roofline, compression_settings(model, recipe) or None,
                   baseline_config=original_config)
    return res.to_dict(per_op=False)


def load_teacher(recipe: Recipe) -> torch.nn.Module:
    """The model as it was before the first pass, loaded again with the recipe's load options (the
    distillation teacher of fine-tuning passes; loading is deterministic, so it equals the original)."""
    return load_model(recipe.model, recipe.load.dtype, recipe.load.device, recipe.load.trust_remote_code,
                      recipe.load.allow_pickle, recipe.load.revision).model


def run(recipe: Recipe, keep_model: bool = False, resume: bool = False) -> RunResult:
    """Execute a validated recipe end to end. Returns the report (also written to the output).

    ``resume``: fine-tuning passes continue from the training checkpoints an interrupted run left beside the
    output (the passes before them are deterministic and run again); a per-block run continues after its last
    finished block.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this with its share of the calibration windows
    (``compress.distributed``); process 0 evaluates, saves and reports, the others return an empty report."""
    from compress.distributed import Comm
    from compress.streaming_run import choose_strategy, run_per_block

    comm = Comm.from_env(resolve_device(recipe.load.device))
    try:
        strategy, reason = choose_strategy(recipe, comm.device)
        log.info("load strategy: %s (%s)", strategy, reason)
        if strategy == "per_block":
            return run_per_block(recipe, comm, reason, resume)
        return _run_in_memory(recipe, comm, reason, keep_model, resume)
    finally:
        comm.close()


def _run_in_memory(recipe: Recipe, comm: Any, reason: str, keep_model: bool, resume: bool) -> RunResult:
    t_start = time.perf_counter()
    output = Path(recipe.output)
    check_output_path(output, [recipe.model], recipe.save.overwrite)
    check_local_inputs(recipe)
    device = comm.device
    loaded = load_model(recipe.model, recipe.load.dtype, str(device), recipe.load.trust_remote_code,
                        recipe.load.allow_pickle, recipe.load.revision)
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    ppl_spec = recipe.eval.perplexity
    passes = [get_pass_class(e.name)(e.config) for e in recipe.passes]
    # the roofline's baseline: structural passes change model.config in place (to_dict deep-copies)
    original_config = model.config.to_dict()
    preflight_warnings = [w for p in passes if hasattr(p, "preflight")
                          for w in p.preflight(model, adapter, recipe.save.format)]
    report: dict[str, Any] = {
        "version": _version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": recipe.model, "source": loaded.source, "model_type": model.config.model_type,
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype)},
        "output": str(output), "recipe": recipe.to_dict(), "environment": environment(),
        "load": {"strategy": "in_memory", "reason": reason, "processes": comm.world_size},
        "passes": [], "eval": {}, "warnings": preflight_warnings,
    }

    eval_ids = None
    eval_texts: list[str] = []
    if ppl_spec is not None:
        from compress.eval.perplexity import tokenize_stream

        # read once: scored here, and kept out of calibration (on every process, so all draw the same windows)
        eval_texts = [eval_text(ppl_spec.dataset)]
        eval_ids = tokenize_stream(tok, eval_texts[0])
        if ppl_spec.original and comm.is_main:
            res = perplexity(model, tok, ppl_spec.dataset, ppl_spec.seqlen, ppl_spec.max_windows, device, ids=eval_ids)
            report["eval"]["perplexity"] = {"original": res.to_dict()}

    tasks_spec = recipe.eval.tasks
    if tasks_spec is not None and comm.is_main:
        report["eval"]["tasks"] = {"original": _tasks(model, tok, tasks_spec)}

    calib_factory = None
    if recipe.calibration is not None:
        c = recipe.calibration
        calib_factory = partial(build_calibration, tok, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field,
                                c.split, c.subset, eval_texts, c.allow_eval_overlap)
    ctx = PassContext(adapter=adapter, device=device, seed=recipe.calibration.seed if recipe.calibration else 0,
                      run_dir=output, calibration_factory=calib_factory, tokenizer=tok,
                      teacher_factory=partial(load_teacher, recipe), eval_texts=eval_texts, resume=resume,
                      comm=comm if comm.world_size > 1 else None)
    torch.manual_seed(ctx.seed)
    for i, (entry, pass_) in enumerate(zip(recipe.passes, passes)):
        log.info("pass %d/%d: %s %s", i + 1, len(passes), entry.name, entry.config.model_dump(mode="json"))
        ctx.pass_index = i
        rep: PassReport = pass_.apply(model, ctx)
        report["passes"].append(rep.to_dict())
    if not comm.is_main:  # process 0 evaluates and saves
        return RunResult(report={}, output=output)
    if ctx._calibration is not None:
        report["calibration"] = ctx.calibration.describe()

    if ppl_spec is not None:
        res: PerplexityResult = perplexity(model, tok, ppl_spec.dataset, ppl_spec.seqlen, ppl_spec.max_windows,
                                           device, ids=eval_ids)
        report["eval"].setdefault("perplexity", {})["compressed"] = res.to_dict()

    if tasks_spec is not None:
        report["eval"]["tasks"]["compressed"] = _tasks(model, tok, tasks_spec)
        if tasks_spec.early_exit:
            from compress.eval.early_exit_tasks import run_tasks_early_exit

            report["eval"]["tasks"]["early_exit"] = run_tasks_early_exit(model, tok, tasks_spec,
                                                                         ctx.artifacts["early_exit"])
    if recipe.eval.roofline is not None:
        report["eval"]["roofline"] = roofline_for(model, recipe, original_config)

    from compress.formats.io import quantized_layers

    fmt = recipe.save.format if quantized_layers(model) or recipe.save.format == "none" else "dense"
    report["checkpoint"] = {"path": str(output), "format": fmt}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    gptq_damp = next((p.config.dampening for p in recipe.passes if p.name == "gptq"), None)

    def files() -> dict[str, str]:
        return {"report.json": json.dumps(report, indent=2, default=str), "report.md": render_markdown(report),
                "recipe.yaml": recipe_yaml, "README.md": model_card(report, recipe_yaml)}

    if fmt == "none":
        warnings = save_reports_only(output, files(), recipe.save.overwrite)
    else:
        warnings = save_checkpoint(model, tok, output, fmt, extra_files=files(), gptq_dampening=gptq_damp,
                                   overwrite=recipe.save.overwrite)
    if fmt != "none":  # written after the weights, whose hash they carry
        for artifact in ctx.artifacts.values():
            warnings += artifact.save(output)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    report["checkpoint"]["size_bytes"] = size
    report["warnings"] += warnings
    if fmt != "none":  # counted from the files just written, as a user will load them (+ sparsity.png)
        from compress.eval.sparsity import sparsity_report

        report["sparsity"] = sparsity_report(output, report["passes"], adapter)
    for name, text in files().items():  # rewrite with the final size and warnings
        (output / name).write_text(text)
    log.info("done in %.1f s", time.perf_counter() - t_start)
    return RunResult(report=report, output=output, model=model if keep_model else None,
                     tokenizer=tok if keep_model else None)
