"""The W4A16 GEMM for prefill-sized inputs (``compress.kernels.triton_gemm``): its configs and the
policy that routes rows to it run anywhere; the kernel itself (marked gpu) is checked against a
float64 reference on fresh random inputs written into NaN-filled buffers, in every layout repack
writes, fp16 and bf16, symmetric, per-channel, act-order and bias."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from compress.errors import ConfigError
from compress.kernels import accelerate, triton_gemm
from compress.kernels.cuda_w4a16 import TILE_LAYOUTS
from compress.kernels.packed import W4A16Weight
from tests.test_kernels import CUDA_SHAPES, HAS_CUDA, make_layer, reference, rel_err, tiny_quantized_model


def _weight(group: int, n_groups: int, large_m: str = "auto") -> W4A16Weight:
    k = group * n_groups
    return W4A16Weight(words=torch.zeros(16, k // 8, dtype=torch.int32), scales=torch.ones(n_groups, 16),
                       zeros=None, perm=None, bias=None, in_features=k, out_features=16, group=group, width=1,
                       kernel="cuda", large_m=large_m)


def test_large_m_setting_routes_rows_to_the_gemm(monkeypatch):
    monkeypatch.setattr(triton_gemm, "AUTO_MAX_M", 256)
    assert triton_gemm.takes(_weight(128, 2, "gemm"), 4096)
    assert not triton_gemm.takes(_weight(128, 2, "dequant"), 17)
    assert triton_gemm.takes(_weight(128, 2, "auto"), 256)
    assert not triton_gemm.takes(_weight(128, 2, "auto"), 257)
    monkeypatch.setattr(triton_gemm, "AUTO_MAX_M", 0)  # "auto" without a measured crossover: never
    assert not triton_gemm.takes(_weight(128, 2, "auto"), 17)


def test_block_k_divides_the_group_so_one_scale_serves_a_tile():
    assert triton_gemm.block_k_for(_weight(128, 4), 128) == 128
    assert triton_gemm.block_k_for(_weight(128, 4), 64) == 64
    assert triton_gemm.block_k_for(_weight(64, 4), 128) == 64
    assert triton_gemm.block_k_for(_weight(32, 4), 128) == 32
    assert triton_gemm.block_k_for(_weight(96, 4), 128) == 32
    assert triton_gemm.block_k_for(_weight(520, 1), 128) == 128  # per-channel: any step
    with pytest.raises(ValueError, match="group size 48 is not a multiple of 32"):
        triton_gemm.block_k_for(_weight(48, 2), 128)


@pytest.mark.parametrize("m", [17, 33, 64, 65, 200, 256, 257, 4096])
def test_candidate_and_default_configs_tile_the_rows_they_are_for(m):
    cands = triton_gemm.candidate_configs(m)
    assert cands and len(set(cands)) == len(cands)
    for cfg in cands + [triton_gemm.default_config(m, 4096)]:
        for size in (cfg.block_m, cfg.block_n, cfg.block_k):
            assert size >= 16 and size & (size - 1) == 0, cfg  # tl.dot: powers of two, at least 16
        assert cfg.block_m <= max(32, 2 * m), cfg  # no tile mostly of masked rows
        assert cfg.num_warps in (4, 8) and cfg.num_stages in (3, 4)
    assert any(not c.magic for c in cands) and any(c.magic for c in cands)  # the sweep A/Bs the unpack
    assert any(c.gather for c in cands) and any(not c.gather for c in cands)


def test_exponent_bit_unpack_gives_base_plus_code_exactly():
    """The kernel's int-to-float shortcut: a 4-bit code OR-ed into the low mantissa bits of 1024
    (fp16, 0x6400) or 128 (bf16, 0x4300) is that base plus the code, so base + z subtracts exactly."""
    q = torch.arange(16, dtype=torch.int16)
    assert torch.equal((q | 0x6400).view(torch.float16).float(), 1024 + q.float())
    assert torch.equal((q | 0x4300).view(torch.bfloat16).float(), 128 + q.float())
    z = torch.arange(16, dtype=torch.int16).flip(0)
    for dtype, base, bits in ((torch.float16, 1024, 0x6400), (torch.bfloat16, 128, 0x4300)):
        diff = (q | bits).view(dtype) - (z + base).to(dtype)
        assert torch.equal(diff.float(), (q - z).float())


def test_gemm_refuses_what_it_cannot_read_with_clear_errors():
    wt = _weight(128, 2)
    if triton_gemm._gemm_kernel is None:
        with pytest.raises(RuntimeError, match="needs Triton"):
            triton_gemm.gemm(torch.zeros(17, 256, dtype=torch.float16), wt)
        return
    with pytest.raises(ValueError, match="activations must be fp16 or bf16, got torch.float32"):
        triton_gemm.gemm(torch.zeros(17, 256), wt)
    with pytest.raises(ValueError, match="x has 128 columns, the layer 256"):
        triton_gemm.gemm(torch.zeros(17, 128, dtype=torch.float16), wt)
    wt.kernel = "triton"
    with pytest.raises(ValueError, match="reads the CUDA kernel's packed layout"):
        triton_gemm.gemm(torch.zeros(17, 256, dtype=torch.float16), wt)


def test_accelerate_names_the_large_m_choices():
    model = tiny_quantized_model()
    with pytest.raises(ConfigError, match="large_m must be one of auto, dequant, gemm, triton; got 'fast'"):
        accelerate(model, large_m="fast")


# ---------------------------------------------------------------- the kernel (GPU)

GEMM_SHAPES = CUDA_SHAPES + [(64, 512, 32, True, False, False)]  # the CUDA kernel's shapes, and g32 (BLOCK_K = 32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tile_major", [TILE_LAYOUTS[k] for k in ("row", "codes", "both_evf")])  # codes x scales tiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,gs,sym,act,bias", GEMM_SHAPES)
def test_gemm_matches_the_dequantized_weight_in_every_layout(n, k, gs, sym, act, bias, dtype, tile_major, monkeypatch):
    from compress.kernels import cuda_w4a16 as cw
    from compress.kernels import triton_w4a16 as tw

    monkeypatch.setattr(cw, "TILE_MAJOR", tile_major)
    layer = make_layer(n, k, gs, sym, act, bias, seed=n + k)
    wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, sym, layer.bias, "cuda", kernel="cuda")
    bound = 3e-3 if dtype == torch.float16 else 1.5e-2
    for m in (17, 40, 129):
        dflt = triton_gemm.default_config(m, n)
        variants = [dflt, replace(dflt, magic=not dflt.magic), replace(dflt, gather=not dflt.gather)]
        for cfg in variants + triton_gemm.candidate_configs(m)[::3]:
            x = torch.randn(m, k, device="cuda", dtype=dtype)  # fresh input per config
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = triton_gemm.gemm(x, wt, cfg, out)
            assert bool(torch.isfinite(y).all()), f"unwritten outputs with {cfg}"
            assert rel_err(y, reference(layer, x)) < bound, (m, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_w4a16_matmul_sends_prefill_rows_where_large_m_says(monkeypatch):
    from compress.kernels import triton_w4a16 as tw

    layer = make_layer(256, 1024, 128, False, True, True, seed=3)
    wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, False, layer.bias, "cuda", kernel="cuda")
    calls = []
    real = triton_gemm.gemm
    monkeypatch.setattr(triton_gemm, "gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(triton_gemm, "AUTO_MAX_M", 64)
    for large_m, m, used in (("gemm", 300, True), ("dequant", 40, False), ("auto", 64, True), ("auto", 65, False)):
        wt.large_m = large_m
        calls.clear()
        x = torch.randn(1, m, 1024, device="cuda", dtype=torch.float16)
        y = tw.w4a16_matmul(x, wt)
        assert y.shape == (*x.shape[:-1], 256)
        assert bool(calls) == used, (large_m, m)
        assert rel_err(y, reference(layer, x.reshape(-1, 1024)).reshape(y.shape)) < 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_prefill_through_the_gemm_matches_the_dequantize_path(compiled, act_order):
    """A tiny Llama accelerated twice (fused blocks, stacked groups), prompts of 40 tokens: the GEMM
    and dequantize + cuBLAS must agree, eagerly and under torch.compile (the custom op; with
    act-order the gather is a graph op there and the GEMM gets x in group order)."""
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    logits = {}
    for large_m in ("gemm", "dequant"):
        model = tiny_quantized_model(device="cuda", act_order=act_order).half()
        accelerate(model, large_m=large_m)
        torch._dynamo.reset()
        fwd = torch.compile(model, dynamic=False) if compiled else model
        with torch.inference_mode():
            logits[large_m] = fwd(ids).logits.float()
    assert rel_err(logits["gemm"], logits["dequant"]) < 5e-3


def test_the_report_says_which_path_prefill_rows_take(monkeypatch):
    from compress.kernels.dispatch import _gpu_path

    monkeypatch.setattr(triton_gemm, "AUTO_MAX_M", 0)
    assert "1-16 rows, dequantize + cuBLAS above" in _gpu_path("cuda", "auto")[1]
    assert "1-16 rows, the W4A16 GEMM (triton_gemm) above" in _gpu_path("cuda", "gemm")[1]
    assert "dequantize + cuBLAS above" in _gpu_path("cuda", "dequant")[1]
    monkeypatch.setattr(triton_gemm, "AUTO_MAX_M", 256)
    assert "GEMM (triton_gemm) for 17-256 rows, dequantize + cuBLAS above" in _gpu_path("cuda", "auto")[1]
