"""PNG plots for reports: sparsity per block (one run) and the Pareto front (a folder of runs).

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas directly, so
importing or calling this module never changes matplotlib's global backend or pyplot state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, sharex: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=sharex, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def plot_sparsity(section: dict[str, Any], path: str | Path) -> Path:
    """Per decoder block: α (top panel, when an allocation ran) and planned vs achieved sparsity.

    ``section`` is the ``sparsity`` section of report.json (``compress.eval.sparsity.summarize``).
    """
    blocks = section["per_block"]
    x = [b["block"] for b in blocks]
    has_alpha = any(b["alpha"] is not None for b in blocks)
    fig, axes = _figure(8, 5.5 if has_alpha else 3.5, rows=2 if has_alpha else 1, sharex=True)
    ax = axes[-1]
    if any(b["planned"] is not None for b in blocks):  # hollow and larger, so achieved shows through
        ax.plot(x, [b["planned"] if b["planned"] is not None else float("nan") for b in blocks], "s--",
                color="C1", mfc="none", ms=9, label="planned")
    ax.plot(x, [b["sparsity"] for b in blocks], "o-", color="C0", ms=4, label="achieved (saved weights)")
    # each module's achieved sparsity as a small dot: the spread inside a block
    mods = [m for m in section["per_module"].values() if m.get("block") is not None]
    if mods:
        ax.scatter([m["block"] for m in mods], [m["sparsity"] for m in mods], s=6, color="grey", alpha=0.5,
                   label="achieved, each linear layer", zorder=1)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (fraction of zeros)")
    top_value = max([b["sparsity"] for b in blocks] + [b["planned"] or 0.0 for b in blocks]
                    + [m["sparsity"] for m in mods])
    ax.set_ylim(0, max(1e-3, top_value * 1.15))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if has_alpha:
        top = axes[0]
        top.plot(x, [b["alpha"] if b["alpha"] is not None else float("nan") for b in blocks], "o-", color="C2")
        top.set_ylabel("α (ESD tail exponent)")
        top.grid(alpha=0.3)
        top.set_title("AlphaPruning: heavier tails (smaller α) get less sparsity", fontsize=9)
    fig.suptitle(f"Sparsity per block: achieved {section['overall']:.3f}"
                 + (f", planned {section['planned']['overall']:.3f}" if section.get("planned") else ""), fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _plain_log_labels(axis: Any, values: list[float]) -> None:
    """Label a log axis with plain numbers (12.5, not 1.25×10¹): every minor tick within one decade,
    the 2× and 5× ticks over wider ranges."""
    import math

    from matplotlib.ticker import FuncFormatter

    positive = [v for v in values if v > 0]
    narrow = bool(positive) and max(positive) / min(positive) < 10

    def minor(v: float, _pos: int) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:.4g}" if narrow or mantissa in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def plot_pareto(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels: perplexity vs estimated decode speedup, perplexity vs checkpoint size (MB).

    Each run dict has ``name``, ``perplexity``, ``speedup``, ``size_mb``, ``pareto_speed``,
    ``pareto_size``, ``comparable`` and ``speed_comparable`` (False: perplexity or roofline settings
    differ from the reference; drawn hollow and left off that front). Perplexity is on a log axis;
    every point is labelled; front points are red.
    """
    fig, (ax_s, ax_m) = _figure(12, 5, cols=2)
    panels = ((ax_s, "speedup", "pareto_speed", "speed_comparable", "estimated decode speedup (×, higher is better)",
               False),
              (ax_m, "size_mb", "pareto_size", None, "checkpoint size (MB, lower is better)", True))
    for ax, key, front_key, also, xlabel, xlog in panels:
        pts = [r for r in runs if r.get(key) is not None and r.get("perplexity") is not None]
        for r in pts:
            filled = r.get("comparable", True) and (also is None or r.get(also, True))
            color = "C3" if r.get(front_key) else "C0" if filled else "grey"
            ax.scatter([r[key]], [r["perplexity"]], s=40, zorder=3, facecolors=color if filled else "none",
                       edgecolors=color)
            ax.annotate(r["name"], (r[key], r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = sorted((r for r in pts if r.get(front_key)), key=lambda r: r[key])
        if front:
            ax.plot([r[key] for r in front], [r["perplexity"] for r in front], "-", color="C3", alpha=0.6,
                    label="Pareto front")
            ax.legend(loc="best", fontsize=8)
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis, [r["perplexity"] for r in pts])
        if xlog:
            ax.set_xscale("log")
            _plain_log_labels(ax.xaxis, [r[key] for r in pts])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log, lower is better)")
        ax.grid(alpha=0.3, which="both")
        if not pts:
            ax.text(0.5, 0.5, "no runs with both values", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Quality vs estimated speed and size (red: Pareto front; hollow: measured differently, "
                 "left off the front)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
