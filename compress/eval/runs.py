"""Compare a folder of runs: one row per report.json, Pareto fronts, summary.md / summary.json / pareto.png.

``compress report RUNS_DIR`` calls ``summarize_runs``. Every number in a row comes from the run's
report.json, except two that older or partial reports may lack:

- estimated decode speedup: the report's roofline when the recipe had ``eval.roofline``; otherwise
  (or with ``recompute=True``) the roofline estimate for ``device`` with default task settings
  (prompt 1024, generate 128, batch 1, float16) from the saved config.json and the compression read
  from the checkpoint's quantization config and the recipe's pruning passes. The speedup is always
  against the original model's shape. Reports whose roofline baseline records its ``params`` were
  estimated against the original already; older reports of structural runs estimated it from the pruned
  shape, so their baseline is estimated again here from the original config. The row says which source
  it used.
- parameters: the structural pass's ``params_after`` when one ran, else the report's model count.

Runs are comparable only when measured alike: the most common perplexity setting (dataset, seqlen,
windows scored) is the reference, runs with another are flagged and left off the fronts; the same for
roofline settings (device, prompt, generate, batch, dtype, KV cache) and the speedup front.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from compress.errors import CompressError

log = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = 3


# ------------------------------------------------------------------------------------------------
def find_runs(root: str | Path, max_depth: int = DEFAULT_MAX_DEPTH) -> list[Path]:
    """Folders holding a report.json: ``root`` itself and subfolders up to ``max_depth`` levels below it.

    A run folder is not searched further (runs do not nest); hidden folders (``.out.tmp-*`` that an
    interrupted save leaves) are skipped.
    """
    root = Path(root)
    if not root.exists():
        raise CompressError(f"runs folder not found: {root}")
    if not root.is_dir():
        raise CompressError(f"not a folder: {root} (give the folder that holds the run folders)")
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / "report.json").is_file():
            found.append(folder)
            return
        if depth >= max_depth:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except PermissionError:
            log.warning("cannot read %s; skipped", folder)
            return
        for e in entries:
            if e.is_dir() and not e.name.startswith("."):
                walk(Path(e.path), depth + 1)

    walk(root, 0)
    if not found:
        raise CompressError(f"no report.json found in {root} or its subfolders up to {max_depth} levels deep "
                            "(compress run writes one into each output folder; see --max-depth)")
    return found


def read_report(path: Path) -> dict[str, Any]:
    """A run's report.json; CompressError naming the file when it is not a compress report."""
    try:
        rep = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressError(f"cannot read {path}: {e}") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("model"), dict) or not isinstance(rep.get("recipe"), dict):
        raise CompressError(f"{path} is not a compress report (needs the 'model' and 'recipe' sections)")
    return rep


# ------------------------------------------------------------------------------------------------
def pareto_mask(quality: Sequence[float | None], other: Sequence[float | None], maximize_other: bool) -> list[bool]:
    """True for points no other point dominates; ``quality`` (perplexity) is minimized, ``other`` is
    maximized (speedup) or minimized (size). A point dominates when it is no worse in both and better in
    one; points with a missing value are never on the front."""
    pts = [(q, -o if maximize_other else o) if q is not None and o is not None else None
           for q, o in zip(quality, other)]
    out = []
    for i, p in enumerate(pts):
        if p is None:
            out.append(False)
            continue
        dominated = any(q is not None and j != i and q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
                        for j, q in enumerate(pts))
        out.append(not dominated)
    return out


def reference_key(keys: Sequence[str | None]) -> str | None:
    """The most common setting (ties: the one met first); runs with another one are not comparable."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(k for k in keys if k is not None and counts[k] == top)


# ------------------------------------------------------------------------------------------------
def _pass_kind(name: str) -> str | None:
    from compress.registry import PASSES

    cls = PASSES.get(name)
    return getattr(cls, "kind", None)


def _pct(x: Any) -> str:
    return f"{float(x) * 100:g}%"


def describe_passes(recipe_passes: list[dict[str, Any]]) -> str:
    """Short text such as ``wanda 50% → gptq w4g128`` from the recipe's pass list."""
    parts = []
    for entry in recipe_passes:
        (name, cfg), = entry.items()
        cfg = cfg or {}
        if "bits" in cfg:
            gs = cfg.get("group_size")
            parts.append(f"{name} w{cfg['bits']}" + ("ch" if gs == -1 else f"g{gs}" if gs else ""))
        elif name == "alpha_allocation":
            parts.append(f"alpha {_pct(cfg['target_sparsity'])}")
        elif cfg.get("mask") not in (None, "unstructured"):
            parts.append(f"{name} {cfg['mask']}")
        elif "sparsity" in cfg:
            s = cfg["sparsity"]
            parts.append(f"{name} {s}" if isinstance(s, str) else f"{name} {_pct(s)}")
        elif name == "width_prune":
            parts.append(f"width mlp {_pct(cfg.get('mlp_ratio', 0))} heads {_pct(cfg.get('head_ratio', 0))}")
        elif name == "depth_prune":
            parts.append(f"depth -{cfg.get('num_blocks')} blocks")
        else:
            parts.append(name)
    return " → ".join(parts) if parts else "none (original)"


def _ppl(report: dict[str, Any]) -> tuple[float | None, float | None, str | None, str | None]:
    p = report.get("eval", {}).get("perplexity") or {}
    comp, orig = p.get("compressed"), p.get("original")
    ref = comp or orig
    key = text = None
    if ref:
        key = f"{ref['dataset']} @ {ref['seqlen']}, {ref['windows']}/{ref['total_windows']} windows"
        text = key + (" (partial)" if ref.get("partial") else "")
    return (orig or {}).get("perplexity"), (comp or {}).get("perplexity"), key, text


def _tasks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t = report.get("eval", {}).get("tasks") or {}
    out: dict[str, dict[str, Any]] = {}
    for side in ("original", "compressed"):
        for row in (t.get(side) or {}).get("tasks", []):
            d = out.setdefault(row["name"], {"n": row.get("n"), "n_total": row.get("n_total")})
            d[side] = row.get("acc")
            d[f"{side}_norm"] = row.get("acc_norm")
    return out


def _params(report: dict[str, Any]) -> int | None:
    for p in reversed(report.get("passes", [])):
        after = (p.get("summary") or {}).get("params_after")
        if after is not None:
            return int(after)
    return report["model"].get("parameters")


def _size(report: dict[str, Any], run_dir: Path) -> int | None:
    size = (report.get("checkpoint") or {}).get("size_bytes")
    if size is None:
        files = list(run_dir.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files) if files else None
    return size or None


# ------------------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _structural(report: dict[str, Any]) -> bool:
    return any(_pass_kind(next(iter(e))) == "structure" for e in report["recipe"].get("passes", []))


def original_config(report: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The uncompressed model's config: from the source folder, or (when no pass changed shapes) the
    saved config less its quantization section."""
    src = report["model"].get("source")
    if src:
        cfg = _load_json(Path(src).expanduser() / "config.json")
        if cfg is not None:
            return cfg
    if _structural(report):
        return None
    cfg = _load_json(run_dir / "config.json")
    if cfg is not None:
        cfg.pop("quantization_config", None)
    return cfg


def compression_from(report: dict[str, Any], saved_config: dict[str, Any]) -> dict[str, Any] | None:
    """Roofline compression settings of a saved run: weight bits from the checkpoint's quantization
    config, sparsity from the recipe's pruning passes (as the runner gives them to the roofline)."""
    comp: dict[str, Any] = {}
    q = saved_config.get("quantization_config") or {}
    if q.get("quant_method") == "gptq":
        comp.update(weight_bits=q["bits"], group_size=q["group_size"], symmetric=bool(q["sym"]))
    elif q.get("quant_method") == "compressed-tensors":
        w = next(iter(q["config_groups"].values()))["weights"]
        comp.update(weight_bits=w["num_bits"], group_size=-1 if w["strategy"] == "channel" else w["group_size"],
                    symmetric=bool(w["symmetric"]))
    for entry in report["recipe"].get("passes", []):
        (name, cfg), = entry.items()
        cfg = cfg or {}
        if cfg.get("mask") == "2:4":
            comp["sparsity"] = "2:4"
        elif _pass_kind(name) == "prune" and isinstance(cfg.get("sparsity"), float) and cfg["sparsity"] > 0:
            comp["sparsity"] = cfg["sparsity"]
    return comp or None


def roofline_key(spec: dict[str, Any]) -> str:
    """The settings that make two speedup estimates comparable; the device by its catalog name, not alias."""
    from compress.eval.roofline_devices import load_device

    device = spec.get("device", "h100")
    try:
        device = load_device(device, tuple(spec.get("device_files") or ())).name
    except CompressError:
        pass  # a device file that moved since the run: compare by the name the recipe gave
    return (f"{device} p{spec.get('prompt', 1024)} g{spec.get('generate', 128)} "
            f"b{spec.get('batch', 1)} {spec.get('dtype', 'float16')} kv:{spec.get('kv_cache', 'static')}")


def baseline_is_original(roofline: dict[str, Any]) -> bool:
    """Whether a report's roofline baseline is the original model: reports written since the runner
    passes the pre-pass config record the baseline's ``params``; older ones used the compressed shape."""
    return (roofline.get("baseline") or {}).get("params") is not None


def estimate_speedup(report: dict[str, Any], run_dir: Path, device: str, recompute: bool = False
                     ) -> dict[str, Any]:
    """``{"speedup", "decode_ms", "source", "key", "note"}`` for one run (see the module docstring)."""
    from compress.eval.roofline import estimate

    rf = report.get("eval", {}).get("roofline")
    spec_raw = (report["recipe"].get("eval") or {}).get("roofline")
    out: dict[str, Any] = {"speedup": None, "decode_ms": None, "source": None, "key": None, "note": None}
    base_cfg = original_config(report, run_dir)
    if rf and spec_raw and not recompute:
        out.update(decode_ms=rf["decode_ms_per_token"], key=roofline_key(spec_raw))
        if rf.get("speedup_decode") is not None and (baseline_is_original(rf) or not _structural(report)):
            return {**out, "speedup": rf["speedup_decode"], "source": "report"}
        if base_cfg is None:
            return {**out, "note": "original config not found (model.source); speedup unknown"}
        base = estimate(base_cfg, spec_raw).decode_ms_per_token
        return {**out, "speedup": base / rf["decode_ms_per_token"], "source": "report, baseline estimated"}
    spec = {"device": device}
    out["key"] = roofline_key(spec)
    saved = _load_json(run_dir / "config.json")
    if saved is None:
        return {**out, "note": "no saved config.json and no roofline in the report"}
    if base_cfg is None:
        return {**out, "note": "original config not found (model.source); speedup unknown"}
    comp = compression_from(report, saved)
    saved = {k: v for k, v in saved.items() if k != "quantization_config"}
    ms = estimate(saved, spec, comp).decode_ms_per_token
    base = estimate(base_cfg, spec).decode_ms_per_token
    return {**out, "speedup": base / ms, "decode_ms": ms, "source": "computed"}


# ------------------------------------------------------------------------------------------------
def run_row(run_dir: Path, root: Path, device: str, recompute: bool) -> dict[str, Any]:
    report = read_report(run_dir / "report.json")
    ppl_o, ppl_c, ppl_key, ppl_text = _ppl(report)
    size = _size(report, run_dir)
    try:
        sp = estimate_speedup(report, run_dir, device, recompute)
    except CompressError as e:  # e.g. an architecture the roofline table lacks: this row only, said in its notes
        sp = {"speedup": None, "decode_ms": None, "source": None, "key": None, "note": f"no speedup estimate: {e}"}
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.resolve().name
    sparsity = report.get("sparsity") or {}
    return {
        "name": name, "path": str(run_dir), "model": report["model"].get("name"),
        "passes": describe_passes(report["recipe"].get("passes", [])),
        "perplexity_original": ppl_o, "perplexity": ppl_c, "perplexity_key": ppl_key, "perplexity_scope": ppl_text,
        "tasks": _tasks(report),
        "format": (report.get("checkpoint") or {}).get("format"), "size_bytes": size,
        "size_mb": size / 1e6 if size else None, "parameters": _params(report),
        # pruning level; a quantized-only model's rounding zeros stay in zero_fraction
        "sparsity": sparsity.get("overall") if sparsity.get("shown") else None,
        "zero_fraction": sparsity.get("overall"),
        "speedup": sp["speedup"], "decode_ms_per_token": sp["decode_ms"], "speedup_source": sp["source"],
        "roofline_key": sp["key"], "notes": [sp["note"]] if sp["note"] else [],
    }


def mark_fronts(rows: list[dict[str, Any]]) -> dict[str, str | None]:
    """Set ``comparable``, ``speed_comparable``, ``pareto_speed`` and ``pareto_size`` on each row."""
    ppl_ref = reference_key([r["perplexity_key"] for r in rows])
    roof_ref = reference_key([r["roofline_key"] for r in rows if r["speedup"] is not None])
    for r in rows:
        r["comparable"] = r["perplexity_key"] is not None and r["perplexity_key"] == ppl_ref
        r["speed_comparable"] = r["speedup"] is not None and r["roofline_key"] == roof_ref
        if r["perplexity_key"] is not None and not r["comparable"]:
            r["notes"].append(f"perplexity measured on {r['perplexity_key']}, not {ppl_ref}: not comparable")
        if r["speedup"] is not None and not r["speed_comparable"]:
            r["notes"].append(f"speedup estimated for {r['roofline_key']}, not {roof_ref}: not comparable")
    q = [r["perplexity"] if r["comparable"] else None for r in rows]
    speed = pareto_mask(q, [r["speedup"] if r["speed_comparable"] else None for r in rows], maximize_other=True)
    size = pareto_mask(q, [r["size_mb"] for r in rows], maximize_other=False)
    for r, a, b in zip(rows, speed, size):
        r["pareto_speed"], r["pareto_size"] = a, b
    return {"perplexity": ppl_ref, "roofline": roof_ref}


def summarize_runs(root: str | Path, device: str = "h100", recompute: bool = False,
                   max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """The summary object (summary.json) for every run under ``root``."""
    from compress.eval.roofline_devices import load_device

    root = Path(root)
    load_device(device)  # an unknown --device fails before any report is read
    runs = find_runs(root, max_depth)
    rows = [run_row(d, root, device, recompute) for d in runs]
    reference = mark_fronts(rows)
    return {"runs_dir": str(root), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device_for_computed_speedups": device, "max_depth": max_depth, "reference": reference, "runs": rows}


# ------------------------------------------------------------------------------------------------
def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def render_summary(summary: dict[str, Any], plot_name: str | None = "pareto.png") -> str:
    """summary.md: one table row per run; ★ marks the Pareto fronts; notes explain flags."""
    rows = summary["runs"]
    task_names = sorted({t for r in rows for t in r["tasks"]})
    ref = summary["reference"]
    out = [f"# Runs in `{summary['runs_dir']}`", "",
           f"{len(rows)} run{'s' if len(rows) != 1 else ''}. Perplexity reference: {ref['perplexity'] or '-'}; "
           f"speedup reference: {ref['roofline'] or '-'} (estimated decode speedup over the original model, roofline).",
           "Pareto: ★speed = no run has both lower perplexity and higher speedup; ★size = no run has both lower "
           "perplexity and a smaller checkpoint. † perplexity, ‡ speedup measured differently: left off the fronts.",
           ""]
    head = (["run", "passes", "ppl original", "ppl compressed", "ppl scored"] + [f"{t} acc (orig)" for t in task_names]
            + ["size MB", "params", "sparsity", "speedup", "speedup from", "Pareto"])
    text_cols = {"run", "passes", "ppl scored", "speedup from", "Pareto"}
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in text_cols else "---:" for h in head) + "|"]
    for r in rows:
        tasks = []
        for t in task_names:
            d = r["tasks"].get(t)
            tasks.append("-" if d is None else f"{_f(d.get('compressed'))} ({_f(d.get('original'))})")
        front = " ".join(s for s, on in (("★speed", r["pareto_speed"]), ("★size", r["pareto_size"])) if on)
        ppl = _f(r["perplexity"]) + ("" if r["comparable"] or r["perplexity"] is None else " †")
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}×" + ("" if r["speed_comparable"] else " ‡")
        params = "-" if r["parameters"] is None else f"{r['parameters'] / 1e6:.1f}M"
        out.append("| " + " | ".join([r["name"], r["passes"], _f(r["perplexity_original"]), ppl,
                                      r["perplexity_scope"] or "-", *tasks, _f(r["size_mb"], 1), params,
                                      _f(r["sparsity"]), sp, r["speedup_source"] or "-", front]) + " |")
    notes = [(r["name"], n) for r in rows for n in r["notes"]]
    if notes:
        out += ["", "Notes:", ""] + [f"- {name}: {n}" for name, n in notes]
    if plot_name:
        out += ["", f"![perplexity vs estimated speedup and size]({plot_name})"]
    return "\n".join(out) + "\n"


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write summary.md, summary.json and pareto.png into ``out_dir``; returns their paths."""
    from compress.eval.plots import plot_pareto

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "summary.md", "json": out_dir / "summary.json", "png": out_dir / "pareto.png"}
    plot_pareto(summary["runs"], paths["png"])
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["md"].write_text(render_summary(summary, paths["png"].name))
    return paths
