"""Synthetic passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a five-digit key
hidden at some depth of filler text, asked for at the end. Generated in code, no download.

One sample is exactly ``length`` tokens of prompt (filler repeated around the needle, the question
last). The prompt up to and including the question is prefilled densely; the answer prefix ("The
pass key is") and the answer are decoded one token at a time, so every answer token is produced by
a decode step under the span policy. Correct: the first number in the greedy continuation equals
the key. All policies decode from the same prefill (its statistics recorded for all of them) and a
copy of its cache, and the dense model decodes from it too, so the comparison is exact.

Example::

    res = passkey_accuracy(model, tok, [None, SpanSpec(policy="quest", budget_tokens=1024)], [2048, 4096], trials=4)
"""
from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from compress.attention_span.config import SpanSpec
from compress.errors import CompressError

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = " The pass key is"


@dataclass
class PasskeySample:
    prompt: torch.Tensor  # [1, n] ids, prefilled
    answer_prefix: torch.Tensor  # [1, m] ids, decoded under the policy before the answer
    key: str
    depth: float
    needle_at: int  # token position of the needle


def make_sample(tokenizer, length: int, depth: float, seed: int) -> PasskeySample:
    """A prompt of ``length`` tokens (prompt + answer prefix) with the needle at ``depth`` (0 = start
    of the filler, 1 = its end)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    intro, needle, question, answer = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(ANSWER_PREFIX)
    filler = enc(FILLER)
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < len(filler):
        raise CompressError(f"passkey: length {length} is too short for the prompt (needs > "
                            f"{length - room + len(filler)} tokens)")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = int(round(depth * room))
    ids = intro + hay[:cut] + needle + hay[cut:] + question
    return PasskeySample(torch.tensor([ids]), torch.tensor([answer]), key, depth, len(intro) + cut)


@torch.no_grad()
def _continue(model, cache, prefix: torch.Tensor, new_tokens: int) -> list[int]:
    """Decode ``prefix`` (teacher-forced) then ``new_tokens`` greedy tokens, one at a time."""
    out: list[int] = []
    nxt = None
    for t in range(prefix.shape[1] + new_tokens):
        tok = prefix[:, t:t + 1] if t < prefix.shape[1] else nxt
        logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        if t >= prefix.shape[1] - 1:
            out.append(int(nxt))
    return out[:new_tokens]


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def passkey_accuracy(model, tokenizer, specs: list[SpanSpec | None], lengths: list[int], trials: int = 4,
                     seed: int = 0, new_tokens: int = 8) -> dict:
    """Accuracy per policy label and length. ``specs``: None is dense attention. Depths are spread
    evenly over ``trials`` (trial i at depth (i + 0.5) / trials). Specs must share block_size,
    observation_window and pool_kernel (one prefill serves all)."""
    from transformers import DynamicCache

    from compress.attention_span.install import install, set_state, uninstall

    spans = [s for s in specs if s is not None]
    base = spans[0] if spans else None
    labels = ["dense" if s is None else s.label() for s in specs]
    correct = {lab: {n: 0 for n in lengths} for lab in labels}
    read = {lab: {n: [] for n in lengths} for lab in labels}
    examples = []
    prev = getattr(model.config, "_attn_implementation", "sdpa")
    state = install(model, base) if base is not None else None
    if state is not None:
        state.record_all = True
    try:
        device = next(model.parameters()).device
        bar = tqdm(total=len(lengths) * trials, desc="passkey")
        for n in lengths:
            for i in range(trials):
                sample = make_sample(tokenizer, n, (i + 0.5) / trials, seed * 1000 + n + i)
                if state is not None:
                    state.reset()
                cache = DynamicCache()
                with torch.no_grad():
                    model(sample.prompt.to(device), past_key_values=cache, use_cache=True)
                for spec, lab in zip(specs, labels):
                    st = None if spec is None else state.with_spec(spec)
                    if state is not None:
                        set_state(model, st)
                    toks = _continue(model, copy.deepcopy(cache), sample.answer_prefix.to(device), new_tokens)
                    text = tokenizer.decode(toks)
                    ok = first_number(text) == sample.key
                    correct[lab][n] += ok
                    read[lab][n].append(1.0 if st is None else st.read_fraction)
                    examples.append({"policy": lab, "length": n, "depth": sample.depth, "key": sample.key,
                                     "output": text, "correct": ok})
                if state is not None:
                    set_state(model, state)
                bar.update(1)
        bar.close()
    finally:
        if state is not None:
            uninstall(model)
            model.config._attn_implementation = prev
    return {"trials": trials, "lengths": lengths,
            "accuracy": {lab: {str(n): correct[lab][n] / trials for n in lengths} for lab in labels},
            "kv_read_fraction": {lab: {str(n): sum(r) / len(r) for n, r in read[lab].items()} for lab in labels},
            "examples": examples}
