"""Structural pruning (width_prune, depth_prune) and its importance scores, on tiny models from configs."""
from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from compress.adapters import get_adapter, get_submodule
from compress.algos import structure as S
from compress.calibration import CalibrationData
from compress.context import PassContext
from compress.errors import ConfigError
from compress.passes.depth_prune import DepthPrune, DepthPruneConfig, block_influences
from compress.passes.width_prune import WidthPrune, WidthPruneConfig, count_params
from tests.conftest import tiny_model

VOCAB = 320  # tiny_model's default vocabulary


def calib(n: int = 4, seqlen: int = 16) -> CalibrationData:
    ids = torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(1))
    return CalibrationData(input_ids=ids, source="random tokens", seed=1, total_tokens=ids.numel())


def ctx_for(model, data: CalibrationData | None = None) -> PassContext:
    data = data or calib()
    return PassContext(adapter=get_adapter(model), device=torch.device("cpu"), calibration_factory=lambda: data)


def test_ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


test_ids.__test__ = False  # a helper, not a test


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


# --- importance scores ----------------------------------------------------------------------------
def test_magnitude_ranks_zeroed_channel_lowest():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(16, 32, generator=g)
    gate[5], up[5], down[:, 5] = 0, 0, 0
    es = [S.element_scores(w, "magnitude") for w in (gate, up, down)]
    scores = S.channel_scores(es[:2], es[2:], "magnitude")
    assert int(scores.argmin()) == 5
    assert 5 not in S.keep_topk(scores, 31).tolist()
    # L2 of the structure's weights, against a float64 reference
    ref = torch.cat([gate[7].double(), up[7].double(), down[:, 7].double()]).norm()
    assert abs(float(scores[7]) - float(ref)) / float(ref) < 1e-6


def test_kv_group_scores_match_explicit_sum():
    g = torch.Generator().manual_seed(1)
    heads, kv, d, hidden = 6, 2, 4, 16
    q, k, v = (torch.rand(n * d, hidden, generator=g) for n in (heads, kv, kv))
    o = torch.rand(hidden, heads * d, generator=g)
    got = S.kv_group_scores(q, k, v, o, heads, kv, "taylor")  # taylor: plain sums of the element scores
    for grp in range(kv):
        qh = range(grp * 3, grp * 3 + 3)  # HF repeat_kv: query head h reads KV head h // 3
        ref = sum(q[h * d:(h + 1) * d].double().sum() + o[:, h * d:(h + 1) * d].double().sum() for h in qh)
        ref += k[grp * d:(grp + 1) * d].double().sum() + v[grp * d:(grp + 1) * d].double().sum()
        assert abs(float(got[grp]) - float(ref)) / float(ref) < 1e-6


def test_keep_per_group_keeps_best_of_each_group():
    scores = torch.tensor([1.0, 5.0, 3.0, 9.0, 2.0, 4.0])  # 2 groups of 3
    assert S.keep_per_group(scores, 2, 2).tolist() == [1, 2, 3, 5]


def test_block_influence_of_identity_is_zero():
    h = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))
    same, n = S.block_influence(h, h)
    assert n == 20 and abs(same) < 1e-10
    other, _ = S.block_influence(h, torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3)))
    assert other / n > 0.5  # unrelated vectors: cos ~ 0


def _make_block_identity(model, i: int) -> None:
    """Zero the residual branches' output projections: the block passes its input through unchanged."""
    ad = get_adapter(model)
    block = ad.blocks(model)[i]
    with torch.no_grad():
        for name in (ad.attn["o"], ad.mlp["down"]):
            lin = get_submodule(block, name)
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


def test_block_influence_of_identity_block_in_model():
    model = tiny_model("llama", num_hidden_layers=4)
    _make_block_identity(model, 2)
    scores = block_influences(model, get_adapter(model), calib().input_ids, torch.device("cpu"))
    assert scores[2] < 1e-9 and min(scores[1], scores[3]) > 1e-4


# --- width pruning --------------------------------------------------------------------------------
def _masked_reference(original, report) -> torch.nn.Module:
    """The original model with the removed channels/heads silenced by zeroing their output columns.

    Removing a channel (or head) is exactly this, so its logits must equal the pruned model's.
    """
    ref = copy.deepcopy(original)
    ad = get_adapter(ref)
    d = ad.geometry(ref.config)["head_dim"]
    with torch.no_grad():
        for i, block in enumerate(ad.blocks(ref)):
            mlp = report.modules.get(f"{ad.block_prefix(i)}.mlp")
            if mlp:
                get_submodule(block, ad.mlp["down"]).weight[:, mlp["removed"]] = 0
            attn = report.modules.get(f"{ad.block_prefix(i)}.attn")
            if attn:
                cols = S.expand_heads(torch.tensor(attn["heads_removed"], dtype=torch.long), d)
                get_submodule(block, ad.attn["o"]).weight[:, cols] = 0
    return ref


CASES = [
    ("llama", dict(mlp_ratio=0.25, head_ratio=0.5), dict(intermediate_size=96, num_attention_heads=2, num_key_value_heads=1)),
    ("llama", dict(mlp_ratio=0.5, head_ratio=0.5, head_mode="per_group"),
     dict(intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)),
    ("qwen3", dict(mlp_ratio=0.25, head_ratio=0.5), dict(intermediate_size=96, num_attention_heads=2, num_key_value_heads=1)),
    ("opt", dict(mlp_ratio=0.25), dict(ffn_dim=96, num_attention_heads=4)),
    ("gpt_neox", dict(mlp_ratio=0.25), dict(intermediate_size=96, num_attention_heads=4)),
]


@pytest.mark.parametrize("family,opts,expect", CASES, ids=[f"{c[0]}-{c[1].get('head_mode', 'kv')}" for c in CASES])
def test_width_prune_shapes_config_and_round_trip(tmp_path, family, opts, expect):
    original = tiny_model(family)
    model = copy.deepcopy(original)
    report = WidthPrune(WidthPruneConfig(**opts)).apply(model, ctx_for(model))
    for key, val in expect.items():
        assert getattr(model.config, key) == val, key
    ad = get_adapter(model)
    block = ad.blocks(model)[1]
    inter = expect.get("intermediate_size", expect.get("ffn_dim"))
    assert get_submodule(block, ad.mlp["up"]).out_features == inter
    assert get_submodule(block, ad.mlp["down"]).in_features == inter
    if "head_ratio" in opts:
        assert model.config.head_dim == 16  # explicit: hidden / heads would now be 32
        assert get_submodule(block, ad.attn["q"]).out_features == expect["num_attention_heads"] * 16
        assert get_submodule(block, ad.attn["k"]).out_features == expect["num_key_value_heads"] * 16
        assert get_submodule(block, ad.attn["o"]).in_features == expect["num_attention_heads"] * 16
    ids = test_ids()
    pruned_logits = logits(model, ids)
    assert rel_err(logits(_masked_reference(original, report), ids), pruned_logits) < 1e-5
    assert report.summary["params_after"] == count_params(model) < count_params(original)

    model.save_pretrained(tmp_path / "pruned", safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert count_params(loaded) == report.summary["params_after"]
    assert torch.allclose(logits(loaded, ids), pruned_logits, atol=1e-6, rtol=1e-5)
    out = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_data_aware_importance_prunes_consistently(importance):
    original = tiny_model("llama")
    model = copy.deepcopy(original)
    report = WidthPrune(WidthPruneConfig(mlp_ratio=0.25, head_ratio=0.5, importance=importance)).apply(
        model, ctx_for(model))
    assert report.summary["importance"] == importance and model.config.intermediate_size == 96
    ids = test_ids()
    assert rel_err(logits(_masked_reference(original, report), ids), logits(model, ids)) < 1e-5
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # taylor restored the flags


def test_taylor_ranks_dead_channel_lowest():
    model = tiny_model("llama")
    with torch.no_grad():  # channel 7 of block 0 contributes nothing: w * dL/dw is 0 on all its weights
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0
    report = WidthPrune(WidthPruneConfig(mlp_ratio=0.05, importance="taylor")).apply(model, ctx_for(model))
    assert 7 in report.modules["model.layers.0.mlp"]["removed"]


def test_width_prune_then_gptq_loads_in_plain_transformers(tmp_path):
    from compress.formats import save_checkpoint
    from compress.passes.gptq import GPTQ, GPTQConfig

    model = tiny_model("llama")
    ctx = ctx_for(model)
    WidthPrune(WidthPruneConfig(mlp_ratio=0.25, head_ratio=0.5)).apply(model, ctx)
    GPTQ(GPTQConfig(group_size=32)).apply(model, ctx)  # new widths 96 and 32 are multiples of 32
    save_checkpoint(model, None, tmp_path / "ck", "compressed-tensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert loaded.config.intermediate_size == 96 and loaded.config.num_key_value_heads == 1
    ids = test_ids()
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("opts,field", [
    (dict(mlp_ratio=1.0), "mlp_ratio"),
    (dict(mlp_ratio=-0.1), "mlp_ratio"),
    (dict(head_ratio=1.5), "head_ratio"),
    (dict(mlp_ratio=0.2, importance="fisher"), "importance"),
    (dict(mlp_ratio=0.2, head_mode="heads"), "head_mode"),
])
def test_width_config_rejects_bad_values(opts, field):
    with pytest.raises(ValidationError, match=field):
        WidthPruneConfig(**opts)


@pytest.mark.parametrize("family,opts,field", [
    ("llama", dict(head_ratio=0.9), "head_ratio"),            # 2 KV groups -> removes both
    ("llama", dict(head_ratio=0.1), "head_ratio"),            # rounds to no group removed
    ("llama", dict(head_ratio=0.9, head_mode="per_group"), "head_ratio"),  # no query head left per group
    ("llama", dict(mlp_ratio=0.999), "mlp_ratio"),            # no channel left
    ("llama", dict(), "mlp_ratio, head_ratio"),               # nothing to prune
    ("llama", dict(mlp_ratio=0.2, channel_multiple=256), "mlp_ratio"),
    ("opt", dict(head_ratio=0.5), "head_ratio"),              # OPT derives head_dim from heads
    ("gpt_neox", dict(head_ratio=0.5), "head_ratio"),         # fused qkv, derived head_dim
])
def test_width_prune_rejects_impossible_sizes_before_any_change(family, opts, field):
    model = tiny_model(family)
    before = count_params(model)
    with pytest.raises(ConfigError, match=field):
        WidthPrune(WidthPruneConfig(**opts)).apply(model, ctx_for(model))
    assert count_params(model) == before


# --- depth pruning --------------------------------------------------------------------------------
def _skip_blocks(original, removed: list[int]):
    """The original model with blocks ``removed`` made pass-through by hooks (the removal, computed differently)."""
    ref = copy.deepcopy(original)
    for i in removed:
        get_adapter(ref).blocks(ref)[i].register_forward_hook(
            lambda m, a, kw, out: (a[0] if a else kw["hidden_states"]) if not isinstance(out, tuple)
            else ((a[0] if a else kw["hidden_states"]), *out[1:]), with_kwargs=True)
    return ref


@pytest.mark.parametrize("family,metric", [("llama", "block_influence"), ("qwen3", "perplexity"),
                                           ("opt", "block_influence"), ("gpt_neox", "perplexity")])
def test_depth_prune_renumbers_and_round_trips(tmp_path, family, metric):
    original = tiny_model(family, num_hidden_layers=5)
    model = copy.deepcopy(original)
    report = DepthPrune(DepthPruneConfig(num_blocks=2, metric=metric)).apply(model, ctx_for(model))
    removed = report.summary["removed_blocks"]
    assert len(removed) == 2 and 0 not in removed and 4 not in removed  # keep_first / keep_last default 1
    ad = get_adapter(model)
    assert model.config.num_hidden_layers == 3 == len(ad.blocks(model))
    idx = [m.layer_idx for b in ad.blocks(model) for m in b.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1, 2]
    for new, block in enumerate(ad.blocks(model)):
        assert all(m.layer_idx == new for m in block.modules() if hasattr(m, "layer_idx"))
    if family == "qwen3":
        assert len(model.config.layer_types) == 3 and model.config.max_window_layers == 3
    ids = test_ids()
    pruned_logits = logits(model, ids)
    assert rel_err(logits(_skip_blocks(original, removed), ids), pruned_logits) < 1e-5
    # cached generation indexes the KV cache by layer_idx: it must match generation without a cache
    cached = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False))

    model.save_pretrained(tmp_path / "pruned", safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert count_params(loaded) == report.summary["params_after"] == count_params(model)
    assert torch.allclose(logits(loaded, ids), pruned_logits, atol=1e-6, rtol=1e-5)
    assert torch.equal(loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), cached)


@pytest.mark.parametrize("metric", ["block_influence", "perplexity"])
def test_depth_prune_removes_identity_block(metric):
    model = tiny_model("llama", num_hidden_layers=4)
    _make_block_identity(model, 2)
    report = DepthPrune(DepthPruneConfig(num_blocks=1, metric=metric)).apply(model, ctx_for(model))
    scores = {i: report.modules[f"model.layers.{i}"]["score"] for i in (1, 2)}  # blocks 0 and 3 are protected
    assert abs(scores[2]) < 1e-6
    # block influence is >= 0, so the identity block goes; a loss rise is signed (dropping a block of a
    # random model may even help), so the pass removes whichever block raises the loss least
    assert report.summary["removed_blocks"] == [min(scores, key=scores.get)]
    if metric == "block_influence":
        assert report.summary["removed_blocks"] == [2]


@pytest.mark.parametrize("opts", [
    dict(num_blocks=4, keep_first=0, keep_last=0),  # every block
    dict(num_blocks=3),                              # more than the 2 unprotected blocks
    dict(num_blocks=1, keep_first=2, keep_last=2),   # all protected
])
def test_depth_prune_rejects_too_many_blocks(opts):
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(ConfigError, match="num_blocks"):
        DepthPrune(DepthPruneConfig(**opts)).apply(model, ctx_for(model))
    assert len(model.model.layers) == 4


@pytest.mark.parametrize("opts,field", [(dict(num_blocks=0), "num_blocks"), (dict(), "num_blocks"),
                                        (dict(num_blocks=1, metric="angular"), "metric"),
                                        (dict(num_blocks=1, keep_first=-1), "keep_first")])
def test_depth_config_rejects_bad_values(opts, field):
    with pytest.raises(ValidationError, match=field):
        DepthPruneConfig(**opts)


def test_width_prune_refuses_quantized_layers_before_any_change():
    from compress.errors import CompressError
    from compress.passes.rtn import RTN, RTNConfig

    model = tiny_model("llama")
    RTN(RTNConfig(group_size=32, ignore=["lm_head", r"re:\.mlp\."])).apply(model, ctx_for(model))  # attention quantized
    before = count_params(model)
    with pytest.raises(CompressError, match="before quantization"):
        WidthPrune(WidthPruneConfig(mlp_ratio=0.25, head_ratio=0.5)).apply(model, ctx_for(model))
    assert count_params(model) == before and model.config.intermediate_size == 128
