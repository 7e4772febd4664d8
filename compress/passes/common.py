"""Pieces shared by passes: the `ignore` matcher and the calibrated-pass driver."""
from __future__ import annotations

import fnmatch
import re
import time
from typing import Any, Callable

import torch
from torch import nn

from compress.context import PassContext, PassReport
from compress.sequential import run_sequential


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """``name`` matches a pattern: exact, last-component(s) suffix, glob, or ``re:REGEX``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p):
            return True
    return False


def select_linear(name: str, module: nn.Module, ignore: list[str], ignored: list[str]) -> bool:
    """True when a pass should touch ``module``; ignored names are recorded for the report."""
    if matches(name, ignore):
        ignored.append(name)
        return False
    if not isinstance(module, nn.Linear):
        from compress.errors import ConfigError

        raise ConfigError(f"{name} is {type(module).__name__}, not nn.Linear; add it to `ignore` to skip it")
    return True


def linear_names_outside_blocks(model: nn.Module, blocks_path: str) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.startswith(blocks_path + ".")]


def run_calibrated(model: nn.Module, ctx: PassContext, handler: Any, desc: str) -> dict[str, dict[str, Any]]:
    return run_sequential(model, ctx.adapter, ctx.calibration.input_ids, handler, ctx.device, desc=desc,
                          source=ctx.block_source, comm=ctx.comm)


def timed_report(name: str, config: Any, fn: Callable[[PassReport], None]) -> PassReport:
    report = PassReport(name=name, config=config.model_dump(mode="json"))
    t0 = time.perf_counter()
    fn(report)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def mean_of(modules: dict[str, dict[str, Any]], key: str) -> float | None:
    vals = [m[key] for m in modules.values() if m.get(key) is not None]
    return float(sum(vals) / len(vals)) if vals else None


def count_zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())
