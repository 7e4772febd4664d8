"""``compress bench`` on plain checkpoints (structurally pruned, sparse): what they are timed against."""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.commands import bench
from compress.errors import CompressError


def _save_llama(path, layers: int, intermediate: int) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An 'original' model and a 'pruned' one (fewer blocks, narrower MLP) whose report.json names it,
    as `compress run` writes it."""
    root = tmp_path_factory.mktemp("bench")
    _save_llama(root / "original", layers=4, intermediate=256)
    _save_llama(root / "pruned", layers=2, intermediate=128)
    (root / "pruned" / "report.json").write_text(json.dumps({"model": {"name": str(root / "original")}}))
    _save_llama(root / "plain", layers=2, intermediate=128)  # no report.json
    return root


def _run(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv, "--device", "cpu", "--prompt", "8", "--generate", "3",
                              "--repeats", "1", "--warmup", "0", "--threads", "1"])
    return bench.run_bench(args)


def test_pruned_checkpoint_is_timed_against_the_model_its_report_names(models):
    r = _run(str(models / "pruned"))
    assert r["baseline"] == str(models / "original")
    # the two models really ran: 2 blocks x (64*128*3 + attention) against 4 blocks x (64*256*3 + ...)
    assert r["parameters"] == sum(p.numel() for p in LlamaForCausalLM.from_pretrained(models / "pruned").parameters())
    assert r["baseline_parameters"] > r["parameters"]
    assert set(r["runs"]) == {"compressed", "baseline"}
    assert r["runs"]["compressed"] is not r["runs"]["baseline"]
    assert r["decode_tokens_per_s"] == r["runs"]["compressed"]["decode_tokens_per_s"] > 0
    assert r["baseline_decode_tokens_per_s"] == r["runs"]["baseline"]["decode_tokens_per_s"] > 0
    assert r["decode_speedup"] == pytest.approx(r["decode_tokens_per_s"] / r["baseline_decode_tokens_per_s"])
    assert r["prefill_speedup"] == pytest.approx(r["baseline_prefill_ms"] / r["prefill_ms"])
    assert r["kernels"] == {}


def test_explicit_baseline_wins_over_the_report(models):
    r = _run(str(models / "pruned"), "--baseline", str(models / "plain"))
    assert r["baseline"] == str(models / "plain")
    assert r["baseline_parameters"] == r["parameters"]  # same shapes as the pruned model


def test_plain_folder_without_report_is_timed_alone_and_says_so(models, caplog):
    with caplog.at_level(logging.WARNING, logger="compress.commands.bench"):
        r = _run(str(models / "plain"))
    assert "timing it alone" in caplog.text
    assert r["baseline"] == str(models / "plain")
    assert r["decode_speedup"] == 1.0 and r["prefill_speedup"] == 1.0
    assert set(r["runs"]) == {"compressed", "baseline"}


def test_baseline_original_needs_a_report(models, tmp_path):
    with pytest.raises(CompressError, match="--baseline original: .*report.json is missing or names no model"):
        _run(str(models / "plain"), "--baseline", "original")
    missing = tmp_path / "gone"
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text((models / "plain" / "config.json").read_text())
    (tmp_path / "ck" / "report.json").write_text(json.dumps({"model": {"name": str(missing)}}))
    # the original was moved away: the error says where the name came from and what to pass instead
    with pytest.raises(CompressError, match="original model named in .*report.json .*--baseline PATH.*not found"):
        bench._load_plain(str(missing), torch.float32, torch.device("cpu"),
                          f"the original model named in {tmp_path / 'ck' / 'report.json'} (--baseline PATH "
                          "to use another)")


def test_baseline_source_rules(tmp_path, caplog):
    ns = argparse.Namespace
    (tmp_path / "report.json").write_text(json.dumps({"model": {"name": "org/model"}}))
    assert bench._baseline_source(tmp_path, ns(baseline=None), quantized=True) is None  # dequantized copy
    assert bench._baseline_source(tmp_path, ns(baseline=None), quantized=False) == "org/model"
    assert bench._baseline_source(tmp_path, ns(baseline="original"), quantized=True) == "org/model"
    assert bench._baseline_source(tmp_path, ns(baseline="/x/y"), quantized=False) == "/x/y"
    (tmp_path / "report.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="compress.commands.bench"):
        assert bench._baseline_source(tmp_path, ns(baseline=None), quantized=False) is None
    assert "does not name the model" in caplog.text


def test_quantized_checkpoint_against_its_original(models, tmp_path):
    # --baseline original on a quantized checkpoint: the model report.json names, not the dequantized copy
    from compress.formats import save_checkpoint
    from tests.test_kernels import tiny_quantized_model

    save_checkpoint(tiny_quantized_model(), None, tmp_path / "ck")
    (tmp_path / "ck" / "report.json").write_text(json.dumps({"model": {"name": str(models / "original")}}))
    r = _run(str(tmp_path / "ck"), "--baseline", "original")
    assert r["baseline"] == str(models / "original")
    assert r["baseline_parameters"] == sum(
        p.numel() for p in LlamaForCausalLM.from_pretrained(models / "original").parameters())
    assert r["kernels"] and "parameters" not in r  # quantized: the layers ran a kernel; no float count
    r = _run(str(tmp_path / "ck"))  # default: its own layers dequantized
    assert r["baseline"].startswith("checkpoint dequantized to dense float32")
