"""Set-up and output shared by the perplexity benchmarks (quant_bench, structure_bench, finetune_bench).

The scripts put the repository root on ``sys.path`` and then ``import bench_common`` (this folder is
the script's own, so it is importable as a top-level module)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from compress.calibration import build_calibration
from compress.eval.perplexity import eval_text, tokenize_stream
from compress.modeling import load_model


@dataclass
class BenchInputs:
    model: torch.nn.Module
    tokenizer: Any
    text: str  # the evaluation text
    ids: torch.Tensor  # the evaluation text, tokenized once for every perplexity of the run
    calibration: Any  # compress.calibration batches, drawn once, never from the evaluation text


def load_inputs(model: str, device: str, eval_name: str, calibration: str, nsamples: int,
                calib_seqlen: int) -> BenchInputs:
    """The model, its tokenizer, the tokenized evaluation text and the calibration batches."""
    loaded = load_model(model, device=device)
    tok = loaded.tokenizer
    text = eval_text(eval_name)
    calib = build_calibration(tok, calibration, nsamples, calib_seqlen, seed=0, eval_texts=[text])
    return BenchInputs(loaded.model, tok, text, tokenize_stream(tok, text), calib)


def write_results(path: str | None, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The run's JSON ({"meta", "rows"}) at ``path`` when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
