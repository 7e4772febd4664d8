"""The pruning passes (magnitude, wanda, sparsegpt, alpha_allocation) on a tiny Llama built from a config."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.adapters import get_adapter
from compress.algos.sparsity import unstructured_mask, wanda_scores
from compress.calibration import CalibrationData
from compress.context import PassContext
from compress.errors import ConfigError
from compress.passes.alpha_allocation import AlphaAllocation, AlphaAllocationConfig
from compress.passes.magnitude import Magnitude, MagnitudeConfig
from compress.passes.sparsegpt import SparseGPT, SparseGPTConfig
from compress.passes.wanda import Wanda, WandaConfig

VOCAB = 128


@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # unequal input-feature scales, as in trained models, so activation-aware methods differ from magnitude
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(torch.logspace(-1, 1, 64)[torch.randperm(64)])
            layer.post_attention_layernorm.weight.copy_(torch.logspace(-1, 1, 64)[torch.randperm(64)])
    return model


@pytest.fixture(scope="module")
def calib() -> CalibrationData:
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    return CalibrationData(input_ids=ids, source="random tokens", seed=1, total_tokens=ids.numel())


def make_ctx(model, calib) -> PassContext:
    return PassContext(adapter=get_adapter(model), device=torch.device("cpu"), calibration_factory=lambda: calib)


def block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def logits_rel_err(ref, model, ids) -> float:
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    return float((a - b).norm() / a.norm())


def test_magnitude_exact_per_layer_counts(base_model, calib):
    model = copy.deepcopy(base_model)
    report = Magnitude(MagnitudeConfig(sparsity=0.5)).apply(model, make_ctx(model, calib))
    lins = block_linears(model)
    assert len(report.modules) == len(lins) == 14
    for name, m in lins.items():
        assert int((m.weight == 0).sum()) == m.weight.numel() // 2, name
    assert torch.equal(model.lm_head.weight, base_model.lm_head.weight)
    assert "lm_head" in report.ignored
    assert abs(report.summary["achieved_sparsity"] - 0.5) < 1e-12
    assert 0.1 < report.summary["mean_rel_weight_error"] < 1  # measured against the weights before pruning


@pytest.mark.parametrize("mask,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_wanda_nm_structure(base_model, calib, mask, n, m):
    model = copy.deepcopy(base_model)
    Wanda(WandaConfig(mask=mask)).apply(model, make_ctx(model, calib))
    for name, lin in block_linears(model).items():
        nz = (lin.weight != 0).reshape(lin.out_features, -1, m).sum(-1)
        assert bool((nz == n).all()), name


def test_wanda_matches_manual_scores_on_first_layer(base_model, calib):
    """q_proj of block 0 sees unpruned inputs, so the pass's mask must equal Wanda computed by hand."""
    ref = copy.deepcopy(base_model)
    seen = []
    h = ref.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        for row in calib.input_ids:
            ref(row.unsqueeze(0))
    h.remove()
    x = torch.cat([s.reshape(-1, 64) for s in seen]).double()
    W = ref.model.layers[0].self_attn.q_proj.weight.data
    expected = unstructured_mask(wanda_scores(W.double(), x.square().sum(0)), 0.5, per_row=True)

    model = copy.deepcopy(base_model)
    Wanda(WandaConfig(sparsity=0.5)).apply(model, make_ctx(model, calib))
    got = model.model.layers[0].self_attn.q_proj.weight != 0
    assert torch.equal(got, expected)
    for lin in block_linears(model).values():  # per-row exact counts everywhere
        assert bool(((lin.weight == 0).sum(1) == lin.in_features // 2).all())


def test_sparsegpt_beats_magnitude_and_wanda(base_model, calib):
    errs = {}
    for name, pass_ in [("magnitude", Magnitude(MagnitudeConfig(sparsity=0.5))),
                        ("wanda", Wanda(WandaConfig(sparsity=0.5))),
                        ("sparsegpt", SparseGPT(SparseGPTConfig(sparsity=0.5)))]:
        model = copy.deepcopy(base_model)
        report = pass_.apply(model, make_ctx(model, calib))
        errs[name] = logits_rel_err(base_model, model, calib.input_ids)
        if name == "sparsegpt":
            for mod_name, lin in block_linears(model).items():
                assert int((lin.weight == 0).sum()) >= lin.weight.numel() // 2
                assert report.modules[mod_name]["pruned"] == lin.weight.numel() // 2
                assert 0 < report.modules[mod_name]["rel_output_error"] < 1
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_alpha_allocation_plan_then_sparsegpt(base_model, calib):
    model = copy.deepcopy(base_model)
    ctx = make_ctx(model, calib)
    rep = AlphaAllocation(AlphaAllocationConfig(target_sparsity=0.7, epsilon=0.3)).apply(model, ctx)
    plan = ctx.sparsity_plan
    lins = block_linears(model)
    assert set(plan) == set(lins)
    counts = {n: m.weight.numel() for n, m in lins.items()}
    mean = sum(plan[n] * counts[n] for n in plan) / sum(counts.values())
    assert abs(mean - 0.7) < 1e-9
    # block-wise: one ratio per block, higher block alpha -> higher sparsity
    by_block = {}
    for n, stats in rep.modules.items():
        by_block.setdefault(n.split(".")[2], set()).add((round(stats["alpha_used"], 12), round(stats["sparsity"], 12)))
    pairs = sorted(next(iter(v)) for v in by_block.values())
    assert all(len(v) == 1 for v in by_block.values())
    assert pairs[0][1] < pairs[1][1]
    assert math.isclose(pairs[1][1] / pairs[0][1], 1.3 / 0.7, rel_tol=1e-9)  # two blocks: the extremes

    report = SparseGPT(SparseGPTConfig(sparsity="plan")).apply(model, ctx)
    for n, lin in lins.items():
        assert report.modules[n]["pruned"] == math.floor(plan[n] * lin.weight.numel() + 1e-9), n
    total_zeros = sum(int((m.weight == 0).sum()) for m in lins.values())
    assert abs(total_zeros / sum(counts.values()) - 0.7) < 2e-3


def test_plan_without_allocation_fails_before_work(base_model, calib):
    model = copy.deepcopy(base_model)
    with pytest.raises(ConfigError, match="allocation pass"):
        Wanda(WandaConfig(sparsity="plan")).apply(model, make_ctx(model, calib))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, base_model.model.layers[0].mlp.up_proj.weight)


def test_lm_head_must_stay_ignored(base_model, calib):
    model = copy.deepcopy(base_model)
    with pytest.raises(ConfigError, match="lm_head"):
        Magnitude(MagnitudeConfig(sparsity=0.5, ignore=[])).apply(model, make_ctx(model, calib))


def test_ignore_leaves_layers_dense(base_model, calib):
    model = copy.deepcopy(base_model)
    report = Magnitude(MagnitudeConfig(sparsity=0.5, ignore=["lm_head", "mlp.down_proj"])).apply(model, make_ctx(model, calib))
    assert "model.layers.1.mlp.down_proj" in report.ignored
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, base_model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (MagnitudeConfig, {}, "sparsity is required"),
        (MagnitudeConfig, {"sparsity": 1.0}, "sparsity"),
        (WandaConfig, {"sparsity": 0.5, "mask": "3:3"}, "N < M"),
        (WandaConfig, {"sparsity": 0.5, "mask": "2-4"}, "allowed"),
        (WandaConfig, {"sparsity": 0.7, "mask": "2:4"}, "contradicts"),
        (SparseGPTConfig, {"sparsity": "plan", "mask": "2:4"}, "plan cannot be combined"),
        (SparseGPTConfig, {"mask": "4:8", "block_size": 12}, "block_size"),
        (SparseGPTConfig, {"sparsity": 0.5, "blocksize": 64}, "blocksize"),
        (AlphaAllocationConfig, {"target_sparsity": 0.7, "epsilon": 1.2}, "epsilon"),
        (AlphaAllocationConfig, {"epsilon": 0.3}, "target_sparsity"),
        (AlphaAllocationConfig, {"target_sparsity": 0.7, "xmin_strategy": "median"}, "xmin_strategy"),
    ],
)
def test_bad_configs_name_the_field(cls, kwargs, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        cls(**kwargs)


def test_recipe_order_rules_with_these_passes(monkeypatch):
    """Once registered, the recipe's ordering rules apply: plan needs an earlier allocation pass."""
    from compress import registry
    from compress.recipe import recipe_from_dict

    for cls in (Magnitude, Wanda, SparseGPT, AlphaAllocation):
        monkeypatch.setitem(registry.PASSES, cls.name, cls)
    base = {"model": "m", "output": "o", "calibration": {"nsamples": 4, "seqlen": 32}}
    ok = recipe_from_dict({**base, "passes": [{"alpha_allocation": {"target_sparsity": 0.7, "epsilon": 0.3}},
                                              {"sparsegpt": {"sparsity": "plan", "mask": "unstructured"}}]})
    assert ok.passes[1].config.sparsity == "plan"
    with pytest.raises(ConfigError, match="allocation pass"):
        recipe_from_dict({**base, "passes": [{"wanda": {"sparsity": "plan"}}]})
    with pytest.raises(ConfigError, match=r"passes\[0\]\.wanda\.mask"):
        recipe_from_dict({**base, "passes": [{"wanda": {"sparsity": 0.5, "mask": "5:4"}}]})
