"""Training windows for fine-tuning: deterministic, so step k sees the same batch in every run with a seed.

The text is read with the calibration reader (``compress.calibration.read_texts``: local .txt/.jsonl or a
``datasets`` name), documents joined with blank lines and tokenized once. All window start offsets of the
run are drawn up front from ``torch.Generator().manual_seed(seed)``; micro-batch m of step k takes the
slice ``[(k·grad_accum + m)·batch_size, …+batch_size)``. A resumed run therefore continues with exactly
the batches the interrupted one would have seen.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from compress.calibration import check_not_eval_text, read_texts
from compress.errors import CompressError, ConfigError

log = logging.getLogger(__name__)


def read_training_text(dataset: str, text_field: str | None, split: str, subset: str | None,
                       eval_texts: list[str], allow_eval_overlap: bool, where: str) -> str:
    """The training documents joined by blank lines; refuses the run's evaluation text unless allowed.

    ``where`` names the pass in messages (e.g. ``sparse_finetune``): the calibration reader's messages
    speak of ``calibration.*`` and are re-worded to the pass's own fields.
    """
    try:
        texts = read_texts(dataset, text_field, split, subset)
    except CompressError as e:
        msg = (str(e).replace("calibration dataset not found:", f"{where}.dataset: file not found:")
               .replace("calibration dataset", f"{where}.dataset:").replace("calibration.", f"{where}."))
        raise type(e)(msg) from None
    if eval_texts and not allow_eval_overlap:
        try:
            check_not_eval_text(texts, eval_texts, dataset)
        except ConfigError:
            raise ConfigError(f"{where}.dataset: {dataset} contains the evaluation text; fine-tuning on it inflates "
                              f"every result. Use other text, or set {where}.allow_eval_overlap: true to force it.") from None
    return "\n\n".join(texts)


@dataclass
class Windows:
    """``count`` windows of ``seqlen`` tokens cut from ``ids`` at seeded random offsets."""

    ids: torch.Tensor  # [n] int64, the whole tokenized training text
    starts: torch.Tensor  # [count] int64
    seqlen: int
    batch_size: int
    grad_accum: int

    @classmethod
    def build(cls, ids: torch.Tensor, seqlen: int, batch_size: int, grad_accum: int, steps: int, seed: int,
              where: str = "sparse_finetune") -> "Windows":
        n = ids.numel()
        if n < seqlen + 1:
            raise ConfigError(f"{where}.seqlen: the training text has {n} tokens, fewer than one window of {seqlen}")
        count = steps * grad_accum * batch_size
        if count * seqlen > n:
            log.info("%s: %d windows of %d tokens from %d tokens of text: windows overlap (%.1f passes over the text)",
                     where, count, seqlen, n, count * seqlen / n)
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, n - seqlen + 1, (count,), generator=gen)
        return cls(ids=ids, starts=starts, seqlen=seqlen, batch_size=batch_size, grad_accum=grad_accum)

    def batch(self, step: int, micro: int) -> torch.Tensor:
        """``[batch_size, seqlen]`` token ids of micro-batch ``micro`` of ``step``."""
        i = (step * self.grad_accum + micro) * self.batch_size
        return torch.stack([self.ids[s : s + self.seqlen] for s in self.starts[i : i + self.batch_size].tolist()])

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seqlen

    @property
    def fingerprint(self) -> str:
        """sha256 of the text's token ids and the window offsets: a cache or checkpoint made for other windows is stale."""
        h = hashlib.sha256(self.ids.numpy().tobytes())
        h.update(self.starts.numpy().tobytes())
        h.update(f"{self.seqlen},{self.batch_size},{self.grad_accum}".encode())
        return h.hexdigest()
