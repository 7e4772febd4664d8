"""Long-window perplexity with a span policy applied during scoring.

Each window of ``seqlen`` tokens is split at ``prefix``: the first ``prefix`` positions are a dense
prefill; every later position is scored as a decode step under the policy (its attention reads only
the blocks the policy would select at that cache length), in one forward with the equivalent mask
(``SpanState.scoring_prefix``; the test suite checks it against a token-by-token decode). Only the
tokens after the prefix are scored, for the dense model and for every policy alike, so the numbers
compare the same predictions. Windows are the first non-overlapping windows of the text, as in
``compress.eval.perplexity``.

Example::

    span_perplexity(model, tok, [SpanSpec(policy="quest", budget_tokens=1024)], seqlen=4096, prefix=2048, max_windows=2)
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.attention_span.config import SpanSpec
from compress.errors import CompressError


@torch.no_grad()
def span_perplexity(model, tokenizer, specs: list[SpanSpec], dataset: str = "wikitext2", seqlen: int = 4096,
                    prefix: int | None = None, max_windows: int | None = 2, ids: torch.Tensor | None = None) -> dict:
    """{"dense": ppl, "<policy label>": ppl, ...} over the tokens after ``prefix`` (default
    ``seqlen // 2``) of the first ``max_windows`` windows."""
    from compress.attention_span.install import SpanState, install, set_state, uninstall
    from compress.eval.perplexity import eval_text, tokenize_stream

    prefix = seqlen // 2 if prefix is None else prefix
    if not 0 < prefix < seqlen - 1:
        raise CompressError(f"span perplexity: prefix {prefix} must lie inside the window of {seqlen} tokens")
    t0 = time.perf_counter()
    if ids is None:
        ids = tokenize_stream(tokenizer, eval_text(dataset))
    total = ids.numel() // seqlen
    if total == 0:
        raise CompressError(f"span perplexity: {dataset} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = total if max_windows is None else min(max_windows, total)
    device = next(model.parameters()).device
    labels = ["dense"] + [s.label() for s in specs]
    losses = {lab: [] for lab in labels}
    prev = getattr(model.config, "_attn_implementation", "sdpa")
    if specs:
        install(model, specs[0])
    try:
        for w in tqdm(range(n), desc="span perplexity"):
            batch = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
            target = batch[0, prefix + 1:]
            for spec, lab in zip([None, *specs], labels):
                if specs:
                    st = None if spec is None else SpanState(spec, scoring_prefix=prefix)
                    set_state(model, st)
                logits = model(batch, use_cache=False).logits[0, prefix:-1].float()
                losses[lab].append(float(F.cross_entropy(logits, target)))
    finally:
        if specs:
            uninstall(model)
            model.config._attn_implementation = prev
    return {"dataset": dataset, "seqlen": seqlen, "prefix": prefix, "windows": n, "total_windows": total,
            "tokens_scored": n * (seqlen - prefix - 1), "partial": n < total,
            "perplexity": {lab: math.exp(sum(v) / len(v)) for lab, v in losses.items()},
            "seconds": round(time.perf_counter() - t0, 1)}
