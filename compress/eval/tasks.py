"""Zero-shot (or few-shot) accuracy through lm-eval's harness, on an in-memory transformers model.

Tasks named in ``LOCAL_TASKS`` run offline on the shared jsonl files (llm-foundry's format) through
the task YAMLs under ``eval/tasks/`` of the repository. Those YAMLs rebuild exactly the prompts of
lm-eval's standard tasks (see docs/zero-shot.md), so the numbers are comparable with published
lm-eval numbers. Any other name goes to lm-eval's own task registry unchanged (that needs the
Hugging Face hub for the data), and ``lm_eval:NAME`` forces that even for a local name.

Recipe snippet::

    eval:
      tasks: {names: [arc_easy, piqa], limit: null, num_fewshot: 0, batch_size: 8}

Python::

    res = run_tasks(model, tokenizer, ["arc_easy", "piqa"], limit=100)
    print(res.to_markdown())

lm-eval is an optional dependency (``pip install 'compress[eval]'``); it is imported only when a
run starts.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field, ValidationError, field_validator

from compress.errors import CompressError
from compress.passes.base import StrictModel

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: lm-eval task YAMLs and their prompt helpers (utils.py) for the local data.
TASK_DEFS_DIR = REPO_ROOT / "eval" / "tasks"
#: Where the task jsonl files are by default, relative to the repository root.
DEFAULT_ASSETS_DIR = "../shared/assets/data/tasks"
#: Names starting with this go to lm-eval's registry even when a local task has the same name.
LM_EVAL_PREFIX = "lm_eval:"
DEFAULT_BATCH_SIZE = 8
# lm-eval bootstraps only metrics without a closed-form stderr (here: lambada's perplexity);
# 1000 draws give that stderr to about 2% and take seconds, against minutes for lm-eval's 100000.
DEFAULT_BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class LocalTask:
    """A task YAML in ``eval/tasks/`` and the lm-eval task whose prompts it reproduces."""

    yaml_file: str
    mirrors: str | None  # None: no lm-eval task gives comparable numbers


# The one place local tasks are registered (names follow lm-eval's where the task mirrors one).
LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask("arc_easy.yaml", "arc_easy"),
    "arc_challenge": LocalTask("arc_challenge.yaml", "arc_challenge"),
    "piqa": LocalTask("piqa.yaml", "piqa"),
    "winogrande": LocalTask("winogrande.yaml", "winogrande"),
    "boolq": LocalTask("boolq.yaml", "boolq"),
    "lambada_openai": LocalTask("lambada_openai.yaml", "lambada_openai"),
    "openbookqa": LocalTask("openbookqa.yaml", "openbookqa"),
    "copa": LocalTask("copa.yaml", "copa"),
    # llm-foundry's variants keep fewer options than the originals: not lm-eval's siqa/commonsense_qa.
    "foundry_siqa": LocalTask("foundry_siqa.yaml", None),
    "foundry_commonsense_qa": LocalTask("foundry_commonsense_qa.yaml", None),
}
#: Other spellings of local names (the shared data file is openbook_qa.jsonl).
ALIASES: dict[str, str] = {"openbook_qa": "openbookqa"}


def canonical_name(name: str) -> str:
    """The name results are reported under: aliases resolved, everything else unchanged."""
    return ALIASES.get(name, name)


def is_local(name: str) -> bool:
    return not name.startswith(LM_EVAL_PREFIX) and canonical_name(name) in LOCAL_TASKS


def _local_names_text() -> str:
    aliases = ", ".join(f"{a} (= {c})" for a, c in ALIASES.items())
    return f"{', '.join(LOCAL_TASKS)}; aliases: {aliases}"


class TasksSpec(StrictModel):
    """``eval.tasks`` of a recipe. Names not in LOCAL_TASKS are looked up in lm-eval's own registry
    when the run starts (they need the Hugging Face hub for their data)."""

    names: list[str] = Field(
        min_length=1,
        description="local tasks (arc_easy, arc_challenge, piqa, winogrande, boolq, lambada_openai, "
        "openbookqa, copa, foundry_siqa, foundry_commonsense_qa) or any lm-eval task name "
        "(needs the hub; prefix lm_eval: to prefer lm-eval's task over a local one)",
    )
    limit: int | None = Field(None, gt=0, description="score only the first N examples of each task (partial run)")
    num_fewshot: int = Field(0, ge=0, description="demonstrations per prompt; local tasks draw them from the scored split")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, gt=0, description="loglikelihood requests per forward pass")
    assets_dir: str | None = Field(None, description=f"folder of the task jsonl files (default {DEFAULT_ASSETS_DIR}, relative to the repository)")
    early_exit: bool = Field(False, description="also score the compressed model with the recipe's early_exit policy "
                             "(lossy mode): accuracy with and without, agreement, executed layers, FLOPs")

    @field_validator("names")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in names:
            if not name.strip() or name == LM_EVAL_PREFIX:
                raise ValueError(f"empty task name; local tasks: {_local_names_text()}")
            key = canonical_name(name)
            if key in seen:
                raise ValueError(f"task {name!r} is listed twice")
            seen.add(key)
        external = [n for n in names if not is_local(n)]
        if external:
            # Not an error yet: lm-eval's registry decides when the run starts (before the model is scored).
            log.info("tasks %s are not local: they go to lm-eval's task registry and need the hub", external)
        return names


def _checked_spec(**kwargs: Any) -> TasksSpec:
    """TasksSpec for the Python API: a bad argument is a CompressError naming the field."""
    try:
        return TasksSpec(**kwargs)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'tasks'}: {err['msg']}" for err in e.errors())
        raise CompressError(f"tasks: {problems}") from None


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedTask:
    """A requested name and what is handed to lm-eval for it."""

    name: str  # as reported
    lm_eval_name: str  # the task name inside lm-eval's results
    spec: str | dict[str, Any]  # registry name, or a full task config for local tasks
    mirrors: str | None
    source: str  # "local" or "lm-eval"


def resolve_assets_dir(assets_dir: str | os.PathLike[str] | None) -> Path:
    """``assets_dir`` as given (relative paths against the working directory), or the default
    ``../shared/assets/data/tasks`` relative to the repository root."""
    if assets_dir is None:
        return (REPO_ROOT / DEFAULT_ASSETS_DIR).resolve()
    return Path(assets_dir).expanduser().resolve()


def _load_helpers() -> ModuleType:
    path = TASK_DEFS_DIR / "utils.py"
    spec = importlib.util.spec_from_file_location("compress_eval_task_helpers", path) if path.is_file() else None
    if spec is None or spec.loader is None:
        raise CompressError(f"task helpers not found at {path}: the local tasks need the repository's eval/tasks/ folder")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _yaml_loader(helpers: ModuleType) -> type[yaml.SafeLoader]:
    """A safe YAML loader that resolves lm-eval's ``!function utils.NAME`` tags to our helpers."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        qual = loader.construct_scalar(node)  # type: ignore[arg-type]
        module, _, attr = str(qual).rpartition(".")
        if module != "utils" or not callable(getattr(helpers, attr, None)):
            raise CompressError(f"task YAML names !function {qual}, which eval/tasks/utils.py does not define")
        return getattr(helpers, attr)

    Loader.add_constructor("!function", function)
    return Loader


def local_task_config(name: str, assets_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The lm-eval task config of a local task, its data file pointed into ``assets_dir``."""
    task = LOCAL_TASKS[canonical_name(name)]
    path = TASK_DEFS_DIR / task.yaml_file
    if not path.is_file():
        raise CompressError(f"task definition {path} is missing: the local tasks need the repository's eval/tasks/ folder")
    cfg = yaml.load(path.read_text(), Loader=_yaml_loader(_load_helpers()))  # noqa: S506 (SafeLoader subclass)
    data_file = resolve_assets_dir(assets_dir) / Path(cfg["dataset_kwargs"]["data_files"]["test"]).name
    if not data_file.is_file():
        raise CompressError(
            f"data for task {name!r} not found: {data_file}; set assets_dir (eval.tasks.assets_dir, "
            f"--assets-dir) to the folder holding the task jsonl files (default {DEFAULT_ASSETS_DIR})"
        )
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    return cfg


def _task_manager(external: bool) -> Any:
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own few thousand YAMLs takes ~15 s on 2 cores: only when a name needs it.
    return TaskManager(include_defaults=external)


def resolve_tasks(
    names: list[str], assets_dir: str | os.PathLike[str] | None = None, task_manager: Any = None
) -> tuple[list[ResolvedTask], Any]:
    """Check every name and build what lm-eval needs, without a model. Raises CompressError for a
    name that is neither local nor in lm-eval's registry, or for missing data files.

    Returns the resolved tasks and the lm-eval TaskManager to run them with.
    """
    _require_lm_eval()
    _checked_spec(names=list(names))  # same checks as a recipe (empty, duplicates)
    resolved: list[ResolvedTask] = []
    external = [n for n in names if not is_local(n)]
    tm = task_manager if task_manager is not None else _task_manager(external=bool(external))
    for name in names:
        if is_local(name):
            cfg = local_task_config(name, assets_dir)
            resolved.append(
                ResolvedTask(canonical_name(name), cfg["task"], cfg, LOCAL_TASKS[canonical_name(name)].mirrors, "local")
            )
            continue
        lm_name = name.removeprefix(LM_EVAL_PREFIX)
        if lm_name not in tm.all_tasks:
            raise CompressError(
                f"unknown task {name!r}: not a local task ({_local_names_text()}) and not in lm-eval's "
                f"task registry (see `lm_eval ls tasks`)"
            )
        log.info("task %s goes to lm-eval's registry (its data comes from the Hugging Face hub)", lm_name)
        resolved.append(ResolvedTask(name, lm_name, lm_name, lm_name, "lm-eval"))
    return resolved, tm


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise CompressError("task evaluation needs lm-eval: pip install 'compress[eval]' (lm-eval>=0.4.9)")


# ---------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    """One task's scores. Metrics a task does not define are None (boolq has no acc_norm)."""

    name: str
    source: str  # "local" or "lm-eval"
    mirrors: str | None  # lm-eval task with the same prompts (None: not comparable)
    n: int  # examples scored
    n_total: int  # examples in the task
    partial: bool  # limit cut the task short
    num_fewshot: int
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None
    perplexity_stderr: float | None = None


@dataclass
class TaskResults:
    tasks: list[TaskResult]
    limit: int | None
    num_fewshot: int
    batch_size: int
    seconds: float
    lm_eval_version: str
    assets_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return any(t.partial for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["partial"] = self.partial
        return d

    def to_markdown(self) -> str:
        """A table for reports: value ± standard error; "partial" marks tasks cut by ``limit``."""
        lines = [
            "| task | n | acc | acc_norm | perplexity | mirrors lm-eval |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for t in self.tasks:
            n = f"{t.n}/{t.n_total} (partial)" if t.partial else str(t.n)
            lines.append(
                f"| {t.name} | {n} | {_pm(t.acc, t.acc_stderr)} | {_pm(t.acc_norm, t.acc_norm_stderr)} "
                f"| {_pm(t.perplexity, t.perplexity_stderr, 2)} | {t.mirrors or 'no (not comparable)'} |"
            )
        shots = f"{self.num_fewshot}-shot" if self.num_fewshot else "zero-shot"
        lines.append("")
        lines.append(f"{shots}, lm-eval {self.lm_eval_version}, batch size {self.batch_size}, {self.seconds:.0f} s")
        return "\n".join(lines)


def _pm(value: float | None, stderr: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f} ± {stderr:.{digits}f}" if stderr is not None else f"{value:.{digits}f}"


def _metric(row: dict[str, Any], key: str) -> float | None:
    value = row.get(f"{key},none")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None  # absent, or lm-eval's "N/A" for an stderr it did not compute


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of one call, then restore them exactly."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _no_download_counts() -> Iterator[None]:
    """Stop ``datasets`` from pinging its S3 bucket to count a "download" each time a local json
    file is loaded (a 3 s timeout per task where the network is firewalled). datasets reads its
    environment variable at import, so the module setting is switched for this call and restored."""
    import datasets.config

    old = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = old


def run_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    assets_dir: str | os.PathLike[str] | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
) -> TaskResults:
    """Score ``model`` on ``names`` with lm-eval's ``simple_evaluate`` (loglikelihood of each choice).

    ``limit`` scores the first N examples of each task (results say ``partial``). The model is put in
    eval mode for the run and its training flag restored afterwards; the model stays on its device.
    lm-eval's global seeding (python, numpy, torch) is switched off: zero-shot scoring draws no
    random numbers, and few-shot demonstrations use lm-eval's own seeded sampler.
    """
    spec = _checked_spec(names=list(names), limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    if bootstrap_iters < 1:
        raise CompressError(f"bootstrap_iters must be >= 1 (got {bootstrap_iters}); lm-eval drops every stderr at 0")
    resolved, tm = resolve_tasks(spec.names, assets_dir)

    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    start = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        # DISABLE_MULTIPROC keeps lm-eval's bootstrap in this process instead of a pool of one
        # worker per core (the machines are shared; the result does not depend on it).
        with _scoped_env({"DISABLE_MULTIPROC": "1"}), _no_download_counts():
            out = simple_evaluate(
                model=lm,
                tasks=[r.spec for r in resolved],
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=tm,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if out is None:  # only on non-zero ranks of a distributed launch, which we never start
        raise CompressError("lm-eval returned no results")
    return _collect(out, resolved, spec, seconds, lm_eval.__version__, resolve_assets_dir(assets_dir))


def _collect(
    out: dict[str, Any], resolved: list[ResolvedTask], spec: TasksSpec, seconds: float, version: str, assets: Path
) -> TaskResults:
    results: dict[str, dict[str, Any]] = out["results"]
    n_samples: dict[str, dict[str, int]] = out.get("n-samples", {})
    n_shot: dict[str, int] = out.get("n-shot", {})
    rows: list[TaskResult] = []
    for r in resolved:
        # A group name (e.g. an lm-eval benchmark suite) expands into subtasks: report each leaf.
        leaves = [r.lm_eval_name] if r.lm_eval_name in n_samples else sorted(
            k for k in out.get("group_subtasks", {}).get(r.lm_eval_name, []) if k in n_samples
        )
        if not leaves:
            raise CompressError(f"lm-eval returned no scored examples for task {r.name!r}")
        for leaf in leaves:
            row, counts = results[leaf], n_samples[leaf]
            rows.append(
                TaskResult(
                    name=r.name if leaf == r.lm_eval_name else leaf,
                    source=r.source,
                    mirrors=r.mirrors if leaf == r.lm_eval_name else leaf,
                    n=int(counts["effective"]),
                    n_total=int(counts["original"]),
                    partial=int(counts["effective"]) < int(counts["original"]),
                    num_fewshot=int(n_shot.get(leaf, spec.num_fewshot)),
                    acc=_metric(row, "acc"),
                    acc_stderr=_metric(row, "acc_stderr"),
                    acc_norm=_metric(row, "acc_norm"),
                    acc_norm_stderr=_metric(row, "acc_norm_stderr"),
                    perplexity=_metric(row, "perplexity"),
                    perplexity_stderr=_metric(row, "perplexity_stderr"),
                )
            )
    return TaskResults(
        tasks=rows,
        limit=spec.limit,
        num_fewshot=spec.num_fewshot,
        batch_size=spec.batch_size,
        seconds=seconds,
        lm_eval_version=version,
        assets_dir=str(assets),
    )
