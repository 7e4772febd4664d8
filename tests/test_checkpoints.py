"""Saved checkpoints are real packed INT4 that plain transformers (compressed-tensors) and our reader load
with the same logits as the in-memory model; writes are atomic and never touch the input."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.formats import load_quantized, save_checkpoint
from compress.formats.io import check_output_path
from compress.passes.gptq import GPTQ, GPTQConfig
from tests.conftest import tiny_model
from tests.test_adapters_and_runner import ctx_for


def quantized(family="llama", **cfg):
    model = tiny_model(family, tie_word_embeddings=True) if family == "llama" else tiny_model(family)
    GPTQ(GPTQConfig(**cfg)).apply(model, ctx_for(model))
    return model


def logits(model, seed=5):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("cfg", [dict(group_size=32), dict(group_size=-1), dict(bits=8, group_size=32)])
def test_compressed_tensors_loads_in_plain_transformers(tmp_path, cfg):
    model = quantized(**cfg)
    save_checkpoint(model, None, tmp_path / "ck", "compressed-tensors")
    qcfg = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["quant_method"] == "compressed-tensors"
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    bits = cfg.get("bits", 4)
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 * bits // 32)  # real packing, not floats
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    ref = logits(model)
    assert torch.allclose(logits(loaded), ref, atol=1e-5, rtol=1e-4)
    ours, _ = load_quantized(tmp_path / "ck")
    assert torch.allclose(logits(ours), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [dict(group_size=32, act_order=True, static_groups=False),
                                 dict(group_size=32, symmetric=False), dict(bits=2, group_size=-1)])
def test_gptq_v1_round_trip(tmp_path, cfg):
    model = quantized(**cfg)
    save_checkpoint(model, None, tmp_path / "ck", "gptq")
    qcfg = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["desc_act"] == (cfg.get("static_groups") is False)
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").shape == (64 * qcfg["bits"] // 32, 64)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    ours, _ = load_quantized(tmp_path / "ck")
    ref = logits(model)
    # GPTQ v1 stores fp16 scales: the only difference from the in-memory model
    assert ((logits(ours) - ref).norm() / ref.norm()) < 1e-3
    q0 = model.model.layers[0].self_attn.q_proj
    l0 = ours.model.layers[0].self_attn.q_proj
    assert torch.equal(q0.qweight, l0.qweight) and torch.equal(q0.zeros, l0.zeros) and torch.equal(q0.g_idx, l0.g_idx)


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt_neox"])
def test_other_families_round_trip(tmp_path, family):
    model = quantized(family, group_size=32)
    save_checkpoint(model, None, tmp_path / "ck", "compressed-tensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=1e-4)


def test_three_bit_compressed_tensors_reads_back(tmp_path):
    model = quantized(bits=3, group_size=32)
    save_checkpoint(model, None, tmp_path / "ck", "compressed-tensors")
    ours, _ = load_quantized(tmp_path / "ck")
    assert torch.allclose(logits(ours), logits(model), atol=1e-5, rtol=1e-4)
    with pytest.raises(CompressError, match="2, 4 and 8 bits"):
        save_checkpoint(model, None, tmp_path / "ck3", "gptq")


def test_dynamic_groups_refused_by_compressed_tensors(tmp_path):
    model = quantized(group_size=32, act_order=True, static_groups=False)
    with pytest.raises(CompressError, match="static_groups"):
        save_checkpoint(model, None, tmp_path / "ck", "compressed-tensors")
    assert not (tmp_path / "ck").exists()
    assert not list(tmp_path.glob(".ck.tmp-*"))  # the temporary folder is cleaned up


def test_output_checks(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    with pytest.raises(CompressError, match="input model"):
        check_output_path(src, [str(src)], overwrite=True)
    with pytest.raises(CompressError, match="input model"):
        check_output_path(src / "sub", [str(src)], overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(CompressError, match="not empty"):
        check_output_path(out, [str(src)], overwrite=False)
    check_output_path(out, [str(src)], overwrite=True)


def test_load_quantized_refuses_dense_folder(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(CompressError, match="not a compressed-tensors or GPTQ"):
        load_quantized(tmp_path / "dense")


def test_pruned_then_gptq_keeps_zeros_in_saved_int4(tmp_path):
    from compress.passes.wanda import Wanda, WandaConfig

    model = tiny_model("llama", tie_word_embeddings=True)
    ctx = ctx_for(model)
    Wanda(WandaConfig(sparsity=0.5, mask="2:4")).apply(model, ctx)
    zeros = {n: (m.weight == 0) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    GPTQ(GPTQConfig(group_size=32, symmetric=False)).apply(model, ctx)
    save_checkpoint(model, None, tmp_path / "ck", "compressed-tensors")
    ours, _ = load_quantized(tmp_path / "ck")
    for name, mask in zeros.items():
        w = ours.get_submodule(name).dequantize()
        assert mask.float().mean() == 0.5 and torch.all(w[mask] == 0), name
        assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2), name  # 2:4 still holds
