"""Quantization grids, bit packing and GPTQ maths on small random tensors."""
import pytest
import torch

from compress.algos.gptq import gptq_quantize
from compress.algos.metrics import relative_output_error
from compress.algos.packing import pack_rows, unpack_rows
from compress.algos.quant import dequantize_weight, find_grid, num_groups, rtn_quantize, rtn_quantize_permuted
from tests.conftest import correlated_inputs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_in_range_and_error_bounded(bits, symmetric):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits))
    codes, scales, zeros = rtn_quantize(w, bits, 32, symmetric)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    g = torch.arange(96) // 32
    w_hat = dequantize_weight(codes, scales, zeros, g)
    # round-to-nearest: every element within half a step (plus clamp at the edge of the range)
    step = scales[:, g]
    assert ((w - w_hat).abs() <= step * 0.5 + 1e-6).float().mean() > 0.97


def test_rtn_with_act_order_groups_quantizes_along_the_permutation():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=gen)
    perm = torch.randperm(128, generator=gen)
    codes, scales, zeros, g_idx = rtn_quantize_permuted(w, 4, 32, False, perm)
    assert torch.equal(g_idx[perm], torch.arange(128, dtype=torch.int32) // 32)  # groups follow perm
    w_hat = dequantize_weight(codes, scales, zeros, g_idx)
    q2, s2, z2 = rtn_quantize(w[:, perm], 4, 32, False)  # same as RTN of the permuted weight
    assert torch.equal(w_hat[:, perm], dequantize_weight(q2, s2, z2, torch.arange(128) // 32))
    assert ((w - w_hat).abs() <= scales[:, g_idx.long()] * 0.5 + 1e-6).float().mean() > 0.97


def test_zero_is_exact_on_asymmetric_grid():
    w = torch.randn(8, 64)
    w[:, ::3] = 0.0
    codes, scales, zeros = rtn_quantize(w, 4, 32, symmetric=False)
    w_hat = dequantize_weight(codes, scales, zeros, torch.arange(64) // 32)
    assert torch.all(w_hat[:, ::3] == 0)


def test_partial_last_group():
    w = torch.randn(4, 96)
    codes, scales, zeros = rtn_quantize(w, 4, 64, True)
    assert scales.shape == (4, num_groups(96, 64)) == (4, 2)
    # the narrow last group has its own grid: quantizing it alone gives the same codes
    alone = find_grid(w[:, 64:], 4, True)
    assert torch.equal(codes[:, 64:].float(), alone.quantize(w[:, 64:]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trip_and_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    v = torch.randint(0, 2**bits, (6, 96), generator=torch.Generator().manual_seed(bits))
    p = pack_rows(v, bits)
    assert p.dtype == torch.int32 and p.shape == (6, (96 * bits + 31) // 32)
    assert torch.equal(unpack_rows(p, bits, 96).long(), v)
    # compressed-tensors stores signed codes and adds the 2^(b-1) offset back before packing
    assert torch.equal(p, pack_to_int32((v - 2 ** (bits - 1)).to(torch.int8), bits))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[16]]), 4)


def test_gptq_equals_rtn_when_hessian_is_identity():
    # H = I: no error propagates between columns, so GPTQ reduces exactly to round-to-nearest
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(w, torch.eye(64), 4, 32, True, act_order=False)
    codes, scales, zeros = rtn_quantize(w, 4, 32, True)
    assert torch.equal(res.codes, codes)
    assert torch.allclose(res.scales, scales)


@pytest.mark.parametrize("act_order,static", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_gptq_beats_rtn_on_output_error(act_order, static, group_size):
    torch.manual_seed(0)
    x = correlated_inputs(2048, 128)
    w = torch.randn(64, 128) * 0.05
    H = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize(w, H, 4, group_size, True, act_order=act_order, static_groups=static)
    codes, scales, zeros = rtn_quantize(w, 4, group_size, True)
    g = torch.zeros(128, dtype=torch.long) if group_size == -1 else torch.arange(128) // group_size
    err_rtn = relative_output_error(w, dequantize_weight(codes, scales, zeros, g), H)
    err_gptq = relative_output_error(w, res.weight, H)
    assert err_gptq < 0.7 * err_rtn
    # the returned float weight is exactly what the codes, grids and g_idx describe
    assert torch.allclose(dequantize_weight(res.codes, res.scales, res.zeros, res.g_idx), res.weight, atol=1e-6)


def test_gptq_dynamic_act_order_g_idx_is_a_permuted_grouping():
    x = correlated_inputs(1024, 64)
    H = x.t() @ x
    res = gptq_quantize(torch.randn(16, 64), H, 4, 16, True, act_order=True, static_groups=False)
    counts = torch.bincount(res.g_idx.long(), minlength=4)
    assert counts.tolist() == [16, 16, 16, 16]
    assert not torch.equal(res.g_idx.long(), torch.arange(64) // 16)


def test_relative_output_error_matches_activations():
    x = torch.randn(500, 32, dtype=torch.float64)
    w = torch.randn(8, 32, dtype=torch.float64)
    w_hat = w + 0.01 * torch.randn_like(w)
    direct = ((x @ (w - w_hat).t()).norm() ** 2 / (x @ w.t()).norm() ** 2).item()
    assert abs(relative_output_error(w, w_hat, x.t() @ x) - direct) < 1e-9


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_keeps_pruned_weights_exactly_zero(symmetric):
    x = correlated_inputs(1024, 64)
    w = torch.randn(32, 64)
    w[torch.rand(32, 64, generator=torch.Generator().manual_seed(3)) < 0.5] = 0.0
    res = gptq_quantize(w, x.t() @ x, 4, 32, symmetric, act_order=True)
    assert torch.all(res.weight[w == 0] == 0)
    assert torch.all(dequantize_weight(res.codes, res.scales, res.zeros, res.g_idx)[w == 0] == 0)
    # the kept weights are still quantized with error compensation (not left at their float values)
    assert (res.weight[w != 0] != w[w != 0]).float().mean() > 0.5
