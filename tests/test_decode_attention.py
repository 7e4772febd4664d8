"""Decode attention (``compress.kernels.decode_attention``, ``compress.kernels.attention``).

On the CPU: the transformers integration (install marks the adapter's attention modules, switches
the implementation and back, and every call it does not take gives SDPA's result exactly), the
custom op's CPU fallback and fake shapes, and the split arithmetic. The kernel itself is checked on
a GPU (marked gpu) against a float32 reference on fresh random inputs, with its error bounded by a
multiple of torch SDPA's error against the same reference.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compress.kernels import attention, decode_attention
from compress.kernels.decode_attention import DecodeAttention, reference, split

from tests.test_kernels import HAS_CUDA, rel_err


def tiny_llama(attn: str = "sdpa", device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).eval()


def test_install_marks_attention_modules_and_cpu_calls_give_sdpa_results():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        assert attention.install(model) == 2
        assert model.config._attn_implementation == decode_attention.NAME
        assert all(hasattr(m, attention._MARK) for m in attention.attention_modules(model))
        got = model(ids).logits  # CPU: every call falls back to SDPA, bit for bit
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)  # one-token decode steps too
        attention.uninstall(model)
        assert model.config._attn_implementation == "sdpa"
        assert not any(hasattr(m, attention._MARK) for m in model.modules())
        gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref)
    assert torch.equal(gen, gen_ref)


def test_install_leaves_non_sdpa_models_alone():
    model = tiny_llama("eager")
    assert attention.why_not(model) and "eager" in attention.why_not(model)
    assert attention.install(model) == 0
    assert model.config._attn_implementation == "eager"


def test_saved_config_does_not_name_our_attention(tmp_path):
    model = tiny_llama()
    attention.install(model)
    model.config.save_pretrained(tmp_path)
    assert decode_attention.NAME not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("length,heads", [(1, 32), (193, 32), (193, 4), (4096, 32), (100, 1024), (10**6, 8)])
def test_split_covers_the_cache_in_whole_steps(length, heads):
    cfg = decode_attention.choose_config(length, heads, 132, clusters=False)
    slices, per = split(length, heads, 132, cfg)
    assert per % (cfg.warps * cfg.t) == 0
    assert slices * per >= length > (slices - 1) * per
    assert slices == 1 or heads * slices <= 2 * cfg.blocks_per_sm * 132 or per > cfg.warps * cfg.t
    assert slices <= decode_attention.MAX_SPLITS
    assert (slices == 1) == (length <= decode_attention.SHORT_MAX or length <= per)


def test_custom_op_cpu_fallback_matches_reference_and_fake_shape():
    torch.manual_seed(1)
    q, k = torch.randn(2, 8, 1, 64), torch.randn(2, 2, 30, 64)
    v = torch.randn_like(k)
    mask = torch.rand(2, 1, 1, 30) > 0.3
    mask[..., 0] = True
    da = DecodeAttention()
    out = torch.ops.compress.decode_attention(q, k, v, mask, 0.125, da.handle)
    assert out.shape == (2, 1, 8, 64)
    assert rel_err(out, reference(q, k, v, mask, 0.125)) < 1e-5
    torch.library.opcheck(torch.ops.compress.decode_attention.default, (q, k, v, mask, 0.125, da.handle),
                          test_utils=("test_schema", "test_faketensor"))


def test_reference_handles_gqa_and_additive_masks():
    torch.manual_seed(2)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    v = torch.randn_like(k)
    bias = torch.tensor([0.0, -1e9, 0.0, 0.0, -1e9]).view(1, 1, 1, 5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=bias).transpose(1, 2)
    assert rel_err(reference(q, k, v, bias, 16 ** -0.5), want) < 1e-5
    assert rel_err(reference(q, k, v, bias > -1, 16 ** -0.5), want) < 1e-5


# ---------------------------------------------------------------------------------------------- GPU

GPU_CASES = [  # batch, heads, kv heads, cached positions, head dim
    (1, 32, 32, 193, 128), (1, 32, 8, 1000, 128), (2, 16, 4, 77, 64), (1, 8, 8, 1, 128), (3, 4, 2, 4096, 256),
    (4, 32, 32, 33, 128),
]


def _inputs(b, h, hk, length, d, dtype, mask_kind, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, 1, h * d, device="cuda", dtype=dtype, generator=g).view(b, 1, h, d).transpose(1, 2)
    k = torch.randn(b, hk, length, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hk, length, d, device="cuda", dtype=dtype, generator=g)
    mask = None
    if mask_kind != "none":
        valid = torch.randint(1, length + 1, (b,), device="cuda", generator=g)  # filled slots per sequence
        start = torch.randint(0, 2, (b,), device="cuda", generator=g) * (valid // 3)  # left padding
        pos = torch.arange(length, device="cuda")
        mask = ((pos >= start[:, None]) & (pos < valid[:, None])).view(b, 1, 1, length)
        if mask_kind == "bool":  # masked slots' keys and values must never reach the sums
            hole = ~mask.view(b, 1, length, 1).expand(b, hk, length, d)
            k[hole] = float("nan")
            v[hole] = float("inf")
        else:
            mask = torch.zeros(mask.shape, device="cuda", dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return q, k, v, mask


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("cfg", [None, decode_attention.Config(8, 8, 0.1), decode_attention.Config(2, 4, 8.0),
                                 decode_attention.Config(8, 4, 0, 4), decode_attention.Config(4, 4, 0, 8)])
def test_kernel_matches_float32_reference(case, mask_kind, dtype, cfg):
    b, h, hk, length, d = case
    q, k, v, mask = _inputs(b, h, hk, length, d, dtype, mask_kind)
    scale = d ** -0.5
    k0, v0 = (t.nan_to_num(0.0, 0.0, 0.0) for t in (k, v))  # what a zero-filled static cache holds
    want = reference(q, k0, v0, mask, scale)
    got = DecodeAttention()(q, k, v, mask, scale, cfg)
    assert got.shape == (b, 1, h, d) and got.dtype == dtype
    assert torch.isfinite(got).all()
    kk, vv = k0.repeat_interleave(h // hk, 1), v0.repeat_interleave(h // hk, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale).transpose(1, 2)
    bound = 2 * rel_err(sdpa, want) + (1e-3 if dtype == torch.float16 else 8e-3)
    assert rel_err(got, want) < bound


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_counters_return_to_zero_and_repeated_launches_agree():
    q, k, v, mask = _inputs(1, 32, 8, 700, 128, torch.float16, "bool", seed=3)
    da = DecodeAttention()
    first = da(q, k, v, mask, 0.088)
    for _ in range(5):
        again = da(q, k, v, mask, 0.088)
    assert torch.equal(first, again)
    assert int(da.counters[q.device].abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_tiny_llama_decodes_the_same_tokens_eager_graph_and_compiled():
    """fp16 tiny Llama with a static cache: greedy tokens as with SDPA; logits close; compiled too."""
    from compress.kernels.gpu_timing import time_generation

    model = tiny_llama(device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        step_ref = model(ids).logits
        assert attention.install(model) == 2
        got = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        assert rel_err(model(ids).logits, step_ref) == 0  # prefill: SDPA unchanged
    assert torch.equal(got, ref)
    r = time_generation(model, 16, 8, 1, mode="compile", repeats=1, warmup=1)
    torch._dynamo.reset()
    assert r["tokens_match_eager"]


@pytest.mark.parametrize("length", [1, 193, 4096])
def test_cluster_configs_split_into_exactly_their_cluster(length):
    assert decode_attention.choose_config(193, 32).cluster == 4  # short cache, few heads: clusters
    assert decode_attention.choose_config(193, 256).cluster == 0  # the grid is full without them
    assert decode_attention.choose_config(193, 32, clusters=False).cluster == 0  # before sm_90
    cfg = decode_attention.Config(8, 4, 0, 4)
    slices, per = split(length, 32, 132, cfg)
    assert slices == 4 and per % 32 == 0 and slices * per >= length
