"""Early exit: pure functions, the pass's config checks, the artifact, the lossy forward, exact decoding."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.adapters import get_adapter
from compress.algos import early_exit as A
from compress.errors import CompressError, ConfigError, UnsupportedModelError
from compress.passes.early_exit import EarlyExitConfig, EarlyExitPass, calibrate
from compress.recipe import recipe_from_dict
from compress.runtime.early_exit import EarlyExit, weight_hash
from compress.runtime.speculative import greedy_generate, speculative_generate


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls on a shared 2-core machine: two threads spin against other processes (1000x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(layers: int = 6, vocab: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


# --- pure functions ---------------------------------------------------------------------------
def test_features_gap_top_prob_entropy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]))
    f, top = A.features_from_logits(logits, ["gap", "top_prob", "entropy"])
    assert torch.allclose(f[:, 0], torch.tensor([0.2, 0.85]), atol=1e-6)
    assert torch.allclose(f[:, 1], torch.tensor([0.5, 0.9]), atol=1e-6)
    ent = -(torch.tensor([0.5, 0.3, 0.2]) * torch.tensor([0.5, 0.3, 0.2]).log()).sum()
    assert abs(float(f[0, 2]) - float(ent)) < 1e-5
    assert top.tolist() == [0, 0]
    with pytest.raises(ValueError, match="unknown feature"):
        A.features_from_logits(logits, ["margin"])


def test_wilson_lower_bound():
    # 95 of 100 at one-sided 95% (z = 1.6449): (0.963528 - 0.038318) / 1.027055 = 0.90084 by hand
    assert abs(A.wilson_lower(95, 100, 0.95) - 0.90084) < 2e-5
    assert A.wilson_lower(0, 0) == 0.0
    assert A.wilson_lower(1000, 1000) < 1.0
    assert abs(A._normal_quantile(0.975) - 1.959964) < 1e-5


def test_simulate_and_policy_meets_bound():
    torch.manual_seed(0)
    n, cands, L = 4000, [1, 3, 5], 8
    # layer i agrees with prob rising with depth; score is informative about agreement
    agree = torch.stack([(torch.rand(n) < p).long() for p in (0.3, 0.7, 0.95)])
    scores = agree.float() * 2 - 1 + 0.8 * torch.randn(3, n)
    pol = A.choose_policy(scores, agree, cands, L, target=0.9, check_cost=0.0, max_probes=3)
    assert pol.agreement_lower >= 0.9
    assert pol.mean_layers < L  # something exits
    executed, checks, ok = A.simulate(scores[[cands.index(p) for p in pol.probes]],
                                      agree[[cands.index(p) for p in pol.probes]], list(pol.probes), pol.threshold, L)
    assert abs(float(ok.float().mean()) - pol.agreement) < 1e-9
    assert sum(pol.exit_histogram.values()) == n
    # an unreachable target leaves the full model (agreement 1)
    full = A.choose_policy(scores, agree, cands, L, target=1.0, check_cost=0.0)
    assert full.mean_layers == L and full.agreement == 1.0


def test_flops_and_speculative_model():
    f = A.scoring_flops(10.0, 100.0, tokens=20, executed_blocks=3, checks=2, checked_positions=1)
    assert f == 3 * 10 * 20 + 100 * 20 + 2 * 100 * 1
    tokens, sp = A.speculative_speedup(1.0, 3, 2, 10, 0.0, 0.0, verify_overhead=0.0)
    assert tokens == 4 and math.isclose(sp, 4 * 10 / (4 * 2 + 8))
    assert A.speculative_speedup(0.0, 2, 5, 10, 1.0, 1.0)[1] < 1  # nothing accepted: slower


# --- config checks (before any model work) --------------------------------------------------------
@pytest.mark.parametrize("opts,field", [
    ({"features": ["gap", "margin"]}, "features"),
    ({"classifier": "forest"}, "classifier"),
    ({"target_agreement": 0.0}, "target_agreement"),
    ({"target_agreement": 1.5}, "target_agreement"),
    ({"layers": [-1]}, "layers"),
    ({"layers": "some"}, "layers"),
    ({"thresholds": 3}, "thresholds"),
])
def test_bad_config_names_field(opts, field):
    raw = {"model": "x", "output": "y", "calibration": {}, "passes": [{"early_exit": opts}]}
    with pytest.raises(ConfigError, match=rf"early_exit\.{field}|early_exit.*{field}"):
        recipe_from_dict(raw)


def test_recipe_rules():
    base = {"model": "x", "output": "y", "calibration": {}}
    with pytest.raises(ConfigError, match="must be the last pass"):
        recipe_from_dict({**base, "passes": [{"early_exit": {}}, {"rtn": {"bits": 4}}]})
    with pytest.raises(ConfigError, match="eval.tasks.early_exit"):
        recipe_from_dict({**base, "passes": [{"rtn": {"bits": 4}}], "eval": {"tasks": {"names": ["piqa"], "early_exit": True}}})
    r = recipe_from_dict({**base, "passes": [{"rtn": {"bits": 4}}, {"early_exit": {"layers": [2, 1]}}]})
    assert r.passes[1].config.layers == [1, 2]


def test_preflight_layer_range_and_missing_norm():
    m = tiny(layers=4)
    ad = get_adapter(m)
    with pytest.raises(ConfigError, match="early_exit.layers: 3"):
        EarlyExitPass(EarlyExitConfig(layers=[1, 3])).preflight(m, ad, "dense")
    from dataclasses import replace

    with pytest.raises(UnsupportedModelError, match="final norm"):
        EarlyExitPass(EarlyExitConfig()).preflight(m, replace(ad, final_norm=None), "dense")


# --- calibration, artifact, lossy forward -------------------------------------------------------
def _calibrated(m, **kw):
    torch.manual_seed(1)
    windows = torch.randint(0, m.config.vocab_size, (8, 32))
    cfg = EarlyExitConfig(nsamples=8, seqlen=32, positions_per_sample=16, target_agreement=kw.pop("target", 0.5),
                          draft_vocab=kw.pop("draft_vocab", None), **kw)
    return calibrate(m, get_adapter(m), windows, cfg, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["svm", "logistic"])
def test_calibrate_exports_linear_classifier(kind):
    m = tiny()
    ee, summary = _calibrated(m, classifier=kind)
    assert ee.weight.shape == (2,) and ee.probes and all(0 <= p < 5 for p in ee.probes)
    assert summary["agreement_lower_bound"] >= 0.5
    assert 1 <= ee.exact["exit_layer"] < 6 and ee.exact["k"] >= 1


def test_artifact_roundtrip_and_hash_refusal(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    ee, _ = _calibrated(m, draft_vocab=64)
    ee.save(tmp_path)
    meta = json.loads((tmp_path / "early_exit.json").read_text())
    assert meta["weight_hash"] == weight_hash(tmp_path) and meta["probes"] == ee.probes
    assert not list((tmp_path).glob("early_exit*.safetensors"))  # never beside the weights
    back = EarlyExit.load(tmp_path)
    assert torch.equal(back.weight, ee.weight) and back.threshold == ee.threshold
    assert torch.equal(back.draft_vocab, ee.draft_vocab)
    tiny(seed=5).save_pretrained(tmp_path)  # other weights in the same folder
    with pytest.raises(CompressError, match="calibrated for other weights"):
        EarlyExit.load(tmp_path)


def test_lossy_forward_really_stops_and_matches_truncated_model():
    m = tiny()
    ee, _ = _calibrated(m)
    ids = torch.randint(0, 128, (3, 12))
    full = m(ids).logits
    # never exit: identical to the model
    ee.threshold = float("inf")
    with ee.install(m) as h:
        assert torch.allclose(h.model(ids).logits, full, atol=1e-5)
        assert h.stats.executed == [6, 6, 6]
    # always exit at probe 2: logits are norm+head of block 2's output, and blocks 3.. never run
    ee.threshold, ee.probes = -float("inf"), [2]
    calls = []
    hooks = [b.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, b in enumerate(m.model.layers)]
    with ee.install(m) as h:
        out = m(ids).logits
    for hk in hooks:
        hk.remove()
    assert calls == [0, 1, 2]
    hs = m(ids, output_hidden_states=True).hidden_states[3]  # output of block 2
    assert torch.allclose(out, m.lm_head(m.model.norm(hs)), atol=1e-5)
    assert "forward" not in m.__dict__  # removed


def test_lossy_batch_rows_exit_separately():
    m = tiny()
    ee, _ = _calibrated(m)
    ids = torch.randint(0, 128, (4, 10))
    ee.probes = [1, 3]
    scores = {}
    with ee.install(m) as h:  # find a threshold where rows differ at probe 1
        orig = ee.score
        ee.score = lambda lg: scores.setdefault(len(scores), orig(lg))
        m(ids)
        ee.score = orig
    first = scores[0].sort().values  # one score per row (its last position)
    ee.threshold = float(first[1] + first[2]) / 2  # between rows, so float rounding cannot flip a row
    with ee.install(m) as h:
        out = m(ids).logits
        executed = list(h.stats.executed)
    for r in range(4):  # every row equals its own single-row forward
        with ee.install(m) as h1:
            alone = m(ids[r:r + 1]).logits
            assert h1.stats.executed == [executed[r]]
        assert torch.allclose(out[r], alone[0], atol=1e-5)
    assert len(set(executed)) > 1


def test_expected_positions_and_padding():
    m = tiny()
    ee, _ = _calibrated(m)
    with ee.install(m) as h:
        h.expect([5, 6, 7, 8], 2)
        row = torch.tensor([5, 6, 7, 8, 0, 0])
        assert h.scored_positions(row, None) == [2, 3]
        assert h.scored_positions(torch.tensor([1, 2, 3]), None) == [2]


def test_generation_calls_run_full_model():
    m = tiny()
    ee, _ = _calibrated(m)
    ee.threshold, ee.probes = -float("inf"), [0]
    ids = torch.randint(0, 128, (1, 6))
    ref = m.generate(ids, max_new_tokens=8, do_sample=False)
    with ee.install(m):
        assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False), ref)


# --- exact mode --------------------------------------------------------------------------------
@pytest.mark.parametrize("exit_layer,k", [(1, 1), (3, 2), (5, 4)])
def test_speculative_equals_greedy(exit_layer, k):
    m = tiny()
    ids = torch.randint(0, 128, (1, 9))
    ref = m.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert torch.equal(greedy_generate(m, ids, 30), ref)
    r = speculative_generate(m, get_adapter(m), ids, 30, exit_layer, k, draft_vocab=torch.arange(0, 128, 3))
    assert torch.equal(r.tokens, ref) and r.new_tokens == 30
    assert r.drafted >= r.accepted >= 0 and r.cycles >= 30 // (k + 1)


def test_speculative_full_acceptance_when_draft_is_model():
    # exit_layer = n - 1 with the last block an identity (zeroed outputs) makes the draft the full model
    m = tiny(layers=4)
    last = m.model.layers[-1]
    torch.nn.init.zeros_(last.self_attn.o_proj.weight)
    torch.nn.init.zeros_(last.mlp.down_proj.weight)
    ids = torch.randint(0, 128, (1, 5))
    r = speculative_generate(m, get_adapter(m), ids, 20, 3, 3)
    assert r.acceptance == 1.0
    assert torch.equal(r.tokens, greedy_generate(m, ids, 20))


def test_speculative_bad_args():
    m = tiny()
    ids = torch.randint(0, 128, (2, 4))
    with pytest.raises(CompressError, match="one sequence"):
        speculative_generate(m, get_adapter(m), ids, 5, 2, 2)
    with pytest.raises(CompressError, match="exit_layer"):
        speculative_generate(m, get_adapter(m), ids[:1], 5, 6, 2)
