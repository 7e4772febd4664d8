"""The perplexity protocol, checked by hand on a tiny model and once on the real model (short windows)."""
import math

import pytest
import torch
import torch.nn.functional as F

from compress.eval.perplexity import eval_text, perplexity, tokenize_stream
from tests.conftest import WIKI, tiny_model


def test_protocol_matches_manual_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, None, "manual", seqlen=16, ids=ids)
    assert res.total_windows == 6 and res.windows == 6 and not res.partial and res.tokens_scored == 96
    losses = []
    with torch.no_grad():
        for i in range(6):
            w = ids[i * 16 : (i + 1) * 16].unsqueeze(0)
            losses.append(F.cross_entropy(model(w).logits[0, :-1], w[0, 1:]).item())
    assert res.perplexity == pytest.approx(math.exp(sum(losses) / 6), rel=1e-6)
    part = perplexity(model, None, "manual", seqlen=16, max_windows=2, ids=ids)
    assert part.partial and part.windows == 2 and part.perplexity == pytest.approx(math.exp(sum(losses[:2]) / 2), rel=1e-6)


def test_wikitext_rows_follow_the_hugging_face_split():
    text = eval_text(str(WIKI))
    lines = WIKI.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4358
    # blank lines are empty rows, text rows keep their newline: "\n\n" joins them
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n")


def test_real_model_on_short_windows(smollm2_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ids = tokenize_stream(smollm2_tokenizer, eval_text(str(WIKI)))
    assert ids.numel() // 2048 == 148  # the windows the full-test protocol scores at seqlen 2048
    res = perplexity(model, smollm2_tokenizer, str(WIKI), seqlen=256, max_windows=2, ids=ids)
    # a 135M model on WikiText: tens, not thousands (21.6 at seqlen 2048 on the full test)
    assert 8 < res.perplexity < 80 and res.partial
