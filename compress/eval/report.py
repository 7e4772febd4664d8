"""report.json / report.md / model card rendering for a run."""
from __future__ import annotations

from typing import Any

from compress.eval.sparsity import sparsity_markdown


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def perplexity_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    ppl = report.get("eval", {}).get("perplexity", {})
    rows = []
    for key in ("original", "compressed"):
        r = ppl.get(key)
        if r:
            scope = f"{r['windows']}/{r['total_windows']} windows" + (" (partial)" if r["partial"] else "")
            rows.append((key, f"{r['perplexity']:.3f}", f"{r['dataset']} @ {r['seqlen']}", scope))
    return rows


def summary_table(report: dict[str, Any]) -> str:
    lines = [f"{'model':<12} {'perplexity':>11}  {'dataset':<18} {'scored':<24}"]
    for name, ppl, ds, scope in perplexity_rows(report):
        lines.append(f"{name:<12} {ppl:>11}  {ds:<18} {scope:<24}")
    size = report.get("checkpoint", {})
    if size.get("size_bytes"):
        lines.append(f"checkpoint: {size['path']} ({size['format']}, {size['size_bytes'] / 1e6:.1f} MB)")
    rf = report.get("eval", {}).get("roofline")
    if rf:
        sp = rf.get("speedup_decode")
        lines.append(f"roofline on {rf['device']}: decode {rf['decode_ms_per_token']:.3f} ms/token"
                     + (f" ({sp:.2f}x vs original)" if sp else "") + f", memory {rf['memory_gb']:.2f} GB (estimate)")
    for p in report.get("passes", []):
        s = p.get("summary", {})
        err = s.get("mean_rel_output_error")
        lines.append(f"pass {p['name']}: {p['seconds']:.1f} s" + (f", mean rel. output error {err:.4f}" if err is not None else ""))
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# compress run: {report['model']['name']}", ""]
    out.append(f"- date: {report['date']}  \n- output: `{report['output']}`  \n- compress {report['version']}, "
               f"torch {report['environment']['torch']}, transformers {report['environment']['transformers']}")
    if report.get("calibration"):
        c = report["calibration"]
        out.append(f"- calibration: {c['nsamples']} × {c['seqlen']} tokens from `{c['source']}` (seed {c['seed']}, sha256 {c['sha256'][:12]}…)")
    rows = perplexity_rows(report)
    if rows:
        out += ["", "## Perplexity", "", "| model | perplexity | dataset @ seqlen | scored |", "|---|---:|---|---|"]
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    tasks = report.get("eval", {}).get("tasks")
    if tasks:
        out += ["", "## Zero-shot accuracy (lm-eval)", "", "| task | n | original acc | compressed acc | original acc_norm | compressed acc_norm |",
                "|---|---:|---:|---:|---:|---:|"]
        orig = {t["name"]: t for t in tasks.get("original", {}).get("tasks", [])}
        for t in tasks.get("compressed", {}).get("tasks", []):
            o = orig.get(t["name"], {})
            n = f"{t['n']}/{t['n_total']}" + (" (partial)" if t.get("partial") else "")
            out.append(f"| {t['name']} | {n} | {_fmt(o.get('acc'))} | {_fmt(t.get('acc'))} | "
                       f"{_fmt(o.get('acc_norm'))} | {_fmt(t.get('acc_norm'))} |")
    rf = report.get("eval", {}).get("roofline")
    if rf:
        out += ["", f"## Roofline estimate ({rf['device_title']}, batch {rf['batch']}, prompt {rf['prompt']}, "
                    f"generate {rf['generate']}, {rf['dtype']})", "", "| | compressed | original | speedup |", "|---|---:|---:|---:|"]
        b = rf.get("baseline") or {}
        out.append(f"| decode ms/token | {rf['decode_ms_per_token']:.3f} | {_fmt(b.get('decode_ms_per_token'))} | "
                   f"{_fmt(rf.get('speedup_decode'), 2)} |")
        out.append(f"| prefill ms | {rf['prefill_ms']:.3f} | {_fmt(b.get('prefill_ms'))} | {_fmt(rf.get('speedup_prefill'), 2)} |")
        out.append(f"| memory GB | {rf['memory_gb']:.3f} | {_fmt(b.get('memory_gb'))} | |")
        out += [f"\n> roofline warning: {w}" for w in rf.get("warnings", [])]
    out += sparsity_markdown(report.get("sparsity"))
    for p in report.get("passes", []):
        out += ["", f"## Pass `{p['name']}` ({p['seconds']:.1f} s)", "", f"config: `{p['config']}`", ""]
        if p.get("summary"):
            out += [f"- {k}: {_fmt(v, 4)}" for k, v in p["summary"].items()]
        if p.get("ignored"):
            out.append(f"- left in float (ignored): {', '.join(p['ignored'])}")
        for w in p.get("warnings", []):
            out.append(f"- warning: {w}")
        mods = p.get("modules", {})
        if mods:
            keys = [k for k in ("rel_output_error", "rel_weight_error", "sparsity", "gptq_loss") if any(k in m for m in mods.values())]
            out += ["", "| module | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
            out += [f"| {n} | " + " | ".join(_fmt(m.get(k), 4) for k in keys) + " |" for n, m in mods.items()]
    for w in report.get("warnings", []):
        out.append(f"\n> warning: {w}")
    return "\n".join(out) + "\n"


def model_card(report: dict[str, Any], recipe_yaml: str) -> str:
    ck = report.get("checkpoint", {})
    fmt = ck.get("format", "dense")
    rows = perplexity_rows(report)
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{ck.get('path', '.')}\")  # needs `pip install compressed-tensors`"
            if fmt == "compressed-tensors" else
            "from compress.formats import load_quantized\n"
            f"model, tokenizer = load_quantized(\"{ck.get('path', '.')}\")  # GPTQ v1; vLLM and GPTQModel also load it"
            if fmt == "gptq" else
            f"from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"{ck.get('path', '.')}\")")
    out = ["---", "library_name: transformers", f"base_model: {report['model']['name']}", "tags: [compress]", "---", "",
           f"# {report['model']['name']}, compressed with compress", "",
           f"Format: **{fmt}**. Made on {report['date']} by `compress run` with the recipe below.", ""]
    if rows:
        out += ["## Measured", "", "| model | perplexity | dataset @ seqlen | scored |", "|---|---:|---|---|"]
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        out.append("")
    out += ["## Load", "", "```python", load, "```", "", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(out)
