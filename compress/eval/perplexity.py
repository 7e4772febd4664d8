"""Perplexity by the GPTQ/SparseGPT/Wanda protocol.

The test rows (lines of WikiText-2 raw test as the Hugging Face ``wikitext-2-raw-v1`` test split
holds them: blank lines as empty rows, text lines with their trailing newline) are joined with "\\n\\n" and tokenized once with the
tokenizer's defaults; the stream is cut into non-overlapping windows of ``seqlen`` tokens (the tail
shorter than a window is dropped); each window's mean next-token loss is weighted by ``seqlen`` as in
the reference code, and perplexity is exp(Σ window losses · seqlen / (windows · seqlen)).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.errors import CompressError

log = logging.getLogger(__name__)

WIKITEXT2_TEST = "../shared/assets/data/wikitext-2-raw/wiki.test.raw"


@dataclass
class PerplexityResult:
    perplexity: float
    dataset: str
    seqlen: int
    windows: int
    total_windows: int
    tokens_scored: int
    partial: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_path(dataset: str) -> Path:
    """``wikitext2`` means the shared WikiText-2 raw test file; anything else is a path."""
    p = Path(WIKITEXT2_TEST if dataset == "wikitext2" else dataset)
    if not p.is_file():
        hint = " (run from the repository root, next to ../shared/assets)" if dataset == "wikitext2" else ""
        raise CompressError(f"perplexity dataset not found: {p}{hint}")
    return p


def eval_text(dataset: str) -> str:
    lines = dataset_path(dataset).read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def window_losses(model, ids: torch.Tensor, seqlen: int, windows: int, device: torch.device,
                  desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token loss of each of the first ``windows`` non-overlapping windows."""
    losses = torch.empty(windows, dtype=torch.float64)
    for i in tqdm(range(windows), desc=desc):
        batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(batch, use_cache=False).logits[0, :-1].float()
        losses[i] = F.cross_entropy(logits, batch[0, 1:]).double().cpu()
    return losses


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
               device: torch.device | str | None = None, ids: torch.Tensor | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset``; ``max_windows`` scores only the first N windows."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t0 = time.perf_counter()
    if ids is None:
        ids = tokenize_stream(tokenizer, eval_text(dataset))
    total = ids.numel() // seqlen
    if total == 0:
        raise CompressError(f"perplexity: {dataset} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = total if max_windows is None else min(max_windows, total)
    losses = window_losses(model, ids, seqlen, n, device)
    ppl = math.exp(float(losses.mean()))
    res = PerplexityResult(perplexity=ppl, dataset=dataset, seqlen=seqlen, windows=n, total_windows=total,
                           tokens_scored=n * seqlen, partial=n < total, seconds=round(time.perf_counter() - t0, 2))
    log.info("perplexity %.4f on %s (%d/%d windows of %d)%s", ppl, dataset, n, total, seqlen,
             " [partial]" if res.partial else "")
    return res
