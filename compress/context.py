"""PassContext (what passes share during a run) and PassReport (what each pass returns)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from compress.adapters import Adapter
    from compress.calibration import CalibrationData


@dataclass
class PassReport:
    """Result of one pass: serializable to JSON for report.json."""

    name: str
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    #: per-module statistics, e.g. {"model.layers.0.mlp.down_proj": {"rel_output_error": 0.01}}
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


@dataclass
class PassContext:
    """Everything a pass may need besides the model. Built once per run by ``compress.runner``.

    ``calibration`` is built lazily on first use and shared by all passes of the run.
    ``sparsity_plan`` maps module names to sparsity ratios; allocation passes write it and pruning
    passes with ``sparsity: plan`` read it.
    """

    adapter: "Adapter"
    device: torch.device
    seed: int = 0
    run_dir: Path | None = None
    calibration_factory: Any = None  # () -> CalibrationData
    sparsity_plan: dict[str, float] | None = None
    plan_info: dict[str, Any] = field(default_factory=dict)
    #: the run's tokenizer (fine-tuning passes tokenize their own text)
    tokenizer: Any = None
    #: () -> a fresh copy of the model as it was before the first pass (re-loaded, so nothing holds it until
    #: a pass asks): the distillation teacher of ``sparse_finetune``
    teacher_factory: Any = None
    #: the run's evaluation texts, which training and calibration text must not contain
    eval_texts: list[str] = field(default_factory=list)
    #: continue from the training checkpoints of an interrupted run (``compress run --resume``)
    resume: bool = False
    #: index of the pass being applied in the recipe (names its checkpoint folder)
    pass_index: int = 0
    #: per-block loading: materializes each block before a pass touches it and writes it after
    #: (``compress.streaming.BlockStream``); None when the whole model is in memory
    block_source: Any = None
    #: the processes of a distributed run (``compress.distributed.Comm``); None: one process
    comm: Any = None
    #: objects a pass leaves to be written beside the checkpoint once it is saved (``obj.save(folder) ->
    #: warnings``), by name; the early_exit pass puts its EarlyExit here
    artifacts: dict[str, Any] = field(default_factory=dict)
    _calibration: "CalibrationData | None" = None

    @property
    def calibration(self) -> "CalibrationData":
        if self._calibration is None:
            if self.calibration_factory is None:
                from compress.errors import ConfigError

                raise ConfigError("this pass needs calibration data: add a `calibration:` section to the recipe")
            self._calibration = self.calibration_factory()
        return self._calibration

    @property
    def has_calibration(self) -> bool:
        return self._calibration is not None or self.calibration_factory is not None
