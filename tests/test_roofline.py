"""Roofline estimator: hand-computed FLOP/byte counts on a tiny config, devices, CLI contract."""
from __future__ import annotations

import argparse
import json

import pytest
import yaml

from compress.errors import CompressError, ConfigError
from compress.eval.roofline import CompressionSpec, RooflineSpec, estimate
from compress.eval.roofline_devices import BUILTIN_DIR, catalog, load_device, read_device_file
from compress.eval.roofline_ops import WeightFormat, linear, norm, rotary, weight_bytes
from compress.eval.roofline_shapes import LayerShape, count_params, model_shape

# hidden 64, 4 query heads / 2 KV heads of 16, MLP 128, vocab 256, 2 layers, untied head.
TINY = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 256, "num_hidden_layers": 2, "tie_word_embeddings": False}
H, I, V, D, HQ, HKV, L = 64, 128, 256, 16, 4, 2, 2
LINEAR_PARAMS_PER_LAYER = H * H + 2 * H * (HKV * D) + H * H + 3 * H * I  # q, k, v, o, gate, up, down
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _rows(phase):
    return {r.name: r for r in phase.rows}


def _write_device(tmp_path, name="unit", bw=1.0e11, flops=1.0e18, per_layer=0.0, per_row=0.0, attention=1.0):
    """A device with fractions 1 and (by default) huge FLOP/s, so times are bytes / bw exactly."""
    q = lambda v: {"value": v, "source": "unit test"}  # noqa: E731
    dev = {"name": name, "title": "unit-test device", "kind": "cpu",
           "memory_bandwidth": q(bw), "memory_capacity": q(1e12),
           "peak_flops": {"fp32": q(flops), "fp16": q(flops)},
           "achievable": {"compute": q(1.0), "memory": q(1.0), "attention": q(attention)},
           "overhead": {"per_forward_s": q(0.0), "per_layer_s": q(per_layer), "per_weight_row_s": q(per_row)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dev))
    return path


# --- counts ---------------------------------------------------------------------------------
def test_decode_weight_bytes_equal_parameter_bytes_at_fp16():
    r = estimate(TINY, {"device": "h100", "prompt": 16, "generate": 4})
    rows = _rows(r.decode)
    linear_bytes = sum(rows[n].weight_bytes for n in LINEAR_NAMES)
    assert linear_bytes == pytest.approx(2 * (L * LINEAR_PARAMS_PER_LAYER + V * H), rel=1e-12)
    # resident weights: every parameter (embeddings, norms, head) at 2 bytes
    assert r.weights_bytes == pytest.approx(2 * count_params(model_shape(TINY)), rel=1e-12)
    assert count_params(model_shape(TINY)) == L * (LINEAR_PARAMS_PER_LAYER + 2 * H) + H + 2 * V * H


def test_int4_group128_bytes_are_half_a_byte_per_weight_plus_scales_and_zeros():
    k, n = 256, 64
    asym = WeightFormat(value_bits=4, group_size=128, scale_bits=16, zero_bits=4)
    sym = WeightFormat(value_bits=4, group_size=128, scale_bits=16, zero_bits=0)
    per_row = WeightFormat(value_bits=4, group_size=-1, scale_bits=16, zero_bits=0)
    assert weight_bytes(k, n, asym) == k * n / 2 + n * (k // 128) * (2 + 0.5)
    assert weight_bytes(k, n, sym) == k * n / 2 + n * (k // 128) * 2
    assert weight_bytes(k, n, per_row) == k * n / 2 + n * 2


def test_int4_model_weight_bytes_keep_embeddings_and_head_in_fp16():
    r = estimate(TINY, {"device": "h100"}, compression={"weight_bits": 4, "group_size": 32, "symmetric": True})
    linear_params = L * LINEAR_PARAMS_PER_LAYER
    # one fp16 scale per 32 input columns: q, k, v, o, gate, up read 64 columns, down_proj 128
    scale_bytes = L * 2 * ((H + 2 * HKV * D + H + 2 * I) * (H // 32) + H * (I // 32))
    other = 2 * (2 * V * H + L * 2 * H + H)  # embed + head + norms at fp16
    assert r.weights_bytes == pytest.approx(linear_params / 2 + scale_bytes + other, rel=1e-12)


def test_gqa_kv_bytes_use_kv_heads():
    p, g = 32, 8
    fused = {"device": "h100", "prompt": p, "generate": g, "implementation": "fused"}
    r = estimate(TINY, fused)
    mha = estimate({**TINY, "num_key_value_heads": HQ}, fused)
    # decode reads the whole cache once per KV head; average context over the steps is p + (g + 1) / 2
    expected = L * (p + (g + 1) / 2) * HKV * D * 2 * 2
    assert _rows(r.decode)["attention"].kv_bytes == pytest.approx(expected, rel=1e-12)
    assert _rows(mha.decode)["attention"].kv_bytes == pytest.approx(expected * HQ / HKV, rel=1e-12)
    assert r.kv_bytes == pytest.approx(L * (p + g) * HKV * D * 2 * 2, rel=1e-12)


def test_lm_head_prefill_flops_are_2_p_h_v():
    p = 48
    r = estimate(TINY, {"device": "h100", "prompt": p, "generate": 1})
    assert _rows(r.prefill)["lm_head"].flops == 2 * p * H * V
    last = estimate(TINY, {"device": "h100", "prompt": p, "generate": 1, "prefill_logits": "last"})
    assert _rows(last.prefill)["lm_head"].flops == 2 * H * V


def test_prefill_attention_is_causal_and_mlp_activation_sized_by_intermediate():
    p, b = 40, 3
    r = estimate(TINY, {"device": "h100", "prompt": p, "generate": 1, "batch": b, "implementation": "fused"})
    rows = _rows(r.prefill)
    pairs = p * (p + 1) / 2
    assert rows["attention"].flops == pytest.approx(L * b * HQ * pairs * (4 * D + 5), rel=1e-12)
    # act(gate) * up reads two [tokens, I] tensors and writes one
    assert rows["mlp_act"].act_bytes == L * 3 * b * p * I * 2


def test_memory_bound_decode_time_is_bytes_over_bandwidth(tmp_path):
    dev = _write_device(tmp_path)
    r = estimate(TINY, {"device": str(dev), "prompt": 8, "generate": 4})
    assert r.decode_ms_per_token == pytest.approx(r.decode.bytes / 1.0e11 * 1e3, rel=1e-12)
    with_overhead = estimate(TINY, {"device": str(_write_device(tmp_path, "slow", per_layer=1e-3)),
                                    "prompt": 8, "generate": 4})
    assert with_overhead.decode_ms_per_token == pytest.approx(r.decode_ms_per_token + L * 1.0, rel=1e-12)


def test_per_row_cost_and_attention_fraction(tmp_path):
    base = estimate(TINY, {"device": str(_write_device(tmp_path)), "prompt": 8, "generate": 4})
    rows = estimate(TINY, {"device": str(_write_device(tmp_path, "rows", per_row=1e-6)), "prompt": 8, "generate": 4})
    rows_per_layer = H + 2 * HKV * D + H + 2 * I + H  # output rows of q, k, v, o, gate, up, down
    assert rows.decode_ms_per_token - base.decode_ms_per_token == pytest.approx((L * rows_per_layer + V) * 1e-3)
    assert estimate(TINY, {"device": str(_write_device(tmp_path, "rows2", per_row=1e-6)), "prompt": 8,
                           "generate": 4, "overhead": False}).decode_ms_per_token == pytest.approx(
        base.decode_ms_per_token, rel=1e-12)
    slow = _write_device(tmp_path, "att", flops=1e9, attention=0.25)
    fast = _write_device(tmp_path, "att2", flops=1e9, attention=1.0)
    a = _rows(estimate(TINY, {"device": str(slow), "prompt": 64, "generate": 1}).prefill)["attention"]
    b = _rows(estimate(TINY, {"device": str(fast), "prompt": 64, "generate": 1}).prefill)["attention"]
    assert a.compute_ms == pytest.approx(4 * b.compute_ms, rel=1e-12)
    assert b.compute_ms == pytest.approx(b.flops / 1e9 * 1e3, rel=1e-12)


def test_w4_decode_speedup_on_h100_is_between_2_and_the_byte_ratio():
    floor = {"device": "h100", "prompt": 1024, "generate": 16, "implementation": "fused", "overhead": False}
    r = estimate("llama-2-7b", floor, compression={"weight_bits": 4, "group_size": 128}).to_dict()
    assert 2.0 < r["speedup_decode"] < 16 / 4.156
    assert r["memory_ratio"] < 0.5
    # the fixed per-kernel time is not compressed, so transformers' decode gains less (Amdahl)
    real = estimate("llama-2-7b", {"device": "h100", "prompt": 1024, "generate": 16},
                    compression={"weight_bits": 4, "group_size": 128}).to_dict()
    assert 1.0 < real["speedup_decode"] < r["speedup_decode"]


def test_two_four_halves_matrix_flops_and_stores_half_plus_metadata():
    dense = WeightFormat(value_bits=16)
    sparse = WeightFormat(value_bits=16, sparsity="2:4", density=0.5, sparse_units=True)
    a, b = linear("x", 32, 256, 64, dense, 2, False), linear("x", 32, 256, 64, sparse, 2, False)
    assert b.matrix_flops == a.matrix_flops / 2
    assert b.weight_bytes == 256 * 64 / 2 * 2 + 256 * 64 / 2 * 2 / 8  # kept fp16 values + 2 bits each
    r = estimate("llama-2-7b", {"device": "h100", "prompt": 1024, "generate": 4, "implementation": "fused"},
                 compression={"sparsity": "2:4"})
    assert _rows(r.prefill)["up_proj"].flops == pytest.approx(_rows(r.baseline.prefill)["up_proj"].flops / 2)
    assert r.to_dict()["speedup_prefill"] > 1.5


def test_two_four_on_a_cpu_gives_no_speedup_and_says_so():
    r = estimate(TINY, {"device": "xeon-8480", "dtype": "bfloat16"}, compression={"sparsity": "2:4"})
    assert r.decode_ms_per_token == pytest.approx(r.baseline.decode_ms_per_token, rel=1e-12)
    assert any("2:4" in w for w in r.warnings)


def test_unstructured_sparsity_default_is_no_speedup_and_bitmask_saves_bytes():
    k, n = 256, 64
    bitmask = WeightFormat(value_bits=16, sparsity="unstructured", density=0.3, sparse_format="bitmask")
    csr = WeightFormat(value_bits=16, sparsity="unstructured", density=0.3, sparse_format="csr")
    assert weight_bytes(k, n, bitmask) == pytest.approx(0.3 * k * n * 2 + k * n / 8)
    assert weight_bytes(k, n, csr) == pytest.approx(0.3 * k * n * (2 + 2) + (n + 1) * 4)
    assert linear("x", 4, k, n, csr, 2, False).matrix_flops == 0.0  # CSR runs on vector units
    r = estimate(TINY, {"device": "h100"}, compression={"sparsity": 0.7})
    assert r.decode_ms_per_token == pytest.approx(r.baseline.decode_ms_per_token, rel=1e-12)
    r2 = estimate(TINY, {"device": "h100"}, compression={"sparsity": 0.7, "sparse_format": "bitmask"})
    assert r2.to_dict()["speedup_decode"] > 1.0


def test_dynamic_cache_copies_the_cache_every_step():
    p, g = 64, 4
    static = estimate(TINY, {"device": "h100", "prompt": p, "generate": g, "implementation": "fused"})
    dyn = estimate(TINY, {"device": "h100", "prompt": p, "generate": g, "kv_cache": "dynamic",
                          "implementation": "fused"})
    row = HKV * D * 2 * 2 * L
    assert _rows(static.decode)["kv_cache_update"].kv_bytes == pytest.approx(row, rel=1e-12)
    # step i reads the p+i old rows and writes p+i+1
    expected = sum((p + i) + (p + i + 1) for i in range(g)) / g * row
    assert _rows(dyn.decode)["kv_cache_update"].kv_bytes == pytest.approx(expected, rel=1e-12)


# --- transformers kernels and fixed costs ----------------------------------------------------
def _gpu_device(tmp_path, name="gpu", per_kernel=0.0, per_gemm=0.0, host=None, elementwise=None):
    """Like _write_device, but a GPU with per-kernel costs, optional host overhead and elementwise fraction."""
    path = _write_device(tmp_path, name)
    dev = yaml.safe_load(path.read_text())
    q = lambda v: {"value": v, "source": "unit test"}  # noqa: E731
    dev["kind"] = "gpu"
    dev["overhead"].update(per_kernel_s=q(per_kernel), per_gemm_s=q(per_gemm))
    if host:
        dev["host_overhead"] = {"per_forward_s": q(host[0]), "per_layer_s": q(host[1])}
    if elementwise:
        dev["achievable"]["elementwise"] = q(elementwise)
    path.write_text(yaml.safe_dump(dev))
    return str(path)


def test_transformers_rms_norm_and_rotary_traffic_by_hand():
    # RMSNorm at fp16 over 3 x 64: to(fp32) 6 + pow 8 + mean 4 + x*rsqrt 8 + to(fp16) 6 + weight*x 4 bytes
    # per element, 24 per row (mean's output, +eps, rsqrt, the broadcast read); 8 kernels
    n = norm("n", 3, 64, "rms", 2, "transformers")
    assert (n.kernels, n.act_bytes, n.weight_bytes) == (8.0, 3 * (64 * 36 + 24), 64 * 2)
    n32 = norm("n", 3, 64, "rms", 4, "transformers")  # fp32: the casts are no-ops
    assert (n32.kernels, n32.act_bytes) == (6.0, 3 * (64 * 28 + 24))
    assert norm("n", 3, 64, "rms", 2, "fused").act_bytes == 2 * 3 * 64 * 2
    # rotary over 5 tokens, 4 + 2 heads of 16: 10 bytes per rotated fp16 element... x2 bytes, + cos/sin rows
    ly = model_shape(TINY).layers[0]
    r = rotary(5, ly, 2, "transformers")
    rotated = 5 * (HQ + HKV) * D
    assert (r.kernels, r.act_bytes) == (10.0, 10 * rotated * 2 + 4 * 5 * D * 2)
    partial = rotary(5, LayerShape(HQ, HKV, D, I, 4), 2, "transformers")  # 4 of 16 dims rotated
    assert (partial.kernels, partial.act_bytes) == (12.0, 10 * 5 * 6 * 4 * 2 + 4 * 5 * 4 * 2 + 2 * rotated * 2)


def test_static_cache_decode_attends_every_slot_and_repeats_grouped_kv():
    p, g, slots = 8, 4, 100
    r = estimate(TINY, {"device": "h100", "prompt": p, "generate": g, "max_cache_len": slots})
    # every step reads all 100 slots; K and V expanded from 2 to 4 heads (read 1x, written and read 2x)
    assert _rows(r.decode)["attention"].kv_bytes == pytest.approx(L * slots * HKV * D * 2 * 2 * (1 + 2 * 2))
    mha = estimate({**TINY, "num_key_value_heads": HQ}, {"device": "h100", "prompt": p, "generate": g,
                                                         "max_cache_len": slots})
    assert _rows(mha.decode)["attention"].kv_bytes == pytest.approx(L * slots * HQ * D * 2 * 2)
    # index_copy_ reads and writes each new row
    assert _rows(r.decode)["kv_cache_update"].kv_bytes == pytest.approx(2 * L * HKV * D * 2 * 2)


def test_per_kernel_and_per_gemm_fixed_costs(tmp_path):
    spec = {"prompt": 8, "generate": 4}
    dev = _gpu_device(tmp_path, per_kernel=1e-6, per_gemm=2e-6)
    r = estimate(TINY, {**spec, "device": dev})
    bare = estimate(TINY, {**spec, "device": dev, "overhead": False})
    # per layer: 2 norms x 8, rotary 10, cache update 5, attention 6 (mask fill/where x 2, kernel, split
    # reduction) + 2 repeat_kv copies, 2 residuals, silu and mul 2 = 43 kernels and 7 GEMMs; per forward:
    # embedding 1, positions/mask 10 + rotary table 9, final norm 8, sampling 2 = 30 kernels and lm_head
    kernels, gemms = L * 43 + 30, L * 7 + 1
    assert r.decode.kernels == pytest.approx(kernels + gemms)
    assert r.decode_ms_per_token - bare.decode_ms_per_token == pytest.approx((kernels * 1e-6 + gemms * 2e-6) * 1e3)
    fused = estimate(TINY, {**spec, "device": dev, "implementation": "fused"})
    # one kernel per operator: norm, rotary, cache, attention, 2 residuals, norm, activation; head: norm, sampling 2
    assert fused.decode.kernels == pytest.approx(L * 8 + 4 + gemms)


def test_prefill_pays_its_own_per_kernel_and_per_attention_costs(tmp_path):
    spec = {"prompt": 8, "generate": 1}
    base = _gpu_device(tmp_path, "base", per_kernel=1e-6)
    dev = yaml.safe_load(open(base))
    dev["name"] = "pre"
    dev["overhead"].update(prefill_per_kernel_s={"value": 3e-6, "source": "unit test"},
                           per_attention_s={"value": 1e-5, "source": "unit test"})
    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump(dev))
    a, b = estimate(TINY, {**spec, "device": base}), estimate(TINY, {**spec, "device": str(pre)})
    # prefill per layer: norms 16, rotary 10, cache 5, residuals 2, activation 2 = 35 kernels and one flash
    # call (no mask, no repeat_kv); per forward: positions 4, rotary table 9, embedding 1, final norm 8,
    # sampling 2 = 24; kernels at 3 us instead of 1 us, each flash call 10 us instead of 1 us
    per_layer_kernels, forward_kernels = 16 + 10 + 5 + 2 + 2, 4 + 9 + 1 + 8 + 2
    extra = (L * per_layer_kernels + forward_kernels) * 2e-6 + L * 9e-6
    assert b.prefill_ms - a.prefill_ms == pytest.approx(extra * 1e3)
    assert b.decode_ms_per_token == pytest.approx(a.decode_ms_per_token)  # decode has no flash call here


def test_eager_execution_waits_for_the_host(tmp_path):
    spec = {"prompt": 8, "generate": 4}
    dev = _gpu_device(tmp_path, per_kernel=1e-6, host=(1e-3, 2e-3))
    graph = estimate(TINY, {**spec, "device": dev})
    eager = estimate(TINY, {**spec, "device": dev, "execution": "eager"})
    host_ms = (1e-3 + L * 2e-3) * 1e3  # far above this tiny model's device time
    assert graph.decode_ms_per_token < host_ms
    assert eager.decode_ms_per_token == pytest.approx(host_ms) and eager.prefill_ms == pytest.approx(host_ms)
    no_host = estimate(TINY, {**spec, "device": _gpu_device(tmp_path, "gpu2", per_kernel=1e-6), "execution": "eager"})
    assert no_host.decode_ms_per_token == pytest.approx(graph.decode_ms_per_token)
    assert any("host_overhead" in w for w in no_host.warnings)


def test_unfused_elementwise_ops_move_at_the_elementwise_fraction(tmp_path):
    spec = {"prompt": 32, "generate": 1}
    full = _rows(estimate(TINY, {**spec, "device": _gpu_device(tmp_path)}).prefill)
    half = _rows(estimate(TINY, {**spec, "device": _gpu_device(tmp_path, "half", elementwise=0.5)}).prefill)
    assert half["attn_norm"].memory_ms == pytest.approx(2 * full["attn_norm"].memory_ms, rel=1e-12)
    assert half["q_proj"].memory_ms == pytest.approx(full["q_proj"].memory_ms, rel=1e-12)  # GEMMs: memory


# --- shapes ---------------------------------------------------------------------------------
def test_per_layer_shapes_from_a_structurally_pruned_config():
    cfg = {**TINY, "head_dim": D, "intermediate_size": [128, 32], "num_attention_heads": [4, 2],
           "num_key_value_heads": [2, 1]}
    shape = model_shape(cfg)
    assert [(ly.n_heads, ly.n_kv_heads, ly.intermediate) for ly in shape.layers] == [(4, 2, 128), (2, 1, 32)]
    r = estimate(cfg, {"device": "h100", "prompt": 8, "generate": 2})
    second = H * (2 * D) + 2 * H * D + 2 * D * H + 3 * H * 32
    assert _rows(r.decode)["down_proj"].weight_bytes == 2 * (I * H + 32 * H)
    assert sum(_rows(r.decode)[n].weight_bytes for n in LINEAR_NAMES[:-1]) == 2 * (LINEAR_PARAMS_PER_LAYER + second)


def test_baseline_config_is_the_original_shape_uncompressed():
    pruned = {**TINY, "intermediate_size": 64}
    spec = {"device": "h100", "prompt": 16, "generate": 4}
    orig = estimate(TINY, spec)
    # shape changed, nothing compressed: still a baseline, and it is the original model
    r = estimate(pruned, spec, baseline_config=TINY)
    assert r.baseline is not None and r.baseline.params == orig.params == count_params(model_shape(TINY))
    assert r.params == orig.params - L * 3 * H * (I - 64)
    d = r.to_dict(per_op=False)
    assert d["baseline"]["params"] == orig.params
    assert d["speedup_decode"] == pytest.approx(orig.decode_ms_per_token / r.decode_ms_per_token, rel=1e-12)
    assert d["speedup_decode"] > 1.0
    # compressed and pruned: the speedup is against the original, above quantization's alone
    w4 = {"weight_bits": 4, "group_size": 32}
    both = estimate(pruned, spec, w4, baseline_config=TINY).to_dict(per_op=False)
    assert both["baseline"]["decode_ms_per_token"] == pytest.approx(orig.decode_ms_per_token, rel=1e-12)
    assert both["speedup_decode"] > estimate(pruned, spec, w4).to_dict(per_op=False)["speedup_decode"]
    # same shape (another name), nothing compressed: no baseline, as without baseline_config
    assert estimate(TINY, spec, baseline_config={**TINY, "_name_or_path": "copy"}).baseline is None


def test_per_layer_lists_must_match_the_layer_count():
    with pytest.raises(ConfigError, match="intermediate_size"):
        model_shape({**TINY, "intermediate_size": [128, 64, 32]})
    with pytest.raises(ConfigError, match="head_dim"):
        model_shape({**TINY, "num_attention_heads": [4, 4]})


def test_opt_and_neox_shapes():
    opt = model_shape({"model_type": "opt", "hidden_size": 64, "ffn_dim": 256, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 32,
                       "word_embed_proj_dim": 64})
    assert opt.layers[0].n_kv_heads == 4 and opt.tie_embeddings and opt.qkv_bias and opt.learned_positions == 34
    r = estimate({"model_type": "opt", "hidden_size": 64, "ffn_dim": 256, "num_attention_heads": 4,
                  "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 32}, {"device": "h100"})
    assert {"fc1", "fc2"} <= set(_rows(r.decode)) and _rows(r.decode)["fc1"].weight_bytes == 2 * 2 * (64 * 256 + 256)
    neox = model_shape({"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256,
                        "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 100, "rotary_pct": 0.25})
    assert neox.layers[0].rotary_dim == 4 and neox.arch.fused_qkv and not neox.tie_embeddings


def test_builtin_llama2_7b_parameter_count():
    assert count_params(model_shape(json.loads((BUILTIN_DIR.parent / "model_shapes" / "llama-2-7b.json")
                                               .read_text()))) == 6_738_415_616


# --- devices --------------------------------------------------------------------------------
def _numbers_without_source(node, path="") -> list[str]:
    bad = []
    if isinstance(node, dict):
        if "value" in node and not isinstance(node.get("source"), str):
            bad.append(path)
        for k, v in node.items():
            if k != "value":
                bad += _numbers_without_source(v, f"{path}.{k}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        bad.append(path)
    return bad


def test_every_device_yaml_loads_and_every_number_has_a_source():
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"h100", "h200", "a100-80gb", "l40s", "rtx4090", "a10", "xeon-8480", "m2-ultra"} <= names
    for f in files:
        dev = read_device_file(f)
        assert dev.name == f.stem
        assert _numbers_without_source(yaml.safe_load(f.read_text())) == [], f
        assert dev.memory_bandwidth.value > 0 and dev.peak("fp32") > 0
        assert 0 < dev.achievable.memory.value <= 1 and 0 < dev.achievable.compute.value <= 1


def test_unknown_device_is_a_compress_error_listing_known_devices():
    with pytest.raises(CompressError, match="known devices: .*a100-80gb.*h100"):
        estimate(TINY, {"device": "tpu-v9"})
    with pytest.raises(CompressError, match="known devices"):
        load_device("tpu-v9")


def test_user_device_from_a_file_or_folder(tmp_path):
    path = _write_device(tmp_path, "my-npu")
    assert estimate(TINY, {"device": str(path)}).device.name == "my-npu"
    assert estimate(TINY, {"device": "my-npu", "device_files": [str(tmp_path)]}).device.name == "my-npu"
    assert "my-npu" in catalog([tmp_path])
    # YAML 1.1 reads 3.35e12 (no sign in the exponent) as a string; the device loader reads a number
    text = path.read_text().replace("100000000000.0", "3.35e12")
    assert "3.35e12" in text
    path.write_text(text)
    assert read_device_file(path).memory_bandwidth.value == 3.35e12


def test_device_without_the_dtype_names_what_it_has():
    with pytest.raises(CompressError, match="no peak_flops.bf16"):
        estimate(TINY, {"device": "m2-ultra", "dtype": "bfloat16"})


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="group_size"):
        estimate(TINY, {"device": "h100"}, compression={"weight_bits": 4, "group_size": 0})
    with pytest.raises(ConfigError, match="sparsity"):
        estimate(TINY, {"device": "h100"}, compression={"sparsity": 1.5})
    with pytest.raises(ConfigError, match="prompt"):
        estimate(TINY, {"device": "h100", "prompt": 0})
    with pytest.raises(ConfigError, match="batchsize"):
        estimate(TINY, {"device": "h100", "batchsize": 4})


def test_roofline_spec_is_a_strict_recipe_block():
    spec = RooflineSpec.model_validate({"device": "h200", "prompt": 512, "generate": 64, "batch": 2})
    assert (spec.device, spec.prompt, spec.generate, spec.batch) == ("h200", 512, 64, 2)
    assert not CompressionSpec().active


# --- CLI ------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from compress.commands import roofline as cmd

    parser = argparse.ArgumentParser(prog="compress")
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["roofline", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_cli_json_contract(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rc, out = _cli([str(tmp_path), "--device", "h100", "--prompt", "64", "--generate", "8", "--batch", "1",
                    "--weight-bits", "4", "--group-size", "32", "--sparsity", "2:4", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0
    assert {"decode_ms_per_token", "prefill_ms", "memory_gb", "speedup_decode"} <= set(d)
    assert d["speedup_decode"] > 1.0 and d["prompt"] == 64
    rc, out = _cli([str(tmp_path / "config.json"), "--json"], capsys)
    assert "speedup_decode" not in json.loads(out)


def test_cli_implementation_execution_and_cache_flags(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    base = [str(tmp_path), "--device", "h100", "--prompt", "32", "--generate", "4", "--json"]
    default = json.loads(_cli(base, capsys)[1])
    assert (default["implementation"], default["execution"]) == ("transformers", "graph")
    fused = json.loads(_cli(base + ["--implementation", "fused"], capsys)[1])
    assert fused["implementation"] == "fused"
    assert fused["kernels"]["decode_per_token"] < default["kernels"]["decode_per_token"]
    eager = json.loads(_cli(base + ["--execution", "eager"], capsys)[1])
    assert eager["execution"] == "eager" and eager["host_ms"]["decode_per_token"] > 0
    assert default["host_ms"]["decode_per_token"] == 0
    # a static cache of 4096 slots: transformers' decode attends to all of them
    big = json.loads(_cli(base + ["--max-cache-len", "4096", "--per-op"], capsys)[1])
    small = json.loads(_cli(base + ["--per-op"], capsys)[1])
    att = {d["name"]: d for d in big["decode_ops"]}, {d["name"]: d for d in small["decode_ops"]}
    name = next(n for n in att[0] if "attention" in n)
    assert att[0][name]["flops"] > 50 * att[1][name]["flops"]
    with pytest.raises(ConfigError, match="max_cache_len"):
        _cli(base + ["--max-cache-len", "0"], capsys)


def test_cli_table_has_totals_and_per_op(capsys):
    rc, out = _cli(["smollm2-135m", "--device", "a10", "--per-op"], capsys)
    assert rc == 0 and "decode per token" in out and "down_proj" in out and "lm_head" in out


# --- latency measurement ------------------------------------------------------------------------
def test_measure_latency_on_a_tiny_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.eval.latency import measure_latency

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    r = measure_latency(model, prompt=8, generate=3, batch=2, repeats=2, warmup=1)
    assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
    assert len(r["decode_ms_per_token_runs"]) == 2 and r["batch"] == 2 and r["prompt"] == 8
    with pytest.raises(CompressError, match="repeats"):
        measure_latency(model, prompt=8, generate=3, repeats=0)


def test_thread_clock_refuses_several_threads(monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.eval.latency import measure_latency

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(CompressError, match="set_num_threads"):
        measure_latency(model, prompt=4, generate=2, repeats=1, warmup=0, clock="thread")



# --- implementation: compress (our runtime: roofline_compress) -------------------------------
def _compress_device(tmp_path, w4a16=(5e-6, 0.5), attn=(7e-6, 0.25)):
    """A GPU with per-kernel 1 us, per-GEMM 2 us and terms for our two kernels (fixed s, bandwidth fraction)."""
    path = _gpu_device(tmp_path, "cgpu", per_kernel=1e-6, per_gemm=2e-6)
    dev = yaml.safe_load(open(path).read())
    q = lambda v: {"value": v, "source": "unit test"}  # noqa: E731
    dev["overhead"]["by_kernel"] = {"w4a16": q(w4a16[0]), "decode_attention": q(attn[0])}
    dev["achievable"]["by_op"] = {"w4a16": q(w4a16[1]), "decode_attention": q(attn[1])}
    open(path, "w").write(yaml.safe_dump(dev))
    return path


def test_compress_runtime_decode_runs_four_w4a16_launches_and_our_attention_per_block(tmp_path):
    dev = _compress_device(tmp_path)
    spec = {"device": dev, "prompt": 8, "generate": 4, "implementation": "compress"}
    comp = {"weight_bits": 4, "group_size": 32}
    r = estimate(TINY, spec, compression=comp)
    rows = _rows(r.decode)
    # per block: q/k/v and gate/up stacked; norms, SiLU*up and residual adds inside the launches
    assert rows["qkv_proj"].kernels == rows["gate_up_proj"].kernels == pytest.approx(L)
    assert rows["o_proj"].kernels == rows["down_proj"].kernels == pytest.approx(L)
    for fused_away in ("attn_norm", "mlp_norm", "mlp_act", "attn_residual", "mlp_residual"):
        assert rows[fused_away].kernels == 0 and rows[fused_away].act_bytes == 0, fused_away
    assert "q_proj" not in rows and "gate_proj" not in rows
    # per block: rotary, cache write (1 kernel each), 4 W4A16 launches, our attention; per forward:
    # embedding, final norm, 2 sampling kernels, the lm_head GEMM
    assert r.decode.kernels == pytest.approx(L * 7 + 4 + 1)
    # fixed time: 2 us x lm_head, 1 us x (2 L + 4) kernels, 5 us x 4 L W4A16 launches, 7 us x L attention calls
    bare = estimate(TINY, {**spec, "overhead": False}, compression=comp)
    want = 2e-6 + (2 * L + 4) * 1e-6 + 4 * L * 5e-6 + L * 7e-6
    assert r.decode_ms_per_token - bare.decode_ms_per_token == pytest.approx(want * 1e3)
    # our attention reads every static-cache slot once per query head at its own fraction of 1e11 B/s
    slots = 8 + 4  # prompt + generate: every decode step reads them all
    att = rows["attention"]
    assert att.kv_bytes == pytest.approx(L * HQ * slots * D * 2 * 2)
    assert att.memory_ms == pytest.approx((att.kv_bytes + att.act_bytes) / (0.25 * 1e11) * 1e3)


def test_compress_runtime_dense_baseline_keeps_separate_gemms_and_prefill_dequantizes(tmp_path):
    dev = _compress_device(tmp_path)
    spec = {"device": dev, "prompt": 64, "generate": 4, "implementation": "compress"}
    r = estimate(TINY, spec, compression={"weight_bits": 4, "group_size": 32})
    base = _rows(r.baseline.decode)
    assert all(base[n].kernels == pytest.approx(L) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert base["attention"].kernels == pytest.approx(L)  # our decode attention in the baseline too
    pre = _rows(r.prefill)
    # 64 rows > 16: each stacked group is dequantized (codes in, fp16 weights out), then multiplied densely
    assert pre["qkv_proj_dequant"].act_bytes == pytest.approx(L * H * (HQ + 2 * HKV) * D * 2)
    assert pre["qkv_proj"].weight_bytes == pytest.approx(L * H * (HQ + 2 * HKV) * D * 2)
    # bytes alone (no fixed costs): the dequantized weights are written and read again, so prefill
    # moves more than the dense model's
    bare = estimate(TINY, {**spec, "overhead": False}, compression={"weight_bits": 4, "group_size": 32})
    assert bare.prefill_ms > bare.baseline.prefill_ms


def test_compress_runtime_on_the_h100_against_the_measured_7b_decode():
    """The H100's fitted terms (kernel-only measurements) against session 7's end-to-end run
    (bench/results/kernel_e2e_decode_attn_cluster_h100_2026-12-06.json: fp16 5.932, INT4 1.953 ms/token)."""
    spec = {"device": "h100", "prompt": 128, "generate": 64, "implementation": "compress"}
    r = estimate("llama-2-7b", spec, compression={"weight_bits": 4, "group_size": 128})
    assert not r.warnings
    assert 0.85 < r.decode_ms_per_token / 1.953 < 1.15
    assert 0.85 < r.baseline.decode_ms_per_token / 5.932 < 1.15
    a100 = estimate("llama-2-7b", {**spec, "device": "a100-80gb"}, compression={"weight_bits": 4})
    assert any("no measured fixed cost of w4a16, decode_attention" in w for w in a100.warnings)
    h200 = estimate("llama-2-7b", {**spec, "device": "h200"}, compression={"weight_bits": 4})
    assert [w for w in h200.warnings if "compress's kernels" in w] == [
        "h200 has no measured bandwidth of w4a16, decode_attention (taken as the memory fraction) for compress's "
        "kernels (bench/roofline/fit_compress_roofline.py fits them)"]
