"""The C INT4 kernel (compress.kernels.cpu_native): every ISA variant this CPU can run, against a
float64 reference on fresh random inputs (never zeros), plus packing, dequantization, code release
and accelerate's choice between it and torch's kernel."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.errors import ConfigError
from compress.kernels import accelerate, cpu_int4, cpu_native
from compress.nn.qlinear import QuantizedLinear
from tests.test_kernels import make_layer, reference, rel_err, tiny_quantized_model

HAVE, WHY = cpu_native.available()
pytestmark = pytest.mark.skipif(not HAVE, reason=f"C kernel unavailable: {WHY}")


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


# every variant the host can execute: -march=native (AVX-512 here where the CPU has it), AVX2, plain C
MARCHES = ["native"] + (["x86-64-v3"] if {"avx2", "fma"} <= _cpu_flags() else []) + (
    ["x86-64"] if "sse2" in _cpu_flags() else [])


@pytest.fixture(params=MARCHES)
def lib(request):
    return cpu_native.load(request.param)


@pytest.mark.parametrize("n,k,gs,sym,act,bias,m", [
    (96, 256, 64, True, False, True, 1),     # 4-row blocks and a remainder-free N
    (37, 256, 32, False, True, False, 3),    # act-order, odd N (row remainders), 3 activation rows
    (50, 192, -1, False, False, True, 5),    # per channel, K = 12 chunks, 5 rows (a 4-row tile + 1)
    (64, 176, 16, True, True, True, 2),      # group of one 16-code chunk
    (130, 512, 128, False, False, False, 16),  # decode batch 16
])
@pytest.mark.parametrize("bits", [4, 8])
def test_native_matches_float64_reference(lib, n, k, gs, sym, act, bias, m, bits):
    layer = make_layer(n, k, gs, sym, act, bias, seed=n + k, bits=bits)
    wt = cpu_native.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, bits, layer.bias, lib=lib)
    assert wt.code_bits == bits and wt.packed.numel() == wt.rows * k * bits // 8
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = cpu_native.matmul(x, wt)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # fp32 arithmetic throughout: errors at the 1e-6 level (the AVX-512 variant's 1 + q/16 values
    # cancel against the group sums, a few ulps more than AVX2's), far below torch's bf16 kernel (~3e-3)
    assert rel_err(y, reference(layer, x)) < 5e-6
    assert cpu_native.matmul(x[:0], wt).shape == (0, n)  # an empty batch is not an error
    # leading dimensions and other float dtypes round-trip
    x3 = x.reshape(1, m, k).to(torch.bfloat16)
    y3 = cpu_native.matmul(x3, wt)
    assert y3.dtype == torch.bfloat16 and y3.shape == (1, m, n)
    assert rel_err(y3, reference(layer, x3.float())) < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_native_pack_dequantize_and_codes_round_trip(lib, bits):
    layer = make_layer(40, 96, 32, False, True, True, seed=3, bits=bits)
    wt = cpu_native.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, bits, layer.bias, lib=lib)
    # 40 rows padded to 48, half a byte or a byte per code
    assert wt.packed.shape == (48 * 96 * bits // 8,) and wt.packed.dtype == torch.uint8 and wt.rows == 48
    assert int(layer.qweight.max()) > 15 if bits == 8 else True  # the 8-bit case really uses the high nibble
    assert torch.equal(wt.restore_codes(), layer.qweight)
    assert torch.allclose(cpu_native.dequantize(wt), layer.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("act", [False, True])
def test_dense_matmul_blocks_are_exact_in_fp32_and_close_in_bf16(monkeypatch, act):
    layer = make_layer(70, 128, 32, False, act, True, seed=6)
    wt = cpu_native.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, layer.bias)
    x = torch.randn(2, 24, 128)
    ref = reference(layer, x)
    whole = cpu_native.dense_matmul(x, wt)
    monkeypatch.setattr(cpu_native, "DENSE_BLOCK_BYTES", 16 * 128 * 4)  # 16-row blocks, a ragged last one
    blocked = cpu_native.dense_matmul(x, wt)
    assert blocked.shape == (2, 24, 70) and blocked.is_contiguous()
    assert rel_err(whole, ref) < 1e-6 and rel_err(blocked, ref) < 1e-6
    y = cpu_native.dense_matmul(x, wt, torch.bfloat16)
    assert y.dtype == torch.float32 and 1e-6 < rel_err(y, ref) < 1e-2  # rounded to bf16, so not exact


def test_native_extreme_zero_points_and_scales():
    # zero points 0 and 15 and scales spanning 1e-4..1: the zero-point term is exact in fp32
    layer = make_layer(32, 128, 32, False, False, False, seed=5)
    with torch.no_grad():
        layer.zeros.copy_(torch.randint(0, 2, layer.zeros.shape, dtype=torch.uint8) * 15)
        layer.scales.copy_(10 ** torch.empty(layer.scales.shape).uniform_(-4, 0))
    wt = cpu_native.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, None)
    x = torch.randn(2, 128)
    assert rel_err(cpu_native.matmul(x, wt), reference(layer, x)) < 2e-6


def test_native_refuses_what_it_cannot_tile():
    assert cpu_native.unsupported_reason(4, 96, 24) is not None  # group not a multiple of 16
    assert cpu_native.unsupported_reason(16, 256, 128) is not None  # 16-bit codes
    assert cpu_native.unsupported_reason(8, 256, 128) is None  # 8-bit codes: one byte each
    assert cpu_native.unsupported_reason(3, 256, 128) is None  # codes < 16 run unchanged
    layer = make_layer(8, 72, 24, True, False, False)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_native.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, None)


def test_native_uses_threads_without_changing_results():
    layer = make_layer(512, 512, 64, False, False, True, seed=9)  # big enough for the parallel path
    wt = cpu_native.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, layer.bias)
    x = torch.randn(3, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_native.matmul(x, wt)
        torch.set_num_threads(2)
        two = cpu_native.matmul(x, wt)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # rows are split between threads, never a reduction


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_native, "_compiler", lambda: "false")
    with pytest.raises(cpu_native.NativeUnavailable, match="failed"):
        cpu_native.load.__wrapped__("native")
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


def test_accelerate_prefers_the_c_kernel_and_releases_the_codes(caplog):
    model = tiny_quantized_model(act_order=True)
    ids, long_ids = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref, ref_long = model(ids).logits, model(long_ids).logits
        with caplog.at_level(logging.WARNING, logger="compress.kernels.dispatch"):
            report = accelerate(model, cpu_prefill="fp32")
        fast, dense = model(ids).logits, model(long_ids).logits
    assert report.counts() == {"cpu-int4": 14}
    assert all("compress C kernel" in r for r in report.reasons.values())
    assert any("compress C kernel" in r.message for r in caplog.records)
    assert rel_err(fast, ref) < 1e-5  # fp32 end to end (torch's bf16 kernel: ~1e-2)
    assert rel_err(dense, ref_long) < 1e-5
    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert all("qweight" not in m._buffers for m in mods)  # the packed nibbles hold the codes
    state = model.state_dict()  # ...and come back exactly when something reads them
    assert all(state[n + ".qweight"].dtype == torch.uint8 for n, m in model.named_modules() if m in mods)


def test_accelerate_cpu_kernel_option(monkeypatch):
    layer = make_layer(48, 128, 64, False, False, True, seed=2)
    if cpu_int4.available()[0]:
        report = accelerate(nn.Sequential(layer), backend="cpu-int4", cpu_kernel="torch")
        assert "_weight_int4pack_mm_for_cpu" in next(iter(report.reasons.values()))
        assert "qweight" in layer._buffers  # torch's kernel keeps the uint8 codes for its dense path
    report = accelerate(nn.Sequential(layer), backend="cpu-int4", cpu_kernel="native")
    assert "compress C kernel" in next(iter(report.reasons.values()))
    with pytest.raises(ConfigError, match="cpu_kernel"):
        accelerate(nn.Sequential(layer), cpu_kernel="fast")
    from compress.kernels import dispatch

    monkeypatch.setattr(cpu_native, "available", lambda: (False, "no C compiler found"))
    with pytest.raises(ConfigError, match="no C compiler"):
        accelerate(nn.Sequential(layer), cpu_kernel="native")
    report = accelerate(nn.Sequential(layer), cpu_kernel="auto")  # falls back, and says why
    reason = next(iter(report.reasons.values()))
    assert ("no C compiler" in reason) and report.counts() in ({"cpu-int4": 1}, {"dequant-fallback": 1})
    assert dispatch.CPU_KERNELS == ("auto", "native", "torch")


def test_a_layer_neither_cpu_kernel_tiles_falls_back_with_both_reasons():
    if not cpu_int4.available()[0]:
        pytest.skip("torch without the CPU int4 kernel")
    # a group of 24 columns: neither kernel tiles it, so the layer takes the dequantize fallback and
    # the report gives both reasons
    layer = make_layer(16, 96, 24, True, False, False)
    report = accelerate(nn.Sequential(layer), backend="cpu-int4")
    assert report.counts() == {"dequant-fallback": 1}
    reason = next(iter(report.reasons.values()))
    assert "multiple of 16" in reason and "supported group size" in reason


def test_c_kernel_is_one_opaque_op_under_torch_compile():
    # ctypes cannot be traced: under compilation the installed forward calls the custom op
    # compress::cpu_int4_linear (fake implementation for the shapes), so the graph does not break
    layer = make_layer(48, 128, 64, False, True, True, seed=8)
    accelerate(nn.Sequential(layer), backend="cpu-int4", cpu_kernel="native", cpu_prefill="fp32")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    for rows in (1, 64):  # the kernel and the dense path, both behind the op
        x = torch.randn(1, rows, 128)
        with torch.no_grad():
            y = compiled(x)
        assert y.shape == (1, rows, 48)
        assert rel_err(y, reference(layer, x)) < 5e-6
    torch._dynamo.reset()


# ---------------------------------------------------------------- 8-bit layers and the INT8 lm_head

def _tiny_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=200, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_an_8bit_layer_runs_the_c_kernel_through_accelerate():
    layer = make_layer(40, 128, 64, False, False, True, seed=4, bits=8)
    x = torch.randn(3, 128)
    report = accelerate(nn.Sequential(layer), backend="cpu-int4")
    assert report.counts() == {"cpu-int4": 1} and "compress C kernel" in next(iter(report.reasons.values()))
    with torch.no_grad():
        assert rel_err(layer(x), reference(layer, x)) < 5e-6
    layer.set_backend(None)  # the dequantize forward gets the codes back, all 256 values intact
    assert int(layer.qweight.max()) > 15 and rel_err(layer(x), reference(layer, x)) < 1e-6


def test_int8_lm_head_quantizes_untied_and_restores():
    from compress.kernels.lm_head import quantize_lm_head, restore_lm_head

    model = _tiny_tied_llama()
    emb = model.get_input_embeddings().weight
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        swap = quantize_lm_head(model)
        head = model.get_output_embeddings()
        assert isinstance(head, QuantizedLinear) and head.bits == 8 and head.scales.shape == (200, 1)
        assert swap.tied and not model.config.tie_word_embeddings
        model.tie_weights()  # must not put the float weight back over the codes
        assert model.get_output_embeddings() is head and model.get_input_embeddings().weight is emb
        assert swap.float_bytes == 200 * 64 * 4 and swap.quantized_bytes == 200 * 64 + 200 * 8
        q_ref = model(ids).logits
        # 8 bits per output row: logits within a few 1e-3 of the float model (RTN error, not the kernel's)
        assert 0 < rel_err(q_ref, ref) < 1e-2
        report = accelerate(model, cpu_prefill="fp32")
        assert report.layers["lm_head"] == "cpu-int4"
        assert rel_err(model(ids[:, :1]).logits, q_ref[:, :1]) < 1e-5  # decode: the C kernel's 8-bit path
        restore_lm_head(model, swap)
        assert model.get_output_embeddings().weight is emb and model.config.tie_word_embeddings
        assert torch.equal(model(ids).logits, ref)


def test_int8_lm_head_refuses_what_it_cannot_do():
    from compress.kernels.lm_head import quantize_lm_head

    with pytest.raises(ConfigError, match="bits"):
        quantize_lm_head(_tiny_tied_llama(), bits=3)
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_lm_head(_tiny_tied_llama(), group_size=48)
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        quantize_lm_head(nn.Sequential(nn.Linear(4, 4)))


def test_bench_int8_lm_head_flag(tmp_path, capsys):
    from compress.commands import bench
    from compress.errors import CompressError
    from compress.formats import save_checkpoint

    save_checkpoint(tiny_quantized_model(), None, tmp_path / "ck")
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    common = ["--device", "cpu", "--prompt", "8", "--generate", "3", "--repeats", "1", "--warmup", "0", "--json"]
    args = parser.parse_args(["bench", str(tmp_path / "ck"), *common, "--lm-head", "int8"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lm_head"] == "int8" and out["kernels"] == {"cpu-int4": 15}  # 14 decoder layers + the lm_head
    assert out["lm_head_detail"]["bits"] == 8 and out["lm_head_detail"]["quantized_bytes"] < out["lm_head_detail"][
        "float_bytes"] / 3
    assert out["decode_tokens_per_s"] > 0 and out["baseline_decode_tokens_per_s"] > 0
    assert "lm_head int8" in bench.format_table(out)
    with pytest.raises(SystemExit):  # argparse names the allowed values
        parser.parse_args(["bench", str(tmp_path / "ck"), "--lm-head", "int4"])
    # torch's int4 kernel cannot take 8-bit codes: the head would be dequantized every step
    args = parser.parse_args(["bench", str(tmp_path / "ck"), *common, "--lm-head", "int8", "--cpu-kernel", "torch"])
    with pytest.raises(CompressError, match="lm_head would run dequant-fallback .*8-bit codes.*--cpu-kernel auto"):
        bench.run_bench(args)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "plain")
    args = parser.parse_args(["bench", str(tmp_path / "plain"), *common, "--lm-head", "int8"])
    with pytest.raises(CompressError, match="needs a quantized checkpoint"):
        bench.run_bench(args)


def test_bench_compile_mode_on_the_cpu(tmp_path, capsys):
    # --mode compile on the CPU: both models torch.compile'd over a static cache; the C kernel is one
    # opaque op in the graph, so the compiled model runs it (the JSON says compile, with warm-up apart)
    from compress.commands import bench
    from compress.formats import save_checkpoint

    save_checkpoint(tiny_quantized_model(), None, tmp_path / "ck")
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", str(tmp_path / "ck"), "--device", "cpu", "--prompt", "8", "--generate", "3",
                              "--repeats", "1", "--warmup", "0", "--mode", "compile", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "compile" and out["kernels"] == {"cpu-int4": 14}
    for run in ("compressed", "baseline"):
        r = out["runs"][run]
        assert r["mode"] == "compile" and r["warmup_s"] > 0 and r["decode_ms_per_token"] > 0 and r["prefill_ms"] > 0
