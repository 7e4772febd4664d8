"""``compress run`` with ``load: {strategy: per_block}``, and the ``auto`` choice between the two strategies.

Per-block runs build the model on the meta device, apply one calibrated (or data-free) pass block by block
through the sequential runner, and write the checkpoint as blocks finish (``compress.checkpoint_stream``).
What they support, checked before any model is loaded: one pass among ``PER_BLOCK_PASSES``, a local
safetensors folder (or a hub id, downloaded first), and the roofline estimate; perplexity and task evaluation
need the whole model and are refused (evaluate the written checkpoint with ``compress eval``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.errors import CompressError, ConfigError

log = logging.getLogger(__name__)

#: passes whose whole work is per block: the calibrated ones through the runner, the data-free ones per block
PER_BLOCK_PASSES = ("gptq", "rtn", "sparsegpt", "wanda", "magnitude")
#: in_memory when the weights (in the load dtype) take at most this fraction of free memory: the in-memory
#: save makes a contiguous copy of every tensor, and calibration adds activations and Hessians
FIT_FRACTION = 0.5

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def per_block_problems(recipe: Any) -> list[str]:
    """Why ``recipe`` cannot run per block (empty: it can)."""
    problems = []
    names = [p.name for p in recipe.passes]
    if len(names) != 1:
        problems.append(f"per-block runs apply exactly one pass (the recipe has {len(names)}: {', '.join(names) or '-'}); "
                        "run the passes one after another, each on the previous output")
    elif names[0] not in PER_BLOCK_PASSES:
        problems.append(f"pass {names[0]} does not run per block (per-block passes: {', '.join(PER_BLOCK_PASSES)})")
    if recipe.eval.perplexity is not None or recipe.eval.tasks is not None:
        problems.append("eval.perplexity and eval.tasks need the whole model; evaluate the written checkpoint "
                        "with `compress eval` on a machine where it fits")
    if recipe.save.format == "none":
        problems.append("save.format none: a per-block run writes its result as it goes; choose a checkpoint format")
    if Path(recipe.model).suffix == ".gguf":
        problems.append("a .gguf model is dequantized by transformers as a whole; convert it to safetensors first")
    return problems


def weights_bytes(folder: Path, dtype: str) -> int:
    """Bytes the weights take in the load dtype, from the safetensors headers alone (no tensor is read)."""
    target = None if dtype == "auto" else torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            numel = 1
            for d in v["shape"]:
                numel *= d
            size = _DTYPE_BYTES.get(v["dtype"], 4)
            floating = v["dtype"].startswith(("F", "BF"))
            total += numel * (target if target is not None and floating else size)
    return total


def local_folder(recipe: Any) -> Path:
    """The model's local folder; a hub id is downloaded (safetensors and configs only) into the HF cache."""
    from compress.modeling import resolve_model_path

    target, _ = resolve_model_path(recipe.model)
    if Path(target).is_dir():
        return Path(target)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(target, revision=recipe.load.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any download failure is the same advice to the user
        raise CompressError(f"could not download {recipe.model!r} for per-block loading: {str(e).splitlines()[0]}; "
                            "pass a local folder") from None


def choose_strategy(recipe: Any, device: torch.device) -> tuple[str, str]:
    """(strategy, reason): the recipe's choice, or for ``auto`` per_block when the weights do not fit."""
    from compress.modeling import resolve_model_path
    from compress.streaming import available_memory

    asked = recipe.load.strategy
    problems = per_block_problems(recipe)
    if asked == "per_block":
        if problems:
            raise ConfigError("load.strategy per_block: " + "; ".join(problems))
        return "per_block", "asked for by the recipe"
    if asked == "in_memory":
        return "in_memory", "asked for by the recipe"
    target, gguf = resolve_model_path(recipe.model)
    if gguf is not None or not Path(target).is_dir() or not any(Path(target).glob("*.safetensors")):
        return "in_memory", "auto: the size of a hub or gguf model is not known before loading"
    need = weights_bytes(Path(target), recipe.load.dtype)
    free = available_memory(device)
    where = "GPU" if device.type == "cuda" else "host"
    if need <= FIT_FRACTION * free:
        return "in_memory", f"auto: weights {need / 2**30:.2f} GiB fit in {free / 2**30:.1f} GiB free {where} memory"
    if problems:
        log.warning("weights %.2f GiB may not fit in %.1f GiB free %s memory, but per-block loading cannot run "
                    "this recipe (%s); loading it whole", need / 2**30, free / 2**30, where, "; ".join(problems))
        return "in_memory", "auto: too large for memory, but the recipe cannot run per block"
    return "per_block", (f"auto: weights {need / 2**30:.2f} GiB exceed {FIT_FRACTION:g} x {free / 2**30:.1f} GiB "
                         f"free {where} memory")


def fingerprint(recipe: Any, folder: Path, world_size: int) -> str:
    d = recipe.to_dict()
    d.pop("output", None)
    d.get("save", {}).pop("overwrite", None)
    key = json.dumps({"recipe": d, "model": str(folder.resolve()), "world": world_size}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def run_per_block(recipe: Any, comm: Any, reason: str, resume: bool = False) -> Any:
    """The per-block counterpart of ``compress.runner.run`` (same report, same checkpoint)."""
    from transformers import AutoTokenizer

    from compress.adapters import get_adapter
    from compress.calibration import build_calibration
    from compress.checkpoint_stream import StreamWriter
    from compress.context import PassContext
    from compress.eval.report import model_card, render_markdown
    from compress.eval.sparsity import sparsity_report
    from compress.registry import get_pass_class
    from compress.runner import RunResult, _version, check_local_inputs, environment, roofline_for
    from compress.streaming import (BlockStream, ShardedCheckpoint, build_meta_model, check_keys,
                                    load_outside_blocks, model_dtype, peak_rss_bytes)
    from compress.formats.io import check_output_path

    t_start = time.perf_counter()
    output = Path(recipe.output)
    check_output_path(output, [recipe.model], recipe.save.overwrite)
    check_local_inputs(recipe)
    folder = local_folder(recipe)
    ld = recipe.load
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=ld.trust_remote_code)
    model = build_meta_model(folder, ld.dtype, ld.trust_remote_code)
    adapter = get_adapter(model)
    ckpt = ShardedCheckpoint(folder)
    check_keys(model, ckpt)
    dtype = model_dtype(model.config, ld.dtype)
    load_outside_blocks(model, adapter, ckpt, dtype)
    entry = recipe.passes[0]
    pass_ = get_pass_class(entry.name)(entry.config)
    original_config = model.config.to_dict()
    warnings = list(pass_.preflight(model, adapter, recipe.save.format)) if hasattr(pass_, "preflight") else []
    fmt = recipe.save.format if get_pass_class(entry.name).kind == "quantize" else "dense"
    writer = StreamWriter(output, fmt, adapter.num_blocks(model), fingerprint(recipe, folder, comm.world_size),
                          resume, comm.world_size, writes_shards=comm.is_main)
    source = BlockStream(model, adapter, ckpt, dtype, writer, comm.rank)
    calib_factory = None
    if recipe.calibration is not None:
        c = recipe.calibration
        calib_factory = lambda: build_calibration(tok, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field,  # noqa: E731
                                                  c.split, c.subset, [], c.allow_eval_overlap)
    ctx = PassContext(adapter=adapter, device=comm.device, seed=recipe.calibration.seed if recipe.calibration else 0,
                      run_dir=output, calibration_factory=calib_factory, tokenizer=tok, resume=resume,
                      block_source=source, comm=comm)
    torch.manual_seed(ctx.seed)
    log.info("pass 1/1: %s %s (per block)", entry.name, entry.config.model_dump(mode="json"))
    rep = pass_.apply(model, ctx)
    if not comm.is_main:
        return RunResult(report={}, output=output)
    report: dict[str, Any] = {
        "version": _version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": recipe.model, "source": str(folder), "model_type": model.config.model_type,
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)},
        "output": str(output), "recipe": recipe.to_dict(), "environment": environment(),
        "load": {"strategy": "per_block", "reason": reason, "processes": comm.world_size,
                 "peak_rss_bytes": peak_rss_bytes(),
                 "gpu_peak_bytes": torch.cuda.max_memory_allocated(comm.device) if comm.device.type == "cuda" else None},
        "passes": [rep.to_dict()], "eval": {}, "warnings": warnings,
    }
    if ctx._calibration is not None:
        report["calibration"] = ctx.calibration.describe()
    if recipe.eval.roofline is not None:
        report["eval"]["roofline"] = roofline_for(model, recipe, original_config)
    report["checkpoint"] = {"path": str(output), "format": fmt}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    gptq_damp = getattr(entry.config, "dampening", None) if entry.name == "gptq" else None

    def files() -> dict[str, str]:
        return {"report.json": json.dumps(report, indent=2, default=str), "report.md": render_markdown(report),
                "recipe.yaml": recipe_yaml, "README.md": model_card(report, recipe_yaml)}

    report["warnings"] += writer.finish(model, adapter, tok, files(), gptq_damp, recipe.save.overwrite)
    report["checkpoint"]["size_bytes"] = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    report["sparsity"] = sparsity_report(output, report["passes"], adapter)
    for name, text in files().items():
        (output / name).write_text(text)
    log.info("done in %.1f s (per block, peak RSS %.0f MiB)", time.perf_counter() - t_start, peak_rss_bytes() / 2**20)
    return RunResult(report=report, output=output)
