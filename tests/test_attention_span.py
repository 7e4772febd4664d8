"""Span policies (compress.attention_span): block selection, decode over the kept blocks against a
dense float32 attention with the same mask on fresh random inputs, the model integration (a
step-by-step decode under the policy equals the one-forward scoring mask), and bad input."""
from __future__ import annotations

import pytest
import torch

from compress.attention_span import policies as P
from compress.attention_span.config import SpanSpec, parse_span, spec_from_dict
from compress.attention_span.decode import masked_reference, span_decode_attention
from compress.errors import CompressError, ConfigError
from tests.conftest import tiny_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_forced_blocks_keep_sinks_and_recent():
    keep = P.forced_blocks(length=1000, block_size=64, sink_tokens=4, recent_tokens=256)
    assert keep.numel() == 16
    # sinks: block 0; recent: positions 744..999 -> blocks 11..15
    assert keep.nonzero().flatten().tolist() == [0, 11, 12, 13, 14, 15]
    assert P.forced_blocks(10, 64, 0, 0).tolist() == [True]  # the current token's block always


def test_select_blocks_fixed_size_ascending_padded():
    scores = torch.tensor([[[0.0, 5.0, 1.0, 9.0, 2.0, 3.0]]])
    forced = torch.tensor([True, False, False, False, False, True])
    ids = P.select_blocks(scores, forced, max_blocks=4)
    assert ids.tolist() == [[[0, 1, 3, 5]]]
    ids = P.select_blocks(scores[..., :3], forced[:3], max_blocks=5)  # fewer blocks than the budget
    assert ids.tolist() == [[[0, 1, 2, -1, -1]]]
    ids = P.select_blocks(scores.masked_fill(~forced, float("-inf")), forced, max_blocks=4)
    assert ids.tolist() == [[[0, 5, -1, -1]]]


def test_quest_scores_are_upper_bounds_of_the_group_logits():
    b, h, hk, d, bs, length = 2, 6, 2, 16, 8, 40
    q, k = rand(b, h, d, seed=1), rand(b, hk, length, d, seed=2)
    lo, hi = P.block_minmax(k, bs)
    bound = P.quest_scores(q, lo, hi)  # [B, Hkv, blocks]
    logits = torch.einsum("bkgd,bkld->bkgl", q.view(b, hk, h // hk, d), k).amax(2)  # group max per position
    per_block = logits.view(b, hk, length // bs, bs).amax(-1)
    assert (bound >= per_block - 1e-5).all()
    # the bound is tight for a block holding one key repeated
    k2 = k.clone()
    k2[:, :, :bs] = k2[:, :, :1]
    lo2, hi2 = P.block_minmax(k2, bs)
    exact = torch.einsum("bkgd,bkd->bkg", q.view(b, hk, h // hk, d), k2[:, :, 0]).amax(2)
    torch.testing.assert_close(P.quest_scores(q, lo2, hi2)[..., 0], exact, rtol=1e-5, atol=1e-5)


def test_block_minmax_partial_block_uses_filled_positions_only():
    k = rand(1, 1, 10, 4)
    lo, hi = P.block_minmax(k, 8)
    torch.testing.assert_close(lo[0, 0, 1], k[0, 0, 8:].amin(0))
    torch.testing.assert_close(hi[0, 0, 1], k[0, 0, 8:].amax(0))


def test_snapkv_votes_follow_the_observation_windows_attention():
    b, h, hk, d, bs, length = 1, 4, 2, 8, 4, 32
    k = rand(b, hk, length, d, seed=3)
    q = torch.zeros(b, h, 2, d)
    q[..., :] = 20 * k[:, :, 9].repeat_interleave(2, 1).unsqueeze(2)  # all window queries look at position 9
    votes = P.snapkv_scores(q, k, 1.0, bs, pool_kernel=1)
    assert votes.shape == (b, hk, 8)
    assert (votes.argmax(-1) == 9 // bs).all()
    torch.testing.assert_close(votes.sum(-1), torch.full((b, hk), 4.0))  # 2 heads x 2 queries, each sums to 1
    dec = P.snapkv_decode_scores(votes, 10)
    assert (dec[..., 8:] > votes.amax()).all() and dec[0, 0, 9] > dec[0, 0, 8]


@pytest.mark.parametrize("b,h,hk,length,bs,m", [(1, 9, 3, 300, 64, 3), (3, 8, 2, 517, 32, 6), (2, 4, 4, 64, 16, 2)])
def test_span_decode_matches_dense_masked_reference(b, h, hk, length, bs, m):
    d = 32
    q, k, v = rand(b, h, 1, d, seed=4), rand(b, hk, length, d, seed=5), rand(b, hk, length, d, seed=6)
    nb = P.num_blocks(length, bs)
    scores = rand(b, hk, nb, seed=7)
    ids = P.select_blocks(scores, P.forced_blocks(length, bs, 4, bs), m)
    out = span_decode_attention(q, k, v, ids, bs, d ** -0.5)
    ref = masked_reference(q, k, v, ids, bs, d ** -0.5)
    assert out.shape == (b, 1, h, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # padded lists and the caller's mask (a padded-out first position) are honoured
    ids[..., -1] = -1
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[:, :, :, :3] = False
    torch.testing.assert_close(span_decode_attention(q, k, v, ids, bs, 0.1, mask),
                               masked_reference(q, k, v, ids, bs, 0.1, mask), rtol=1e-5, atol=1e-5)


def test_spec_errors_name_the_field():
    with pytest.raises(ConfigError, match="block_size: 48 is not a power of two"):
        parse_span("quest,block_size=48")
    with pytest.raises(ConfigError, match="block_size: 128 is larger than budget_tokens 64"):
        spec_from_dict({"policy": "window", "block_size": 128, "budget_tokens": 64, "recent_tokens": 0})
    with pytest.raises(ConfigError, match="budget_tokens: 256 is smaller than sink_tokens"):
        parse_span("quest,budget_tokens=256,recent_tokens=256")
    with pytest.raises(ConfigError, match="budget_tokens: 256 cannot hold"):
        parse_span("quest,budget_tokens=256,recent_tokens=200")
    with pytest.raises(ConfigError, match="policy"):
        parse_span("h2o")
    with pytest.raises(ConfigError, match="unknown key 'budget'"):
        parse_span("quest,budget=512")
    assert parse_span("snapkv,budget_tokens=512,recent_tokens=128").max_blocks == 8


SPEC = dict(block_size=8, budget_tokens=32, sink_tokens=2, recent_tokens=8, observation_window=6, pool_kernel=3)


def _model():
    return tiny_model("llama", vocab_size=128, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=512)


@pytest.mark.parametrize("policy", ["window", "quest", "snapkv"])
def test_decode_under_policy_equals_one_forward_scoring(policy):
    """Greedy-free check of the integration: logits of positions past a dense prefill, decoded one
    token at a time with the policy (DynamicCache), equal those of one forward with the policy's
    scoring mask; both differ from dense attention once the cache outgrows the budget."""
    from transformers import DynamicCache

    from compress.attention_span.install import install, uninstall

    model = _model()
    ids = torch.randint(0, 128, (2, 72), generator=torch.Generator().manual_seed(0))
    prefix = 40
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        state = install(model, SpanSpec(policy=policy, **SPEC))
        cache = DynamicCache()
        out = model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(prefix, ids.shape[1] - 1):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        stepwise = torch.stack(steps, 1)
        assert state.kernel == "gather" and state.read_fraction < 0.8
        state.scoring_prefix = prefix
        scored = model(ids, use_cache=False).logits[:, prefix - 1:-1]
        uninstall(model)
        again = model(ids, use_cache=False).logits
    torch.testing.assert_close(scored, stepwise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, dense)  # uninstall restores dense attention
    assert (stepwise[:, -5:] - dense[:, -6:-1]).abs().max() > 1e-3  # the policy really drops positions


def test_within_budget_decode_is_dense():
    from transformers import DynamicCache

    from compress.attention_span.install import install

    model = _model()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
        install(model, SpanSpec(policy="quest", **SPEC))
        cache = DynamicCache()
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        last = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(last, dense, rtol=1e-5, atol=1e-5)


def test_policy_without_prefill_statistics_is_an_error():
    from transformers import DynamicCache

    from compress.attention_span.install import install

    model = _model()
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)  # filled before the policy was installed
        install(model, SpanSpec(policy="snapkv", **SPEC))
        with pytest.raises(CompressError, match="policy: 'snapkv' needs prefill statistics"):
            model(ids[:, -1:], past_key_values=cache, use_cache=True)


def test_trained_policy_on_a_model_without_span_tokens_is_an_error():
    from compress.attention_span.install import install

    with pytest.raises(CompressError, match="policy: 'trained' needs a model fine-tuned"):
        install(_model(), SpanSpec(policy="trained", **SPEC))
