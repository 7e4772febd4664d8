"""Kernels for QuantizedLinear: layouts, the CPU int4 path, dispatch, the bench CLI contract, and
(marked gpu, skipped without CUDA) the Triton W4A16 kernel and CUDA-graph timing.

Every numeric check compares against a float64 reference on fresh random inputs.
"""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from torch import nn

from compress.adapters import get_adapter, set_submodule
from compress.algos.quant import (default_g_idx, dequantize_weight, rtn_quantize, rtn_quantize_permuted,
                                  shared_permutations)
from compress.errors import CompressError, ConfigError
from compress.kernels import accelerate, cpu_int4, layout
from compress.kernels.cuda_w4a16 import TILE_LAYOUTS as CUDA_TILE_LAYOUTS
from compress.kernels.packed import W4A16Weight, dequantize_packed
from compress.nn.qlinear import QuantizedLinear

HAS_CUDA = torch.cuda.is_available()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return float((y - ref).norm() / ref.norm())


def make_layer(n: int, k: int, gs: int, symmetric: bool, act_order: bool, bias: bool, seed: int = 0,
               device: str = "cpu", bits: int = 4) -> QuantizedLinear:
    """A QuantizedLinear from RTN codes of a random weight; with act_order, a random g_idx
    permutation of the group assignment (as GPTQ desc_act produces)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    q, s, z = rtn_quantize(w, bits, gs, symmetric)
    g = default_g_idx(k, gs)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g = torch.empty(k, dtype=torch.int32)
        g[perm] = (torch.arange(k) // (k if gs == -1 else gs)).to(torch.int32)
        q = q[:, torch.argsort(perm)]
    b = torch.randn(n, generator=gen) if bias else None
    layer = QuantizedLinear.from_codes(q, s, z, g, bits, gs, symmetric, b, act_order)
    return layer.to(device)


def reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_weight(layer.qweight.cpu(), layer.scales.cpu(), layer.zeros.cpu(), layer.g_idx.cpu())
    y = x.double().cpu() @ w.double().t()
    if layer.bias is not None:
        y = y + layer.bias.detach().double().cpu()
    return y


# ---------------------------------------------------------------- layouts (pure functions)

@pytest.mark.parametrize("width", layout.WIDTHS)
@pytest.mark.parametrize("k", [128, 576, 1000])
def test_planar_pack_roundtrip(k, width):
    codes = torch.randint(0, 16, (24, k), dtype=torch.uint8)
    words = layout.pack_planar(codes, width)
    assert words.dtype == torch.int32 and words.shape == (24, layout.padded_k(k, width) // 8)
    assert torch.equal(layout.unpack_planar(words, k, width), codes)


def test_planar_pack_puts_plane_j_at_its_shift():
    codes = torch.zeros(1, 128, dtype=torch.uint8)
    codes[0, 3 * 16 + 5] = 0xB  # plane 3, word 5
    words = layout.pack_planar(codes)
    assert int(words[0, 5]) == 0xB << layout.PLANE_SHIFT[3]
    assert int(words[0].abs().sum()) == 0xB << layout.PLANE_SHIFT[3]


@pytest.mark.parametrize("k", [128, 576, 1000])
def test_chunked_pack_roundtrip_and_padding(k):
    codes = torch.randint(0, 16, (24, k), dtype=torch.uint8)
    words = layout.pack_chunked(codes)
    assert words.shape == (24, -(-k // 256) * 256 // 8)
    assert torch.equal(layout.unpack_planar(words, k, 1), codes)
    assert int(layout.unpack_planar(words, words.shape[1] * 8, 1)[:, k:].sum()) == 0  # padding is code 0


def test_chunked_pack_keeps_eight_consecutive_columns_per_word():
    codes = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    words = layout.pack_chunked(codes).long() & 0xFFFFFFFF
    i = 13  # word 13 holds columns 104..111, column j at PLANE_SHIFT[j]
    for j, shift in enumerate(layout.PLANE_SHIFT):
        assert torch.equal((words[:, i] >> shift) & 0xF, codes[:, 8 * i + j].long())


def test_restore_codes_of_a_row_range_equals_those_rows_of_the_whole():
    # a stacked layer's member restores only its rows: each row's words are packed independently
    layer = make_layer(96, 384, 64, False, True, False, seed=5)
    order = layout.contiguous_group_order(layer.g_idx, layer.n_groups)
    codes = layout.ordered_codes(layer.qweight, order)
    for words, width in ((layout.pack_chunked(codes), 1), (layout.pack_planar(codes, 16), 16)):
        whole = layout.restore_codes(words, 384, width, order.perm)
        assert torch.equal(whole, layer.qweight)
        assert torch.equal(layout.restore_codes(words[32:80], 384, width, order.perm), whole[32:80])


def test_tile_major_layout_places_each_tile_step_contiguously_and_round_trips():
    # the CUDA kernel's address of (row r of tile T, chunk c): 16-byte units, [T][c / 8][c / 4 % 2][r][c % 4]
    codes = torch.randint(0, 16, (48, 700), dtype=torch.uint8)
    words = layout.pack_chunked(codes)
    tiled = layout.tile_major(words)
    assert tiled.shape == words.shape and torch.equal(layout.row_major(tiled), words)
    kp = words.shape[1] * 8
    flat = tiled.flatten()
    for row in (0, 5, 17, 47):
        for c in range(kp // 32):
            at = (row // 16) * 2 * kp + 512 * (c // 8) + 256 * (c // 4 % 2) + 16 * (row % 16) + 4 * (c % 4)
            assert torch.equal(flat[at:at + 4], words[row, 4 * c:4 * c + 4])
        for j in range(0, kp // 8, 7):  # the dequantize kernel's address of word j (8 columns)
            c = j >> 2
            at = (row >> 4) * 2 * kp + 512 * (c >> 3) + 256 * ((c >> 2) & 1) + 16 * (row & 15) + 4 * (c & 3) + (j & 3)
            assert int(flat[at]) == int(words[row, j])
    scales = torch.randn(6, 48)
    t = layout.tile_groups(scales).flatten()
    assert torch.equal(t[(2 * 6 + 4) * 16:(2 * 6 + 5) * 16], scales[4, 32:48])  # tile 2, group 4
    assert torch.equal(layout.untile_groups(layout.tile_groups(scales)), scales)


def test_tile_major_weight_restores_and_dequantizes_like_the_row_major_one():
    layer = make_layer(64, 384, 64, False, True, False, seed=7)  # act-order
    order = layout.contiguous_group_order(layer.g_idx, layer.n_groups)
    words = layout.pack_chunked(layout.ordered_codes(layer.qweight, order))
    scales, zeros = layout.group_major(layer.scales, torch.float16), layout.group_major(layer.zeros, torch.uint8)
    common = dict(perm=order.perm.to(torch.int32), bias=None, in_features=384, out_features=64,
                  group=order.group_size, width=1, kernel="cuda")
    flat = W4A16Weight(words=words, scales=scales, zeros=zeros, **common)
    tiled = W4A16Weight(words=layout.tile_major(words), scales=layout.tile_groups(scales),
                        zeros=layout.tile_groups(zeros), codes_tiled=True, sz_tiled=True, **common)
    assert torch.equal(tiled.restore_codes(), layer.qweight)
    assert torch.equal(tiled.restore_codes(slice(16, 48)), layer.qweight[16:48])
    rows = torch.tensor([3, 40, 63, 8])
    assert torch.equal(tiled.restore_codes(rows), layer.qweight[rows])
    assert torch.equal(dequantize_packed(tiled, torch.float32), dequantize_packed(flat, torch.float32))
    assert tiled.n_groups == flat.n_groups == 6


def test_restore_codes_undoes_group_ordering_exactly():
    layer = make_layer(40, 384, 32, False, True, False, seed=5)  # act-order
    order = layout.contiguous_group_order(layer.g_idx, layer.n_groups)
    for width, pack in ((1, layout.pack_chunked), (16, layout.pack_planar)):
        words = pack(layout.ordered_codes(layer.qweight, order))
        assert torch.equal(layout.restore_codes(words, 384, width, order.perm), layer.qweight)


def test_release_codes_frees_qweight_and_restores_it_on_first_read():
    layer = make_layer(32, 256, 64, False, False, True, seed=2)
    codes = layer.qweight.clone()
    x = torch.randn(3, 256)
    ref = layer(x)
    calls = []
    layer.release_codes(lambda: calls.append(1) or codes.clone())
    assert "qweight" not in dict(layer.named_buffers())  # the uint8 copy is gone
    assert rel_err(layer(x), ref) < 1e-6 and calls == [1]  # dequantize forward restored it once
    assert torch.equal(layer.qweight, codes) and calls == [1]
    layer.release_codes(lambda: codes.clone())
    assert torch.equal(layer.state_dict()["qweight"], codes)  # checkpoints still get the codes


def test_group_order_act_order_makes_groups_contiguous():
    k, gs = 256, 64
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    g = torch.empty(k, dtype=torch.int32)
    g[perm] = (torch.arange(k) // gs).to(torch.int32)
    order = layout.contiguous_group_order(g, k // gs)
    assert order.group_size == gs
    assert torch.equal(g[order.perm].long(), torch.arange(k) // gs)


def test_group_order_default_and_per_channel_need_no_permutation():
    assert layout.contiguous_group_order(default_g_idx(256, 64), 4).perm is None
    per_channel = layout.contiguous_group_order(default_g_idx(256, -1), 1)
    assert per_channel.perm is None and per_channel.group_size == 256


def test_group_order_rejects_unequal_groups():
    g = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    with pytest.raises(CompressError, match="exactly"):
        layout.contiguous_group_order(g, 2)


# ---------------------------------------------------------------- CPU int4 path

CPU_CASES = [  # (out, in, group, symmetric, act_order, bias)
    (64, 256, 32, False, False, False),
    (48, 576, 64, True, False, True),
    (100, 512, 128, False, False, False),  # rows padded to a multiple of 16
    (32, 512, 256, True, False, False),
    (40, 576, -1, False, False, True),  # per-channel -> repeated over groups of 64
    (48, 1024, 512, False, False, False),  # wide groups -> 256
    (48, 384, 32, False, True, True),  # act-order
    (32, 512, -1, True, True, False),  # act-order with one group: no permutation needed
]


@pytest.mark.skipif(not cpu_int4.available()[0], reason="torch without the CPU int4 kernel")
@pytest.mark.parametrize("n,k,gs,sym,act,bias", CPU_CASES)
def test_cpu_int4_matches_float64_reference(n, k, gs, sym, act, bias):
    layer = make_layer(n, k, gs, sym, act, bias, seed=n + k)
    wt = cpu_int4.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, layer.bias)
    x = torch.randn(3, 5, k)
    y = cpu_int4.int4_matmul(x, wt)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    # bf16 activations and bf16 scales/zeros: a few 1e-3 (measured 2-3e-3)
    assert rel_err(y, reference(layer, x)) < 1e-2


@pytest.mark.skipif(not cpu_int4.available()[0], reason="torch without the CPU int4 kernel")
def test_cpu_int4_zero_point_convention_with_extreme_zeros():
    """Ours: w = (q - z) s; the kernel's: w = (q - 8) scale + zero. Zeros 0 and 15 test the mapping."""
    n, k, gs = 32, 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s = torch.rand(n, k // gs) + 0.5
    z = torch.where(torch.rand(n, k // gs) < 0.5, 0, 15).to(torch.uint8)
    layer = QuantizedLinear.from_codes(q, s, z, default_g_idx(k, gs), 4, gs, False)
    wt = cpu_int4.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, None)
    x = torch.randn(4, k)
    assert rel_err(cpu_int4.int4_matmul(x, wt), reference(layer, x)) < 1e-2


def test_cpu_int4_refuses_unsupported_group():
    assert cpu_int4.unsupported_reason(4, 96, 48) is not None
    assert cpu_int4.unsupported_reason(3, 256, 128) is not None
    assert cpu_int4.unsupported_reason(4, 256, 128) is None


# ---------------------------------------------------------------- dispatch

def tiny_quantized_model(gs: int = 64, device: str = "cpu", act_order: bool = False):
    """A 2-block Llama with RTN INT4 layers; with act_order, groups follow a random column
    permutation per input (q/k/v share one, gate/up another, as GPTQ's act-order gives layers that
    see the same Hessian)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    groups = get_adapter(model).input_groups(model)
    perms = shared_permutations(groups, {n: model.get_submodule(n).in_features for g in groups for n in g},
                                torch.Generator().manual_seed(0))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            if act_order:
                q, s, z, g = rtn_quantize_permuted(mod.weight.data, 4, gs, False, perms[name])
            else:
                q, s, z = rtn_quantize(mod.weight.data, 4, gs, False)
                g = default_g_idx(mod.in_features, gs)
            set_submodule(model, name, QuantizedLinear.from_codes(q, s, z, g, 4, gs, False, act_order=act_order))
    return model.to(device)


@pytest.mark.skipif(not cpu_int4.available()[0], reason="torch without the CPU int4 kernel")
def test_accelerate_auto_on_cpu_installs_cpu_int4_and_says_so(caplog):
    model = tiny_quantized_model()
    ids, long_ids = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref, ref_long = model(ids).logits, model(long_ids).logits
        with caplog.at_level(logging.WARNING, logger="compress.kernels.dispatch"):
            report = accelerate(model, cpu_prefill="fp32")
        fast = model(ids).logits
        dense = model(long_ids).logits  # past the dense thresholds: dequantized, exact fp32
    assert report.counts() == {"cpu-int4": 14}
    assert report.fused_blocks == 0 and "CUDA kernel" in report.fused_blocks_reason  # a GPU-only fusion
    assert any("cpu-int4" in r.message for r in caplog.records)
    assert rel_err(fast, ref) < 3e-2  # bf16 activations through two blocks
    assert rel_err(dense, ref_long) < 1e-5
    # not stacked on the CPU: one int4 call for q/k/v took as long as three inside the model (the
    # kernel's time is per byte there) and the member bookkeeping cost host time (docs/design/experiments.md)
    assert report.fused == []



@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_cpu_backend_runs_prefill_densely_and_decode_on_int4(monkeypatch, kernel):
    from compress.kernels import cpu_native, dispatch

    ok, why = (cpu_int4 if kernel == "torch" else cpu_native).available()
    if not ok:
        pytest.skip(why)
    layer = make_layer(96, 256, 64, False, True, True, seed=4)
    accelerate(nn.Sequential(layer), backend="cpu-int4", cpu_prefill="fp32", cpu_kernel=kernel)
    calls = []
    module, fn = (cpu_int4, "int4_matmul") if kernel == "torch" else (cpu_native, "matmul")
    monkeypatch.setattr(module, fn, lambda x, wt: calls.append(x.shape) or torch.zeros(*x.shape[:-1], 96))
    rows = dispatch.CPU_DENSE_MIN_ROWS if kernel == "torch" else dispatch.CPU_NATIVE_DENSE_MIN_ROWS
    assert layer._backend.min_rows == rows
    big = torch.randn(2, rows // 2, 256)  # exactly the threshold: dense fp32
    assert rel_err(layer(big), reference(layer, big)) < 1e-6 and not calls
    layer(torch.randn(1, 1, 256))  # decode-sized: the int4 kernel
    layer(torch.randn(1, rows - 1, 256))
    assert calls == [(1, 1, 256), (1, rows - 1, 256)]
    # bf16 dense product: its own threshold, bf16-level error, never the int4 kernel
    accelerate(nn.Sequential(layer), backend="cpu-int4", cpu_prefill="bf16", cpu_kernel=kernel)
    assert layer._backend.dense_dtype == torch.bfloat16
    calls.clear()
    rows = layer._backend.min_rows
    assert rows == dispatch.CPU_BF16_DENSE_MIN_ROWS
    big = torch.randn(1, rows, 256)
    y = layer(big)
    assert y.dtype == torch.float32 and not calls
    assert 1e-6 < rel_err(y, reference(layer, big)) < 1e-2  # rounded to bf16, so not exact
    layer(torch.randn(1, rows - 1, 256))
    assert calls == [(1, rows - 1, 256)]


@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_cpu_dense_linear_fp32_is_exact_and_bf16_is_close(act, per_channel):
    layer = make_layer(80, 192, -1 if per_channel else 64, False, act, True, seed=11)
    x = torch.randn(3, 24, 192)
    ref = reference(layer, x)
    exact = cpu_int4.dense_linear(layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.bias, torch.float32)
    assert rel_err(exact(x), ref) < 1e-6
    fast = cpu_int4.dense_linear(layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.bias, torch.bfloat16)
    y = fast(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert rel_err(y, ref) < 1e-2
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_int4.dense_linear(layer.qweight, layer.scales, layer.zeros, layer.g_idx, None, torch.float16)


def test_cpu_prefill_auto_follows_the_cpu_and_bad_values_are_refused(monkeypatch):
    from compress.kernels import dispatch

    with pytest.raises(ConfigError, match="cpu_prefill"):
        accelerate(nn.Sequential(make_layer(32, 64, 32, False, False, False)), cpu_prefill="fp16")
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(cpu_int4, "fast_bf16_matmul", lambda native=native: native)
        assert dispatch._cpu_prefill_dtype("auto") == want
    assert dispatch._cpu_prefill_dtype("fp32") == torch.float32
    assert dispatch._cpu_prefill_dtype("bf16") == torch.bfloat16

def test_accelerate_falls_back_with_a_warning_when_triton_cannot_run(caplog):
    model = tiny_quantized_model()
    if HAS_CUDA:
        pytest.skip("this host has CUDA; the fallback is exercised on CPU-only machines")
    with caplog.at_level(logging.WARNING, logger="compress.kernels.dispatch"):
        report = accelerate(model, backend="triton")
    assert report.paths == ["dequant-fallback"]
    assert any("dequant-fallback" in r.message and "CUDA" in r.message for r in caplog.records)
    assert all(m._backend is None for m in model.modules() if isinstance(m, QuantizedLinear))


def test_accelerate_falls_back_for_an_unsupported_layer(caplog):
    model = nn.Sequential(make_layer(32, 96, 24, False, False, False))  # groups of 24: no CPU kernel
    x = torch.randn(2, 96)
    with caplog.at_level(logging.WARNING, logger="compress.kernels.dispatch"):
        report = accelerate(model, backend="cpu-int4")
    assert report.paths == ["dequant-fallback"]
    assert any("dequant-fallback" in r.message and "24" in r.message for r in caplog.records)
    assert rel_err(model(x), reference(model[0], x)) < 1e-5


def take_gpu_path_with(monkeypatch, fake_backend) -> None:
    """Make ``accelerate(backend="triton")`` take its GPU path on the CPU, each layer's packing and
    kernel stood in for by ``fake_backend(mod, large_m, width, pdl)`` (returns the forward)."""
    from compress.kernels import dispatch

    monkeypatch.setattr(dispatch, "_triton_status", lambda: (True, ""))
    monkeypatch.setattr(dispatch, "_choose", lambda mod, *a: ("triton", "GPU W4A16"))
    monkeypatch.setattr(dispatch, "_triton_backend", fake_backend)


def test_accelerate_gpu_path_names_the_kernel_and_releases_the_codes(monkeypatch):
    """The install step of the GPU path, on the CPU: packing is stood in for by the real layouts of
    the two kernels (what ``triton_w4a16.repack`` chooses between), so the dispatcher's naming and the
    released codes' exact restore are checked without CUDA."""
    from types import SimpleNamespace

    def fake_backend(mod, large_m, width, pdl=True):
        kernel = "cuda" if mod.out_features == 48 else "triton"
        order = layout.contiguous_group_order(mod.g_idx, mod.n_groups)
        codes = layout.ordered_codes(mod.qweight, order)
        words, w = (layout.pack_chunked(codes), 1) if kernel == "cuda" else (layout.pack_planar(codes, 16), 16)
        packed = SimpleNamespace(
            kernel=kernel, restore_codes=lambda: layout.restore_codes(words, mod.in_features, w, order.perm))

        def forward(x):
            raise AssertionError("not called in this test")
        forward.packed = packed
        forward.restore_codes = packed.restore_codes
        return forward

    take_gpu_path_with(monkeypatch, fake_backend)
    model = nn.Sequential(make_layer(48, 256, 32, False, True, True, seed=7),  # act-order: codes permuted
                          make_layer(40, 48, 16, True, False, False, seed=8))
    codes = [m.qweight.clone() for m in model]
    x = torch.randn(3, 256)
    ref = reference(model[1], reference(model[0], x).float())
    report = accelerate(model, backend="triton")
    assert report.layers == {"0": "cuda", "1": "triton"}
    assert "CUDA kernel" in report.reasons["0"] and "Triton kernel" in report.reasons["1"]
    assert all("qweight" not in dict(m.named_buffers()) for m in model)  # the uint8 copies are freed
    for m in model:
        m.set_backend(None)  # the dequantize forward reads qweight: restored exactly from the words
    assert rel_err(model(x), ref) < 1e-6
    assert all(torch.equal(m.qweight, c) for m, c in zip(model, codes))


def install_exact_gpu_stand_in(monkeypatch) -> list[int]:
    """Make ``accelerate(backend="triton")`` take its GPU path on the CPU, with each packed layer
    stood in for by an exact dequantize-and-multiply that keeps its codes for the restore. Returns
    the list that records each call's out_features."""
    from types import SimpleNamespace

    calls: list[int] = []

    def fake_backend(mod, large_m, width, pdl=True):
        w, codes = mod.dequantize(), mod.qweight.clone()

        def forward(x):
            calls.append(mod.out_features)
            return nn.functional.linear(x, w.to(x.dtype))
        forward.packed = SimpleNamespace(kernel="cuda", restore_codes=lambda rows=slice(None): codes[rows].clone())
        forward.restore_codes = forward.packed.restore_codes
        return forward

    take_gpu_path_with(monkeypatch, fake_backend)
    return calls


def test_accelerate_stacks_qkv_and_gate_up_into_one_launch(monkeypatch):
    """Fusion on the CPU: the GPU kernel is stood in for by an exact dequantize-and-multiply of the
    STACKED layer, so the member slicing, the one-call-per-group bookkeeping, the codes' release and
    exact per-member restore, and a member called alone on another input are all checked."""
    calls = install_exact_gpu_stand_in(monkeypatch)
    model = tiny_quantized_model()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    codes = {n: model.get_submodule(n).qweight.clone() for n in names}
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        report = accelerate(model, backend="triton", fuse_blocks=False)  # fused blocks: test_fused_block.py
        calls.clear()
        fast = model(ids).logits
    attn = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]
    assert report.fused == [attn[:3], ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                            attn[3:], ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]]
    assert "one launch with q_proj, k_proj, v_proj" in report.reasons["model.layers.1.self_attn.k_proj"]
    # per block: q/k/v (128 + 64 + 64 rows) once, gate/up (256 + 256) once, o_proj and down_proj alone
    assert sorted(calls) == sorted([256, 512, 128, 128] * 2)
    assert rel_err(fast, ref) < 1e-6
    assert all("qweight" not in dict(model.get_submodule(n).named_buffers()) for n in names)
    k_proj = model.model.layers[0].self_attn.k_proj
    x = torch.randn(3, 128)
    with torch.no_grad():
        alone = k_proj(x)  # a member called by itself (no pending slice for this input)
    assert alone.shape == (3, 64) and rel_err(alone, reference(k_proj, x)) < 1e-6
    for n in names:  # each member's codes come back exactly (its rows of the stacked layer)
        assert torch.equal(model.get_submodule(n).qweight, codes[n]), n



def test_stacked_projections_trace_under_torch_compile_in_one_graph(monkeypatch):
    """Dynamo traces the members' bookkeeping without graph breaks and keeps one matmul per group:
    9 linear nodes for 2 blocks (q/k/v, o, gate/up, down each, and lm_head) instead of 15."""
    install_exact_gpu_stand_in(monkeypatch)
    model = tiny_quantized_model()
    ids = torch.randint(0, 256, (1, 9))
    linears = []

    def count(gm, example_inputs):
        linears.append(sum(1 for node in gm.graph.nodes if "linear" in str(node.target)))
        return gm.forward

    with torch.no_grad():
        ref = model(ids).logits
        accelerate(model, backend="triton", fuse_blocks=False)
        torch._dynamo.reset()
        got = torch.compile(model, backend=count, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert linears == [9]
    assert rel_err(got, ref) < 1e-6

def test_fused_group_recomputes_for_a_changed_input():
    from types import SimpleNamespace

    from compress.kernels.fused import FusedGroup

    n_calls = []

    def fn(x):
        n_calls.append(1)
        return torch.cat([x, 2 * x], -1)

    group = FusedGroup(fn, [(0, 2), (2, 4)], ["a", "b"])
    codes = torch.arange(8, dtype=torch.uint8).view(4, 2)
    packed = SimpleNamespace(restore_codes=lambda rows: codes[rows].clone())
    a, b = (group.member(i, packed) for i in (0, 1))
    assert torch.equal(b.restore_codes(), codes[2:4])  # a member's rows of the stacked codes
    x = torch.ones(1, 2)
    assert torch.equal(a(x), x) and torch.equal(b(x), 2 * x) and len(n_calls) == 1
    a(x)
    x.mul_(3)  # in place between two members: b must see the new values
    assert torch.equal(b(x), 6 * torch.ones(1, 2)) and len(n_calls) == 3
    assert torch.equal(a(x), 3 * torch.ones(1, 2)) and len(n_calls) == 3  # a's slice of that call
    assert group._x is None  # nothing held once every member has its slice


@pytest.mark.gpu  # needs triton (GPU machines); runs on the host: packing and restoring only
def test_stacked_members_restore_their_rows_of_the_packed_words(monkeypatch):
    # Both GPU layouts, an act-order group (q/k/v share one permutation): each member gets exactly
    # its own codes back from the stacked packed words; the group-order sibling shares everything
    # but the permutation, and a copy of the weight starts without one.
    tw = pytest.importorskip("compress.kernels.triton_w4a16")
    from compress.kernels import cuda_w4a16, fused

    monkeypatch.setattr(cuda_w4a16, "unsupported_reason", lambda *a: None)  # pack on the host, no launch
    monkeypatch.setattr(cuda_w4a16, "pdl_supported", lambda device: False)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(256, generator=gen)
    mods = []
    for n in (128, 64, 64):
        q, s, z, g = rtn_quantize_permuted(torch.randn(n, 256, generator=gen), 4, 64, False, perm)
        mods.append(QuantizedLinear.from_codes(q, s, z, g, 4, 64, False, act_order=True))
    stacked, bounds = fused.stack(mods)
    for kernel, width in (("cuda", 1), ("triton", 16)):
        wt = tw.repack(stacked.qweight, stacked.scales, stacked.zeros, stacked.g_idx, 4, False, None, "cpu",
                       width=width, kernel=kernel)
        assert wt.kernel == kernel and wt.perm is not None
        group = fused.FusedGroup(lambda x: x, bounds, ["q", "k", "v"])
        for i, m in enumerate(mods):
            assert torch.equal(group.member(i, wt).restore_codes(), m.qweight), (kernel, i)
        sib = wt.in_group_order()
        assert sib.perm is None and sib.words is wt.words and sib.configs is wt.configs
        assert sib.launchers is wt.launchers and wt.in_group_order() is sib
        assert wt.clone()._in_group_order is None


def test_fused_group_shares_one_call_for_an_inference_tensor():
    from compress.kernels.fused import FusedGroup

    n_calls = []
    group = FusedGroup(lambda x: n_calls.append(1) or torch.cat([x, 2 * x], -1), [(0, 2), (2, 4)], ["a", "b"])
    a, b = (group.member(i, None) for i in (0, 1))
    with torch.inference_mode():
        x = torch.ones(1, 2)  # no version counter: the member calls must still pair up
        assert torch.equal(a(x), x) and torch.equal(b(x), 2 * x) and len(n_calls) == 1
        assert torch.equal(b(2 * x), 4 * x) and len(n_calls) == 2  # another tensor: computed again


def test_fusion_refuses_layers_with_different_act_order():
    from compress.kernels.fused import stackable

    a = make_layer(32, 256, 32, False, True, False, seed=1)
    b = make_layer(32, 256, 32, False, True, False, seed=2)
    assert stackable([a, a]) is None
    assert "act-order" in stackable([a, b])
    assert "in_features" in stackable([a, make_layer(32, 128, 32, False, False, False)])


def test_accelerate_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="auto"):
        accelerate(nn.Sequential(), backend="cuda-magic")


# ---------------------------------------------------------------- static-cache steps (CPU logic)

def test_static_cache_steps_reproduce_greedy_decoding():
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.kernels.gpu_timing import _Steps

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 7))
    with torch.inference_mode():
        seq, want = ids, []
        for _ in range(5):
            nxt = model(seq).logits[:, -1:].argmax(-1)
            want.append(nxt)
            seq = torch.cat([seq, nxt], 1)
        steps = _Steps(model, ids, generate=5)
        for _ in range(2):  # the second round checks that prefill resets the cache position
            steps.prefill()
            got = [steps.tok.clone()]
            for _ in range(4):
                steps.step()
                got.append(steps.tok.clone())
            assert [int(t) for t in got] == [int(t) for t in want]


# ---------------------------------------------------------------- compress bench contract

@pytest.mark.skipif(not cpu_int4.available()[0], reason="torch without the CPU int4 kernel")
def test_bench_json_contract_on_tiny_checkpoint(tmp_path, capsys):
    from compress.commands import bench
    from compress.formats import save_checkpoint

    save_checkpoint(tiny_quantized_model(), None, tmp_path / "ck")
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", str(tmp_path / "ck"), "--device", "cpu", "--prompt", "8", "--generate", "3",
                              "--repeats", "1", "--warmup", "0", "--json", "--output", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("prefill_ms", "decode_tokens_per_s", "baseline_decode_tokens_per_s", "baseline_prefill_ms"):
        assert out[key] > 0, key
    assert out["kernels"] == {"cpu-int4": 14}
    assert out["cpu_prefill"] == "auto" and out["cpu_kernel"] == "auto"
    from compress.kernels import cpu_native

    if cpu_native.available()[0]:  # auto takes the C kernel where it builds, and the JSON says so
        assert all("compress C kernel" in r for r in out["kernel_reasons"])
    assert out["decode_attention"] == out["baseline_decode_attention"] == 0  # a CUDA kernel: not on the CPU
    assert json.loads((tmp_path / "r.json").read_text())["prompt"] == 8
    with pytest.raises(SystemExit):  # argparse names the allowed values
        parser.parse_args(["bench", str(tmp_path / "ck"), "--cpu-prefill", "fp16"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", str(tmp_path / "ck"), "--cpu-kernel", "fast"])


def test_bench_rejects_bad_numbers(tmp_path):
    from compress.commands import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", str(tmp_path), "--generate", "0"])
    with pytest.raises(CompressError, match="generate"):
        bench.run_bench(args)
    args = parser.parse_args(["bench", str(tmp_path), "--inductor-pdl"])  # needs --mode compile
    with pytest.raises(CompressError, match="--inductor-pdl needs --mode compile"):
        bench.run_bench(args)


def test_inductor_pdl_only_applies_to_compiled_timing():
    from compress.kernels.gpu_timing import inductor_pdl_scope

    with pytest.raises(ConfigError, match="mode='compile' only"):
        inductor_pdl_scope("cuda_graph")


# ---------------------------------------------------------------- GPU: Triton W4A16 kernel

GPU_CASES = [  # (out, in, group, symmetric, act_order, bias, plane width)
    (256, 1024, 128, False, False, False, 16),
    (256, 1024, 128, True, False, True, 32),
    (200, 576, 64, False, False, False, 64),  # groups narrower than a block; width lowered to 64
    (192, 512, 32, True, True, True, 32),  # act-order, groups of 32
    (256, 1024, 128, False, True, False, 64),  # act-order; block of 512 spans 4 groups
    (160, 576, -1, False, False, True, 64),  # per-channel, K not a multiple of the block
    (256, 4096, 128, False, False, False, 32),
    (264, 11008, 128, False, False, False, 64),  # K = 21.5 blocks of 512: masked tail
]


def _configs(m: int, wt):
    from compress.kernels import cuda_w4a16 as cw
    from compress.kernels import triton_w4a16 as tw

    n, nb = wt.out_features, wt.n_blocks
    if wt.kernel == "cuda":
        if m > 16:
            return []
        return [cw.default_config(m, n, tiled=wt.codes_tiled), cw.CudaConfig(1, 2, 2), cw.CudaConfig(2, 8, 2), cw.CudaConfig(1, 4, 4, 2),
                cw.CudaConfig(2, 2, 2, 2)]
    cfgs = [tw.default_config(m, n, nb)]
    if m == 1:
        cfgs += [tw.KernelConfig(1, 64, 1, False, True, 4, 1, False), tw.KernelConfig(1, 32, 2, False, True, 2, 1, True),
                 tw.KernelConfig(1, 128, 1, False, False, 4, 1, False), tw.KernelConfig(16, 64, 2, True, True, 4, 2)]
    elif m <= 16:
        cfgs += [tw.KernelConfig(16, 32, 1, True, True, 4, 2), tw.KernelConfig(16, 128, 4, True, False, 4, 2)]
    elif wt.width <= 32:  # a 128 x 64-word tile needs more shared memory than a multiprocessor has
        cfgs += [tw.KernelConfig(64, 128, 1, True, True, 8, 3)]
    return cfgs


def _writes_directly(wt, cfg) -> bool:
    """False for Triton split-K configs (their result is a new tensor, not the poisoned buffer)."""
    return wt.kernel == "cuda" or -(-wt.n_blocks // -(-wt.n_blocks // cfg.split_k)) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["triton", "cuda"])
@pytest.mark.parametrize("m", [1, 3, 16, 77])
@pytest.mark.parametrize("n,k,gs,sym,act,bias,width,dtype",
                         [c + (torch.float16,) for c in GPU_CASES]
                         + [GPU_CASES[0] + (torch.bfloat16,), GPU_CASES[3] + (torch.bfloat16,)])
def test_w4a16_matches_float64_reference(n, k, gs, sym, act, bias, width, dtype, m, kernel):
    from compress.kernels import triton_w4a16 as tw

    layer = make_layer(n, k, gs, sym, act, bias, seed=n * m + k)
    args = (layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, sym, layer.bias, "cuda")
    if kernel == "cuda" and n % 16:  # 16-row tiles: the CUDA kernel refuses, auto falls back to Triton
        with pytest.raises(ValueError, match="multiple of 16"):
            tw.repack(*args, kernel="cuda")
        assert tw.repack(*args, width=width).kernel == "triton"
        return
    wt = tw.repack(*args, width=width, kernel=kernel)
    assert wt.kernel == kernel
    bound = 3e-3 if dtype == torch.float16 else 1.5e-2  # fp16 / bf16 activations and outputs
    for cfg in _configs(m, wt):
        x = torch.randn(m, k, device="cuda", dtype=dtype)  # fresh input per config
        ref = reference(layer, x)
        if _writes_directly(wt, cfg):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)  # poisoned
            y = tw.launch(x, wt, cfg, out=out)
            assert bool(torch.isfinite(y).all()), f"unwritten outputs with {cfg}"
        else:
            y = tw.launch(x, wt, cfg)
        assert rel_err(y, ref) < bound, cfg
    x = torch.randn(m, k, device="cuda", dtype=dtype)  # the public entry point (tuned-or-default config)
    assert rel_err(tw.w4a16_matmul(x, wt), reference(layer, x)) < bound
    if m > 16:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        assert rel_err(tw.dequant_matmul(x, wt), reference(layer, x)) < bound


CUDA_SHAPES = [  # (out, in, group, symmetric, act_order, bias): tails in N and K, per-channel, g256, g64
    (4112, 4096, 128, False, False, False),  # N not a multiple of 32 (NT = 2 clamps the last tile)
    (80, 11008, 128, True, False, True),  # K = 86 steps of 128
    (48, 520, -1, False, False, False),  # per-channel, K % 32 != 0 (masked 8-column loads)
    (48, 1024, 256, False, True, True),
    (32, 576, 64, False, True, False),  # groups narrower than a step: scales applied per weight
]


# repack's layouts: row-major, tile-major codes, tile-major scales and zero points, and both with evict-first
# copies (both_evf, the default since session 13)
TILE_LAYOUTS = list(CUDA_TILE_LAYOUTS.values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tile_major", TILE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,gs,sym,act,bias", CUDA_SHAPES)
def test_cuda_w4a16_every_config_and_row_count(n, k, gs, sym, act, bias, dtype, tile_major, monkeypatch):
    """Each tile count, warps per block, pipeline depth and step width the tuner may pick (tune also
    checks every config it times), M = 1..16 (the second half of activation rows starts at 9), in
    each layout repack can write."""
    from compress.kernels import cuda_w4a16 as cw
    from compress.kernels import triton_w4a16 as tw

    monkeypatch.setattr(cw, "TILE_MAJOR", tile_major)

    layer = make_layer(n, k, gs, sym, act, bias, seed=n + k)
    wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, sym, layer.bias, "cuda", kernel="cuda")
    w64 = dequantize_weight(layer.qweight, layer.scales, layer.zeros, layer.g_idx).double()
    b64 = 0 if layer.bias is None else layer.bias.detach().double()
    bound = 3e-3 if dtype == torch.float16 else 1.5e-2
    # each NT, KW, U and minb value at least once (candidate_configs has them all; the benchmark checks
    # the error of the config it picks)
    # (1, 8, 4, 2) and (2, 8, 2, 2) need 78 KB of shared memory: the opt-in above 48 KB
    configs = [cw.CudaConfig(*c) for c in ((1, 2, 2, 1), (1, 8, 4, 1), (2, 4, 4, 1), (2, 8, 2, 1),
                                            (1, 4, 2, 2), (1, 2, 4, 2), (2, 4, 2, 2), (1, 8, 2, 2, 1), (2, 4, 2, 2, 1),
                                            (1, 8, 4, 2), (2, 8, 2, 2))]
    assert all(c in cw.candidate_configs(16, n, cw.smem_limit("cuda")) for c in configs)
    for m in (1, 2, 8, 9, 16):
        for cfg in configs:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = cw.matmul(x, wt, cfg, out=out)
            assert bool(torch.isfinite(y).all()), (m, cfg)
            assert rel_err(y, x.double().cpu() @ w64.t() + b64) < bound, (m, cfg)
        # activations with a padded row stride (a slice) are read in place
        xs = torch.randn(m, k + 8, device="cuda", dtype=dtype)[:, :k]
        assert rel_err(cw.matmul(xs, wt, configs[-1]), xs.double().cpu() @ w64.t() + b64) < bound, m
    w = cw.dequantize(wt, dtype)  # group order; act-order layers permute back
    if wt.perm is not None:
        w = torch.empty_like(w).index_copy_(1, wt.perm.long(), w)
    assert rel_err(w, w64) < (1e-3 if dtype == torch.float16 else 8e-3)
    assert torch.equal(wt.restore_codes().cpu(), layer.qweight)


def test_cuda_candidate_configs_fit_the_shared_memory_they_are_given():
    from compress.kernels import cuda_w4a16 as cw

    small, large = cw.candidate_configs(1, 4096), cw.candidate_configs(1, 4096, 227 * 1024)
    assert small and all(c.smem_bytes() <= cw.SMEM_LIMIT for c in small)
    assert set(small) < set(large) and all(c.smem_bytes() <= 227 * 1024 for c in large)
    # the deeper pipelines only dynamic shared memory allows: every warp of 8 with 4 stages of 256 columns
    assert cw.CudaConfig(1, 8, 4, 2) in large and cw.CudaConfig(1, 8, 4, 2) not in small
    assert all(c.stages in (2, 4) for c in large)


@pytest.mark.parametrize("tiled", [False, True])
def test_cuda_default_config_is_a_candidate_that_fits_any_gpu(tiled):
    """The untuned config must be one ``tune`` would time (so the GPU tests cover it) and fit 48 KB
    with the fused RMSNorm prologue, on every row count and on thin, Llama and tall layers."""
    from compress.kernels import cuda_w4a16 as cw

    for n in (256, 576, 4096, 11008, 14336, 22016, 128256):
        for m in range(1, 17):
            cfg = cw.default_config(m, n, tiled=tiled)
            assert cfg in cw.candidate_configs(m, n), (m, n, cfg)
            assert cfg.smem_bytes(norm=True) <= cw.SMEM_LIMIT, (m, n, cfg)
    # what the sweeps chose per layout (docs/design/experiments.md): at one row the tile-major rule gives tall
    # layers two tiles per warp and 4096-row ones one; row-major keeps one tile everywhere
    assert cw.default_config(1, 11008, tiled=True) == cw.CudaConfig(nt=2, kw=4, stages=2, kc=1, minb=1)
    assert cw.default_config(1, 4096, tiled=True) == cw.CudaConfig(nt=1, kw=8, stages=2, kc=1, minb=1)
    assert cw.default_config(1, 11008, tiled=False) == cw.CudaConfig(nt=1, kw=4, stages=2, kc=2, minb=0)
    assert cw.default_config(16, 4096, tiled=True) == cw.CudaConfig(nt=2, kw=8, stages=2, kc=1, minb=1)


def test_cuda_default_config_follows_the_layout_repack_writes(monkeypatch):
    from compress.kernels import cuda_w4a16 as cw

    for name, (tiled, _, _) in cw.TILE_LAYOUTS.items():
        monkeypatch.setattr(cw, "TILE_MAJOR", cw.TILE_LAYOUTS[name])
        assert cw.default_config(1, 14336) == cw.default_config(1, 14336, tiled=tiled)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_w4a16_runs_inside_a_cuda_graph():
    from compress.kernels import cuda_w4a16 as cw
    from compress.kernels import triton_w4a16 as tw

    layer = make_layer(256, 1024, 128, False, False, True, seed=9)
    wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, False, layer.bias, "cuda", kernel="cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    cfg = cw.default_config(1, 256)
    cw.matmul(x, wt, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cw.matmul(x, wt, cfg)
    for _ in range(2):  # replays see new inputs written into the captured buffer
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, reference(layer, x)) < 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_triton_dequantize_matches_reference_for_every_width():
    from compress.kernels import triton_w4a16 as tw

    layer = make_layer(136, 1152, 64, False, True, False, seed=3)
    ref = reference(layer, torch.eye(1152)).t()  # [N, K] dequantized weight in float64
    for width in (16, 32, 64):
        wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, False, None, "cuda", width=width,
                       kernel="triton")
        assert wt.width == width
        assert rel_err(tw.dequantize_packed(wt, torch.float32), ref) < 1e-3  # fp16 scales
        w_sorted = tw.dequantize_sorted(wt, torch.float16)
        back = torch.empty_like(w_sorted).index_copy_(1, wt.perm.long(), w_sorted)
        assert rel_err(back, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_accelerate_on_cuda_installs_triton_and_matches_dequant():
    model = tiny_quantized_model(device="cuda").half()
    ids = torch.randint(0, 256, (2, 9), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        ref_one = model(ids[:1, :1]).logits
        report = accelerate(model)
        fast = model(ids).logits
        one = model(ids[:1, :1]).logits  # decode-shaped call (M = 1)
    assert report.counts() == {"cuda": 14}  # the CUDA kernel where it can run, reported by its name
    assert len(report.fused) == 4  # q/k/v and gate/up of both blocks stacked
    assert rel_err(one, ref_one) < 1e-2
    from compress.kernels.dispatch import packed_weights
    assert {w.kernel for w in packed_weights(model).values()} == {"cuda"}
    assert not any("qweight" in dict(m.named_buffers()) for m in model.modules() if isinstance(m, QuantizedLinear))
    assert rel_err(fast, ref) < 1e-2
    assert bool(torch.isfinite(one).all())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_timing_matches_eager_tokens():
    from compress.kernels.gpu_timing import time_generation

    model = tiny_quantized_model(device="cuda").half()
    accelerate(model)
    r = time_generation(model, prompt=16, generate=6, mode="cuda_graph", repeats=2, warmup=1)
    assert r["tokens_match_eager"] and r["decode_ms_per_token"] > 0 and r["prefill_ms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [False, True])
def test_cuda_w4a16_chain_of_dependent_launches(pdl):
    """Each layer reads the previous layer's output: with programmatic dependent launch a kernel
    starts before its predecessor ends, so reading x before GRID_WAIT would show up here (eager and
    in a CUDA graph, new inputs each replay)."""
    from compress.kernels import cuda_w4a16 as cw
    from compress.kernels import triton_w4a16 as tw

    layers = [make_layer(1024, 1024, 128, False, False, False, seed=20 + i) for i in range(6)]
    wts = [tw.repack(m.qweight, m.scales, m.zeros, m.g_idx, 4, False, None, "cuda", kernel="cuda", pdl=pdl)
           for m in layers]
    assert all(w.pdl == (pdl and cw.pdl_supported("cuda")) for w in wts)
    cfg = cw.default_config(1, 1024)

    def chain(x):
        for w in wts:
            x = cw.matmul(x, w, cfg) * (1 / 32)  # keep the activations near unit scale
        return x

    def ref(x):
        for m in layers:
            x = (reference(m, x.float()) * (1 / 32)).half()
        return x

    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    chain(x)  # first launches (plain) and compilation outside the capture
    torch.cuda.synchronize()
    assert rel_err(chain(x), ref(x)) < 2e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref(x)) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tile_major", TILE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dequantize_word_per_thread(dtype, tile_major, monkeypatch):
    from compress.kernels import cuda_w4a16 as cw
    from compress.kernels import triton_w4a16 as tw

    monkeypatch.setattr(cw, "TILE_MAJOR", tile_major)

    for n, k, gs, act in [(272, 4224, 128, False), (64, 2048, 32, True), (48, 1000, -1, False)]:
        layer = make_layer(n, k, gs, False, act, False, seed=5)
        wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, False, None, "cuda", kernel="cuda")
        w = cw.dequantize(wt, dtype)
        if wt.perm is not None:
            w = torch.empty_like(w).index_copy_(1, wt.perm.long(), w)
        assert rel_err(w, layer.dequantize()) < (3e-3 if dtype == torch.float16 else 1.5e-2), (n, k, gs)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_torch_compile_runs_the_kernels_as_a_custom_op():
    from compress.kernels.gpu_timing import time_generation

    model = tiny_quantized_model(device="cuda").half()
    report = accelerate(model)
    assert len(report.fused) == 4
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    with torch.inference_mode():
        ref = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, dynamic=False)(ids).logits
    assert rel_err(got, ref) < 1e-2
    r = time_generation(model, prompt=16, generate=6, mode="compile", repeats=1, warmup=1)
    assert r["tokens_match_eager"] and r["decode_ms_per_token"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_act_order_gather_is_a_graph_op_under_torch_compile(monkeypatch):
    # Under torch.compile the gather x[..., perm] is left to Inductor and every kernel call is told
    # that x is already in group order; the logits match the eager path.
    from compress.kernels import triton_w4a16 as tw

    model = tiny_quantized_model(device="cuda", act_order=True).half()
    accelerate(model)
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    seen = []
    real = tw.w4a16_matmul
    monkeypatch.setattr(tw, "w4a16_matmul", lambda x, wt, gathered=False: seen.append(gathered) or real(x, wt, gathered))
    with torch.inference_mode():
        ref = model(ids).logits
        assert seen and not any(seen)
        seen.clear()
        torch._dynamo.reset()
        got = torch.compile(model, dynamic=False)(ids).logits
    assert len(seen) == 8 and all(seen)  # 2 blocks x (q/k/v, o, gate/up, down), one call each
    assert rel_err(got, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0), reason="needs an sm_90+ GPU")
def test_inductor_pdl_chains_its_kernels_with_ours_correctly():
    # Inductor's kernels launched with PDL wait on the device before reading what our kernel wrote
    # (and ours waits before reading theirs): same logits as eager, and the code really uses PDL.
    from torch._inductor.utils import run_and_get_code

    from compress.kernels.gpu_timing import inductor_pdl_scope, time_generation

    model = tiny_quantized_model(device="cuda").half()
    accelerate(model)
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    with torch.inference_mode():
        ref = model(ids).logits
        torch._dynamo.reset()
        with inductor_pdl_scope("compile"):
            got, code = run_and_get_code(lambda: torch.compile(model, dynamic=False)(ids).logits)
    assert "gdc_wait" in "".join(code)
    assert rel_err(got, ref) < 1e-2
    r = time_generation(model, prompt=16, generate=6, mode="compile", repeats=1, warmup=1, inductor_pdl=True)
    assert r["tokens_match_eager"] and r["inductor_pdl"] and r["decode_ms_per_token"] > 0


def test_act_order_test_layers_share_one_order_per_input():
    """Layers that read the same input (the adapter's true-sequential groups) get one permutation."""
    model = tiny_quantized_model()
    groups = get_adapter(model).input_groups(model)
    assert groups[:4] == [[f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], ["model.layers.0.self_attn.o_proj"],
                          ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.down_proj"]]
    perms = shared_permutations(groups, {n: model.get_submodule(n).in_features for g in groups for n in g},
                                torch.Generator().manual_seed(0))
    assert perms["model.layers.0.self_attn.q_proj"] is perms["model.layers.0.self_attn.v_proj"]
    assert not torch.equal(perms["model.layers.0.self_attn.q_proj"], perms["model.layers.0.self_attn.o_proj"])
    assert sorted(perms["model.layers.1.mlp.down_proj"].tolist()) == list(range(256))


def test_tile_layout_env_picks_the_default_layout_and_rejects_unknown_names(monkeypatch):
    from compress.kernels import cuda_w4a16 as cw

    monkeypatch.delenv(cw.TILE_LAYOUT_ENV, raising=False)
    # without the variable: tile-major codes and scales, evict-first copies (session 13's default)
    assert cw._layout_from_env() == cw.TILE_LAYOUTS["both_evf"] == (True, True, True)
    monkeypatch.setenv(cw.TILE_LAYOUT_ENV, "row")
    assert cw._layout_from_env() == (False, False, False)
    monkeypatch.setenv(cw.TILE_LAYOUT_ENV, "tiled")
    with pytest.raises(ValueError, match="COMPRESS_TILE_LAYOUT='tiled': choose one of row, codes, both, both_evf"):
        cw._layout_from_env()
