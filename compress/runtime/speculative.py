"""Exact mode of early exit: greedy self-speculative decoding (LayerSkip, Elhoushi et al., 2024; Draft &
Verify, Zhang et al., 2023) with one shared KV cache.

A cycle starts with the pending token p at position m (every layer's cache holds positions < m):

1. draft: p, d_1, ..., d_k go through the first ``exit_layer`` blocks one at a time (their KV lands in
   those layers' cache); d_{i+1} = argmax of the final norm + head on block ``exit_layer - 1``'s output
   (the head restricted to ``draft_vocab`` when given: only the draft's quality depends on it);
2. verify: the k + 1 hidden states at ``exit_layer`` go through the remaining blocks in one forward (their
   KV lands in the late layers' cache) and the full head gives the full model's greedy token after each;
3. accept the longest prefix of drafts equal to the full model's tokens, plus the full model's next token
   (a correction or a bonus); crop the cache of every layer to the accepted length.

The early layers' computation for accepted tokens is exactly the full model's (same tokens, same
cache), so the output is the full model's greedy output; the only difference from plain decoding is
that the late layers process k + 1 positions in one matmul, which can change float rounding (a near-tie
can flip; the tests and the bench count equality). Batch 1 only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.adapters import Adapter
from compress.errors import CompressError
from compress.runtime.early_exit import _block_out, block_inputs, exit_modules


@dataclass
class SpecResult:
    tokens: torch.Tensor  # [1, prompt + new]
    new_tokens: int
    cycles: int
    drafted: int
    accepted: int
    accept_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """Accepted drafts / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_cycle(self) -> float:
        return self.new_tokens / self.cycles if self.cycles else 0.0


def _cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_kw(model: nn.Module) -> str:
    """The forward's name for the KV cache argument (``cache`` from transformers 5.25, before that
    ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def crop(cache, length: int) -> None:
    """Cut every layer of a DynamicCache to ``length`` positions (layers may hold different lengths here)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length if layer.is_initialized else 0
        if extra > 0:
            layer.crop(-extra)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Plain greedy decoding with a KV cache, one full forward per token (the reference and baseline)."""
    cache, ck = _cache(model), cache_kw(model)
    out = model(input_ids=input_ids, **{ck: cache}, use_cache=True)
    toks = [int(out.logits[0, -1].argmax())]
    while len(toks) < max_new_tokens and toks[-1] != eos_token_id:
        out = model(input_ids=torch.tensor([[toks[-1]]], device=input_ids.device), **{ck: cache}, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return torch.cat([input_ids, torch.tensor([toks], device=input_ids.device)], dim=1)


@torch.no_grad()
def speculative_generate(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, max_new_tokens: int,
                         exit_layer: int, k: int, draft_vocab: torch.Tensor | None = None,
                         eos_token_id: int | None = None) -> SpecResult:
    """Greedy decoding of ``max_new_tokens`` (or up to ``eos_token_id``), drafting ``k`` tokens per cycle
    with the first ``exit_layer`` blocks. Equals ``greedy_generate`` token for token (see module doc)."""
    blocks = adapter.blocks(model)
    n = len(blocks)
    if input_ids.shape[0] != 1:
        raise CompressError(f"exact early exit decodes one sequence at a time (batch {input_ids.shape[0]})")
    if not 0 < exit_layer < n:
        raise CompressError(f"exit_layer must be in 1..{n - 1} (got {exit_layer})")
    if k < 1:
        raise CompressError(f"k (draft tokens per cycle) must be >= 1 (got {k})")
    norm, head = exit_modules(model, adapter)
    dev = input_ids.device
    vocab = draft_vocab.to(dev) if draft_vocab is not None else None
    w_draft = head.weight[vocab] if vocab is not None else head.weight
    b_draft = getattr(head, "bias", None)
    if b_draft is not None and vocab is not None:
        b_draft = b_draft[vocab]

    def draft_token(h: torch.Tensor) -> int:
        logits = nn.functional.linear(norm(h[:, -1:]), w_draft, b_draft)
        j = int(logits[0, -1].argmax())
        return int(vocab[j]) if vocab is not None else j

    cache, ck = _cache(model), cache_kw(model)
    out = model(input_ids=input_ids, **{ck: cache}, use_cache=True)
    pending = int(out.logits[0, -1].argmax())
    new = [pending]
    m = input_ids.shape[1]
    res = SpecResult(tokens=input_ids, new_tokens=0, cycles=0, drafted=0, accepted=0)
    while len(new) < max_new_tokens and new[-1] != eos_token_id:
        kk = min(k, max_new_tokens - len(new))  # no drafting past the end
        pos = lambda a, b: torch.arange(a, b, device=dev)  # noqa: E731
        # the late layers' mask and positions for the k + 1 verified positions, built by the model while
        # every layer's cache still holds m positions
        _, verify_kw = block_inputs(model, adapter, torch.full((1, kk + 1), pending, device=dev),
                                    **{ck: cache}, use_cache=True, cache_position=pos(m, m + kk + 1))
        hs, drafts, tok = [], [], pending
        for i in range(kk + 1):
            h, kw = block_inputs(model, adapter, torch.tensor([[tok]], device=dev), **{ck: cache},
                                 use_cache=True, cache_position=pos(m + i, m + i + 1))
            for b in blocks[:exit_layer]:
                h = _block_out(b(h, **kw))
            hs.append(h)
            if i < kk:
                tok = draft_token(h)
                drafts.append(tok)
        h = torch.cat(hs, dim=1)
        for b in blocks[exit_layer:]:
            h = _block_out(b(h, **verify_kw))
        full = head(norm(h))[0].argmax(-1).tolist()
        j = 0
        while j < kk and drafts[j] == full[j]:
            j += 1
        accepted = drafts[:j] + [full[j]]
        if eos_token_id is not None and eos_token_id in accepted:
            accepted = accepted[:accepted.index(eos_token_id) + 1]
        new += accepted
        res.cycles += 1
        res.drafted += kk
        res.accepted += j
        res.accept_lengths.append(j)
        m += j + 1
        crop(cache, m)
        pending = full[j]
    new = new[:max_new_tokens]
    res.new_tokens = len(new)
    res.tokens = torch.cat([input_ids, torch.tensor([new], device=dev)], dim=1)
    return res
