"""Achieved sparsity counted back from saved checkpoints (dense, GPTQ v1, compressed-tensors), the
report section and sparsity.png, on a tiny Llama run end to end through ``compress.runner.run``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.eval.sparsity import DENSE_THRESHOLD, count_checkpoint_zeros, plan_from_passes, summarize
from compress.nn.qlinear import QuantizedLinear
from compress.recipe import recipe_from_dict
from compress.runner import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, model_dir, passes, fmt, name="out"):
    recipe = recipe_from_dict({"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
                               "save": {"format": fmt}})
    return run(recipe, keep_model=True)


def _memory_zeros(model) -> dict[str, int]:
    """Zeros of the in-memory decoder linears as the model computes with them (dequantized)."""
    out = {}
    for n, m in model.named_modules():
        if n.startswith("model.layers.") and isinstance(m, (torch.nn.Linear, QuantizedLinear)):
            w = m.dequantize() if isinstance(m, QuantizedLinear) else m.weight
            out[n] = int((w == 0).sum())
    return out


def test_dense_save_after_alpha_plan(tmp_path, tiny_llama_dir):
    res = _run(tmp_path, tiny_llama_dir, [{"alpha_allocation": {"target_sparsity": 0.6, "epsilon": 0.2}},
                                          {"magnitude": {"sparsity": "plan"}}], "dense")
    sp = res.report["sparsity"]
    mem = _memory_zeros(res.model)
    assert sp["format"] == "dense" and len(sp["per_module"]) == 14 == len(mem)
    assert {n: m["zeros"] for n, m in sp["per_module"].items()} == mem
    total = sum(p.numel() for n, p in res.model.named_parameters()
                if n.startswith("model.layers.") and n.endswith("proj.weight"))
    assert sp["overall"] == pytest.approx(sum(mem.values()) / total, rel=1e-12)
    # the plan: parameter-weighted target 0.6, alpha per block from the allocation pass
    assert sp["planned"]["passes"] == ["alpha_allocation", "magnitude"]
    assert sp["planned"]["overall"] == pytest.approx(0.6, abs=2e-3)
    assert sp["overall"] == pytest.approx(sp["planned"]["overall"], abs=2e-3)
    alloc = res.report["passes"][0]["modules"]
    for b in sp["per_block"]:
        names = [n for n in alloc if n.startswith(f"model.layers.{b['block']}.")]
        assert b["alpha"] == pytest.approx(sum(alloc[n]["alpha"] for n in names) / len(names), rel=1e-9)
    assert sp["shown"] and sp["plot"] == "sparsity.png"
    png = (res.output / "sparsity.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    md = (res.output / "report.md").read_text()
    assert "## Sparsity of the saved weights" in md and "| block | planned | achieved | alpha |" in md
    assert "![alpha and sparsity per block](sparsity.png)" in md
    saved = json.loads((res.output / "report.json").read_text())["sparsity"]
    assert saved["overall"] == sp["overall"] and len(saved["per_block"]) == 2


@pytest.mark.parametrize("fmt,symmetric", [("gptq", True), ("compressed-tensors", False)])
def test_packed_save_after_pruning(tmp_path, tiny_llama_dir, fmt, symmetric):
    res = _run(tmp_path, tiny_llama_dir, [{"magnitude": {"sparsity": 0.5}},
                                          {"rtn": {"bits": 4, "group_size": 32, "symmetric": symmetric}}], fmt)
    sp = res.report["sparsity"]
    assert sp["format"] == fmt
    mem = _memory_zeros(res.model)
    assert {n: m["zeros"] for n, m in sp["per_module"].items()} == mem
    # pruned zeros survive packing; rounding to the zero point adds a few more
    assert sp["planned"]["overall"] == pytest.approx(0.5, abs=1e-9)
    assert 0.5 <= sp["overall"] < 0.6
    assert "quantization rounded to the zero point" in (res.output / "report.md").read_text()


def test_dense_model_has_no_table_or_plot(tmp_path, tiny_llama_dir):
    res = _run(tmp_path, tiny_llama_dir, [], "dense")
    sp = res.report["sparsity"]
    assert sp["planned"] is None and sp["overall"] < DENSE_THRESHOLD and not sp["shown"]
    assert not (res.output / "sparsity.png").exists()
    md = (res.output / "report.md").read_text()
    assert "dense." in md and "| block | planned" not in md


def test_summarize_weights_blocks_by_parameters():
    counts = {"format": "dense", "rule": "exact zeros", "files": ["model.safetensors"],
              "per_module": {"b.0.a": {"numel": 100, "zeros": 50}, "b.0.b": {"numel": 300, "zeros": 30},
                             "b.1.a": {"numel": 100, "zeros": 90}},
              "block_of": {"b.0.a": 0, "b.0.b": 0, "b.1.a": 1}}
    passes = [{"name": "wanda", "modules": {"b.0.a": {"target_sparsity": 0.5}, "b.1.a": {"target_sparsity": 0.9}}}]
    s = summarize(counts, passes)
    assert s["per_block"][0]["sparsity"] == pytest.approx(80 / 400)
    assert s["per_block"][0]["planned"] == pytest.approx(0.5 * 100 / 400)  # b.0.b unpruned counts as 0
    assert s["overall"] == pytest.approx(170 / 500)
    assert s["planned"]["overall"] == pytest.approx((50 + 90) / 500)
    assert plan_from_passes([{"name": "gptq", "modules": {"b.0.a": {"gptq_loss": 1.0}}}])["sources"] == []


def test_missing_weight_is_named(tmp_path, tiny_llama_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(64, 64)}, folder / "model.safetensors")
    with pytest.raises(CompressError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        count_checkpoint_zeros(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CompressError, match="no config.json"):
        count_checkpoint_zeros(tmp_path)
