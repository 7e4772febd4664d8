"""Recipes: YAML in, validated objects out, before any model is loaded.

YAML keys equal constructor arguments. ``--set a.b=c`` overrides edit the raw dict before
validation, so they get the same checks. Ordering rules between passes are checked here too.

Example::

    model: HuggingFaceTB/SmolLM2-135M-Instruct
    output: out/smollm2-w4g128
    calibration: {dataset: ../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl, nsamples: 128, seqlen: 2048, seed: 0}
    passes:
      - gptq: {bits: 4, group_size: 128, symmetric: true, act_order: true, dampening: 0.01}
    eval:
      perplexity: {dataset: wikitext2, seqlen: 2048, max_windows: null}
    save: {format: compressed-tensors}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from compress.errors import ConfigError
from compress.eval.roofline import RooflineSpec
from compress.eval.tasks import TasksSpec
from compress.passes.base import PassConfig, StrictModel

DEFAULT_CALIBRATION = "../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl"


class LoadSpec(StrictModel):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype the model is loaded and compressed in")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (cuda when available)")
    trust_remote_code: bool = Field(False, description="run model code shipped with the checkpoint")
    allow_pickle: bool = Field(False, description="allow .bin/.pt (pickle) weights; safetensors only by default")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    strategy: Literal["auto", "in_memory", "per_block"] = Field(
        "auto", description="in_memory: load the whole model; per_block: build it on the meta device and read, "
        "compress, write and free one decoder block at a time (models larger than memory); auto: per_block when "
        "the weights do not fit in free memory (the choice is logged and reported)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be cpu, cuda, cuda:N or auto")


class CalibrationSpec(StrictModel):
    dataset: str = Field(DEFAULT_CALIBRATION, description="local .txt/.jsonl file, or a `datasets` name")
    nsamples: int = Field(128, gt=0, description="number of calibration windows")
    seqlen: int = Field(2048, gt=0, description="tokens per window")
    seed: int = Field(0, ge=0, description="seed for window sampling")
    text_field: str | None = Field(None, description="jsonl/datasets field holding text (auto: text, prompt+response, query)")
    split: str = Field("train", description="split, for a `datasets` name")
    subset: str | None = Field(None, description="configuration name, for a `datasets` name")
    allow_eval_overlap: bool = Field(False, description="permit calibrating on the evaluation text (inflates results)")


class PerplexitySpec(StrictModel):
    dataset: str = Field("wikitext2", description="wikitext2 (the shared WikiText-2 test file) or a path to a .txt/.raw file")
    seqlen: int = Field(2048, gt=0, description="tokens per non-overlapping window")
    max_windows: int | None = Field(None, gt=0, description="score only the first N windows (partial run, said in the report)")
    original: bool = Field(True, description="also score the uncompressed model for comparison")


class EvalSpec(StrictModel):
    perplexity: PerplexitySpec | None = None
    roofline: RooflineSpec | None = None
    tasks: TasksSpec | None = None


class SaveSpec(StrictModel):
    format: Literal["compressed-tensors", "gptq", "dense", "none"] = Field(
        "compressed-tensors", description="checkpoint format of quantized models (unquantized models are saved "
        "dense); none writes only the reports")
    overwrite: bool = Field(False, description="replace an existing output folder")


class PassEntry(StrictModel):
    name: str
    config: PassConfig


class Recipe(StrictModel):
    model: str = Field(description="hub id, local folder, or .gguf file")
    output: str = Field(description="output folder (never the input folder)")
    calibration: CalibrationSpec | None = None
    passes: tuple[PassEntry, ...] = ()
    eval: EvalSpec = EvalSpec()
    save: SaveSpec = SaveSpec()
    load: LoadSpec = LoadSpec()

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, in the same shape as the YAML (pass entries as {name: config})."""
        d = self.model_dump(mode="json", exclude={"passes"})
        d["passes"] = [{p.name: p.config.model_dump(mode="json")} for p in self.passes]
        return d


# ---------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None, output: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides and ``--output``, validate. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with keys model, output, passes, ...")
    for ov in overrides or []:
        apply_override(raw, ov)
    if output is not None:
        raw["output"] = output
    return recipe_from_dict(raw)


def apply_override(raw: dict, override: str) -> None:
    """Edit ``raw`` in place for ``a.b.0.c=value`` (value parsed as YAML)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. passes.0.gptq.group_size=64")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, key, create=parts[i + 1])
    last = parts[-1]
    parsed = yaml.safe_load(value) if value != "" else None
    if isinstance(node, list):
        idx = _index(node, last, key)
        node[idx] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping or list")


def _step(node: Any, part: str, key: str, create: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if isinstance(node, dict):
        if node.get(part) is None:
            node[part] = [] if create.isdigit() else {}
        return node[part]
    raise ConfigError(f"--set {key}: cannot descend into {part!r}")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def recipe_from_dict(raw: dict) -> Recipe:
    from compress.registry import PASSES, get_pass_class

    raw = dict(raw)
    passes_raw = raw.pop("passes", None) or []
    if not isinstance(passes_raw, list):
        raise ConfigError("passes: must be a list like [{gptq: {bits: 4}}]")
    entries = []
    for i, item in enumerate(passes_raw):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"passes[{i}]: each pass is a mapping with one key, the pass name (known: {', '.join(PASSES)})")
        (name, opts), = item.items()
        cls = get_pass_class(str(name), where=f"passes[{i}]")
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise ConfigError(f"passes[{i}].{name}: options must be a mapping, got {opts!r}")
        try:
            cfg = cls.config_class(**opts)
        except ValidationError as e:
            raise ConfigError(_format(e, prefix=f"passes[{i}].{name}")) from None
        entries.append(PassEntry(name=str(name), config=cfg))
    try:
        recipe = Recipe(**raw, passes=tuple(entries))
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    except TypeError as e:  # e.g. a top-level key given twice
        raise ConfigError(str(e)) from None
    check_order(recipe)
    return recipe


def check_order(recipe: Recipe) -> None:
    """Declared ordering rules, checked before any work starts."""
    from compress.registry import get_pass_class

    kinds = [get_pass_class(p.name).kind for p in recipe.passes]
    names = [p.name for p in recipe.passes]
    for i, (name, kind) in enumerate(zip(names, kinds)):
        later, earlier = kinds[i + 1:], kinds[:i]
        if kind == "allocate" and "prune" not in later:
            raise ConfigError(f"passes[{i}].{name}: an allocation pass must be followed by a pruning pass that uses its plan")
        if kind in ("prune", "structure", "allocate") and "quantize" in earlier:
            j = earlier.index("quantize")
            raise ConfigError(f"passes[{i}].{name}: pruning must come before quantization (passes[{j}].{names[j]}); move it earlier")
        if kind == "finetune" and not any(k in ("prune", "structure") for k in earlier):
            raise ConfigError(f"passes[{i}].{name}: fine-tuning needs an earlier pruning or structural pass whose masks/shapes it keeps")
        if kind == "finetune" and "quantize" in earlier:
            j = earlier.index("quantize")
            raise ConfigError(f"passes[{i}].{name}: fine-tuning must come before quantization (passes[{j}].{names[j]}), "
                              "which leaves integer codes with nothing to train; move it earlier")
        if kind == "runtime" and later:
            raise ConfigError(f"passes[{i}].{name}: must be the last pass; a later pass changes the weights it "
                              "was calibrated on")
        cls = get_pass_class(name)
        # a pass whose need depends on its options says so through its config
        needs = getattr(recipe.passes[i].config, "needs_calibration", None)
        if needs is None:
            needs = getattr(cls, "needs_calibration", False)
        if needs and recipe.calibration is None:
            raise ConfigError(f"passes[{i}].{name}: needs calibration data; add `calibration: {{dataset: ..., nsamples: 128, seqlen: 2048}}`")
        if (recipe.save.format == "compressed-tensors" and getattr(recipe.passes[i].config, "act_order", False)
                and not getattr(recipe.passes[i].config, "static_groups", True)):
            raise ConfigError(f"passes[{i}].{name}.static_groups: false (act-order groups with g_idx) cannot be saved as "
                              "compressed-tensors, which dropped g_idx; keep static_groups: true or use save.format: gptq")
        uses_plan = getattr(recipe.passes[i].config, "sparsity", None) == "plan"
        if uses_plan and "allocate" not in earlier:
            raise ConfigError(f"passes[{i}].{name}.sparsity: 'plan' needs an earlier allocation pass (e.g. alpha_allocation)")
    if recipe.eval.tasks is not None and recipe.eval.tasks.early_exit and "early_exit" not in names:
        raise ConfigError("eval.tasks.early_exit: true needs an early_exit pass in passes (it calibrates the exits)")



def _format(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(e, err)
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        elif "input" in err and err["type"] not in ("missing",):
            msg += f" (got {err['input']!r})"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def _allowed_keys(e: ValidationError, err: dict) -> list[str]:
    model = _MODELS.get(e.title)
    if model is None:
        from compress.registry import PASSES

        for cls in PASSES.values():
            if cls.config_class.__name__ == e.title:
                model = cls.config_class
    if model is None:
        return []
    # descend into nested specs along the error location
    for part in err["loc"][:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, StrictModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


_MODELS = {m.__name__: m for m in (Recipe, LoadSpec, CalibrationSpec, PerplexitySpec, EvalSpec, SaveSpec, RooflineSpec, TasksSpec)}
