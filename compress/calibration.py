"""Calibration data: ``nsamples`` windows of ``seqlen`` tokens, deterministic given a seed.

Built once per run and shared by all passes. The text source is a local .txt/.jsonl file or a
``datasets`` name. Documents are joined with blank lines and tokenized once; windows start at random
offsets drawn from ``torch.Generator().manual_seed(seed)`` (the protocol the GPTQ reference uses for
its WikiText-2/C4 calibration). Calibrating on the evaluation text is refused unless forced.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError, ConfigError

log = logging.getLogger(__name__)

_TEXT_FIELDS = (("text",), ("prompt", "response"), ("query",), ("content",))


@dataclass
class CalibrationData:
    input_ids: torch.Tensor  # [nsamples, seqlen] int64
    source: str
    seed: int
    total_tokens: int  # tokens in the source stream the windows were drawn from

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "tokens": self.nsamples * self.seqlen, "source_tokens": self.total_tokens, "sha256": self.sha256}


def read_texts(dataset: str, text_field: str | None = None, split: str = "train", subset: str | None = None) -> list[str]:
    """Documents of a local .txt/.raw/.jsonl/.json file, or of a `datasets` name."""
    path = Path(dataset)
    if path.suffix in (".txt", ".raw", ".jsonl", ".json") or path.exists() or dataset.startswith((".", "/")):
        if not path.is_file():
            raise CompressError(f"calibration dataset not found: {path}")
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return [_row_text(r, text_field, path) for r in rows]
        return [path.read_text()]
    try:
        import datasets  # optional: only users with the hub need it
    except ImportError:
        raise CompressError(f"calibration dataset {dataset!r} is not a local file; to use a Hugging Face "
                            "dataset install the extra: pip install 'compress[datasets]'") from None
    ds = datasets.load_dataset(dataset, subset, split=split)
    return [_row_text(r, text_field, dataset) for r in ds]


def _row_text(row: dict, text_field: str | None, where) -> str:
    if text_field is not None:
        if text_field not in row:
            raise ConfigError(f"calibration.text_field: {text_field!r} not in {where} (fields: {', '.join(row)})")
        return str(row[text_field])
    for fields in _TEXT_FIELDS:
        if all(f in row for f in fields):
            return "".join(str(row[f]) for f in fields)
    raise ConfigError(f"calibration.text_field: cannot guess the text field of {where} (fields: {', '.join(row)}); set it")


def check_not_eval_text(texts: list[str], eval_texts: list[str], where: str) -> None:
    """Refuse calibration text that contains the evaluation text (or vice versa)."""
    joined = "\n\n".join(texts)
    for ev in eval_texts:
        probe = ev.strip()[:2000]
        if probe and (probe in joined or joined.strip()[:2000] in ev):
            raise ConfigError(
                f"calibration.dataset: {where} is the evaluation text; calibrating on it inflates every result. "
                "Use other text, or set calibration.allow_eval_overlap: true to force it.")


def build_calibration(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int = 0,
                      text_field: str | None = None, split: str = "train", subset: str | None = None,
                      eval_texts: list[str] | None = None, allow_eval_overlap: bool = False) -> CalibrationData:
    texts = read_texts(dataset, text_field, split, subset)
    if eval_texts and not allow_eval_overlap:
        check_not_eval_text(texts, eval_texts, dataset)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel()
    if n < seqlen + 1:
        raise ConfigError(f"calibration: {dataset} has {n} tokens, fewer than one window of seqlen {seqlen}")
    if n < nsamples * seqlen:
        log.warning("calibration: %s has %d tokens for %d windows of %d: windows overlap", dataset, n, nsamples, seqlen)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    data = CalibrationData(input_ids=windows, source=dataset, seed=seed, total_tokens=n)
    log.info("calibration: %d x %d tokens from %s (sha256 %s…)", nsamples, seqlen, dataset, data.sha256[:12])
    return data
