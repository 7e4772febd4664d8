"""Early exit at inference: the calibrated artifact, and the lossy (AdaInfer) forward that really stops.

Python::

    from compress.runtime.early_exit import EarlyExit
    ee = EarlyExit.load(ckpt)           # refuses an artifact whose weight hash differs from ckpt's weights
    handle = ee.install(model)          # model(input_ids).logits now exits early, per request
    ...; handle.stats.summary(); handle.remove()
    ids = ee.generate(model, prompt_ids, max_new_tokens=64)   # exact mode: self-speculative, greedy-equal

**lossy** mode is for loglikelihood scoring and single-token answers: a forward without a KV cache. Each
row (request) is checked at the probed layers on its scored positions (the continuation positions the
lm-eval bridge registers with ``handle.expect``; else the row's last real position); the row exits at
the first probe where the classifier's score reaches the threshold at every scored position. An exited
row leaves the batch: the remaining rows continue without it, so no row runs layers after its own exit
(batch > 1 shrinks, it is never run-and-masked). All positions of an exited row get logits from the
exit layer's hidden state through the final norm and head. Calls with a KV cache (generation) run the
full model unchanged: per-token lossy exit in free generation is not offered.

**exact** mode (``generate``, in ``compress.runtime.speculative``) drafts with the first E blocks and
verifies with the full model: greedy output equals the full model's.
"""
from __future__ import annotations

import hashlib
import json
import os
import types
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.adapters import Adapter, get_adapter, get_submodule
from compress.algos.early_exit import features_from_logits, linear_score
from compress.errors import CompressError, UnsupportedModelError

ARTIFACT_JSON = "early_exit.json"
#: a subfolder, so that readers of the checkpoint's top-level *.safetensors never take it for weights
ARTIFACT_TENSORS = "early_exit/classifier.safetensors"
FORMAT_VERSION = 1


class _Stop(Exception):
    pass


def weight_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 over the checkpoint's weight files (top-level ``*.safetensors``, name-sorted)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressError(f"{folder}: no *.safetensors weight files to hash for the early-exit artifact")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def exit_modules(model: nn.Module, adapter: Adapter) -> tuple[nn.Module, nn.Module]:
    """(final norm, LM head) from the adapter; errors name what is missing."""
    if adapter.final_norm is None or adapter.lm_head is None:
        raise UnsupportedModelError(
            f"early_exit: the adapter of model_type {adapter.model_type!r} names no final norm / LM head "
            "(Adapter.final_norm, Adapter.lm_head in compress/adapters.py), so intermediate layers cannot be read out")
    norm, head = get_submodule(model, adapter.final_norm), get_submodule(model, adapter.lm_head)
    hidden = model.config.hidden_size
    if getattr(head, "in_features", hidden) != hidden:
        raise UnsupportedModelError(f"early_exit: {adapter.lm_head} reads width {head.in_features}, not the blocks' "
                                    f"hidden size {hidden} (a projection sits between them); not supported")
    return norm, head


@dataclass
class EarlyExit:
    """A calibrated early-exit policy for one checkpoint (what ``early_exit.json`` holds)."""

    features: list[str]
    classifier: str
    probes: list[int]  # block indices (0-based) whose outputs are checked, ascending
    threshold: float
    weight: torch.Tensor  # [F] classifier weight with feature scaling folded in
    bias: float
    num_layers: int
    hidden_size: int
    vocab_size: int
    target_agreement: float
    calibration: dict[str, Any] = field(default_factory=dict)  # hash, sizes, achieved agreement and bound
    exact: dict[str, Any] = field(default_factory=dict)  # exit_layer, k, acceptance estimate
    draft_vocab: torch.Tensor | None = None  # token ids the draft head scores (None: all)
    weight_hash: str | None = None

    # --- artifact ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("weight", "draft_vocab")}
        d["format_version"] = FORMAT_VERSION
        d["tensors"] = ARTIFACT_TENSORS
        return d

    def save(self, folder: str | os.PathLike[str]) -> list[str]:
        """Write ``early_exit.json`` + ``early_exit/classifier.safetensors`` into a checkpoint folder (atomically per
        file), stamped with the hash of the weights there. Returns warnings (none)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.weight_hash = weight_hash(folder)
        tensors = {"weight": self.weight.float().contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float32)}
        if self.draft_vocab is not None:
            tensors["draft_vocab"] = self.draft_vocab.to(torch.int64).contiguous()
        (folder / ARTIFACT_TENSORS).parent.mkdir(exist_ok=True)
        tmp = folder / (ARTIFACT_TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / ARTIFACT_TENSORS)
        tmp = folder / (ARTIFACT_JSON + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, folder / ARTIFACT_JSON)
        return []

    @classmethod
    def load(cls, folder: str | os.PathLike[str], check_hash: bool = True) -> EarlyExit:
        """Read the artifact beside a checkpoint; refuses one whose weight hash is not this checkpoint's."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / ARTIFACT_JSON
        if not path.is_file():
            raise CompressError(f"{folder}: no {ARTIFACT_JSON} (run a recipe with an early_exit pass)")
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise CompressError(f"{path}: format_version {d.get('format_version')!r}, this version reads {FORMAT_VERSION}")
        if check_hash:
            actual = weight_hash(folder)
            if d.get("weight_hash") != actual:
                raise CompressError(f"{path}: the artifact was calibrated for other weights (weight_hash "
                                    f"{str(d.get('weight_hash'))[:12]}…, this checkpoint {actual[:12]}…); calibrate again")
        t = load_file(str(folder / d["tensors"]))
        d = {k: v for k, v in d.items() if k not in ("format_version", "tensors", "bias")}  # bias: the tensor file
        return cls(**d, weight=t["weight"], bias=float(t["bias"][0]), draft_vocab=t.get("draft_vocab"))

    # --- inference ------------------------------------------------------------------------
    def check_model(self, model: nn.Module, adapter: Adapter) -> None:
        n = adapter.num_blocks(model)
        cfg = model.config
        seen = (n, cfg.hidden_size, cfg.vocab_size)
        if seen != (self.num_layers, self.hidden_size, self.vocab_size):
            raise CompressError(f"early exit calibrated for (layers, hidden, vocab) = {(self.num_layers, self.hidden_size, self.vocab_size)}, "
                                f"model has {seen}")

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        feats, _ = features_from_logits(logits, self.features)
        return linear_score(feats, self.weight.to(logits.device), torch.tensor(self.bias, device=logits.device))

    def install(self, model: nn.Module, mode: str = "lossy") -> Installed:
        """Make ``model(input_ids)`` exit early (lossy mode). Returns a handle: ``.stats``, ``.expect``,
        ``.remove()`` (also a context manager). Exact mode is ``generate``; it needs no install."""
        if mode != "lossy":
            raise CompressError(f"install: mode {mode!r}; only 'lossy' patches the forward (exact mode: ee.generate)")
        adapter = get_adapter(model)
        self.check_model(model, adapter)
        exit_modules(model, adapter)
        return Installed(self, model, adapter)

    def generate(self, model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 exit_layer: int | None = None, k: int | None = None, eos_token_id: int | None = None):
        """Exact mode: greedy self-speculative decoding (see ``compress.runtime.speculative``)."""
        from compress.runtime.speculative import speculative_generate

        adapter = get_adapter(model)
        self.check_model(model, adapter)
        return speculative_generate(model, adapter, input_ids, max_new_tokens,
                                    exit_layer if exit_layer is not None else self.exact["exit_layer"],
                                    k if k is not None else self.exact["k"], self.draft_vocab, eos_token_id)


@dataclass
class ExitStats:
    """Per scored row: executed blocks, checks made, checked positions, tokens."""

    executed: list[int] = field(default_factory=list)
    checks: list[int] = field(default_factory=list)
    checked_positions: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def reset(self) -> None:
        for v in (self.executed, self.checks, self.checked_positions, self.tokens):
            v.clear()

    def summary(self, num_layers: int, block_flops: float | None = None, head_flops: float | None = None) -> dict[str, Any]:
        from compress.algos.early_exit import scoring_flops

        n = len(self.executed)
        out: dict[str, Any] = {"rows": n, "num_layers": num_layers}
        if not n:
            return out
        mean = sum(self.executed) / n
        out.update(mean_layers=mean, layers_saved=1 - mean / num_layers,
                   histogram={int(k): v for k, v in sorted(Counter(self.executed).items())},
                   mean_checks=sum(self.checks) / n)
        if block_flops is not None and head_flops is not None:
            ee = sum(scoring_flops(block_flops, head_flops, t, e, c, p) for t, e, c, p in
                     zip(self.tokens, self.executed, self.checks, self.checked_positions))
            full = sum(scoring_flops(block_flops, head_flops, t, num_layers, 0, 0) for t in self.tokens)
            out.update(flops=ee, flops_full=full, flops_ratio=ee / full,
                       check_flops=sum(c * p * head_flops for c, p in zip(self.checks, self.checked_positions)))
        return out


class Installed:
    """The patched forward of one model; ``remove()`` restores it."""

    def __init__(self, ee: EarlyExit, model: nn.Module, adapter: Adapter):
        self.ee, self.model, self.adapter = ee, model, adapter
        self.stats = ExitStats()
        self._expected: dict[tuple[int, ...], int] = {}
        self._had_forward = "forward" in model.__dict__
        self._old = model.__dict__.get("forward")
        model.forward = types.MethodType(_make_forward(self, type(model).forward), model)

    def expect(self, tokens: list[int], n_scored: int) -> None:
        """Register that a row with exactly these input tokens is scored on its last ``n_scored`` positions."""
        self._expected[tuple(tokens)] = n_scored

    def scored_positions(self, row: torch.Tensor, mask_row: torch.Tensor | None) -> list[int]:
        """Positions to check for one row: a registered request (right padding stripped), else the last real one."""
        toks = row.tolist()
        length = int(mask_row.sum()) if mask_row is not None else len(toks)
        if self._expected:
            end = len(toks)
            while end > 0:
                n = self._expected.get(tuple(toks[:end]))
                if n is not None:
                    return list(range(end - n, end))
                if toks[end - 1] != 0:  # lm-eval pads with 0 on the right; a real token ends the search
                    break
                end -= 1
        return [length - 1]

    def remove(self) -> None:
        if self._had_forward:
            self.model.forward = self._old
        else:
            del self.model.forward

    def __enter__(self) -> Installed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _make_forward(inst: Installed, full_forward):
    def forward(model, input_ids=None, attention_mask=None, **kw):
        if kw.get("past_key_values") is not None or kw.get("cache") is not None or kw.get("inputs_embeds") is not None \
                or kw.get("labels") is not None or input_ids is None:
            return full_forward(model, input_ids=input_ids, attention_mask=attention_mask, **kw)
        return lossy_forward(inst, model, input_ids, attention_mask)
    return forward


def block_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, **model_kw: Any) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first block (embeddings, positions, mask) and return block 0's input and
    keyword arguments, as the model itself builds them."""
    seen: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = adapter.blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        type(model).forward(model, input_ids=input_ids, **model_kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "h" not in seen:
        raise CompressError("early exit: the model did not call its first decoder block")
    return seen["h"], seen["kw"]


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def select_rows(value: Any, keep: torch.Tensor, batch: int) -> Any:
    """Keep the rows ``keep`` of every batch-major tensor (2-D or more, first dim == batch) in block kwargs;
    1-D tensors (cache positions) and broadcast tensors (first dim 1) are shared by all rows."""
    if isinstance(value, torch.Tensor):
        return value[keep] if value.dim() >= 2 and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, tuple):
        return tuple(select_rows(v, keep, batch) for v in value)
    if isinstance(value, list):
        return [select_rows(v, keep, batch) for v in value]
    return value


@torch.no_grad()
def lossy_forward(inst: Installed, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    ee, adapter = inst.ee, inst.adapter
    norm, head = exit_modules(model, adapter)
    blocks = adapter.blocks(model)
    n_layers = len(blocks)
    h, kw = block_inputs(model, adapter, input_ids, attention_mask=attention_mask, use_cache=False)
    B, T = input_ids.shape
    positions = [inst.scored_positions(input_ids[r], None if attention_mask is None else attention_mask[r]) for r in range(B)]
    active = torch.arange(B, device=h.device)
    out = torch.empty_like(h)
    executed = [n_layers] * B
    checks = [0] * B
    probes = set(p for p in ee.probes if p < n_layers - 1)
    for i, block in enumerate(blocks):
        h = _block_out(block(h, **kw))
        if i not in probes:
            continue
        rows = active.tolist()
        idx_r = torch.tensor([j for j, r in enumerate(rows) for _ in positions[r]], device=h.device)
        idx_p = torch.tensor([p for r in rows for p in positions[r]], device=h.device)
        s = ee.score(head(norm(h[idx_r, idx_p])))
        fire = torch.ones(len(rows), dtype=torch.bool, device=h.device)
        fire.scatter_reduce_(0, idx_r, s >= ee.threshold, reduce="amin")  # every scored position must pass
        for r in rows:
            checks[r] += 1
        if not bool(fire.any()):
            continue
        for j in fire.nonzero().flatten().tolist():
            executed[rows[j]] = i + 1
        out[active[fire]] = h[fire]
        keep = ~fire
        batch = len(rows)
        h, active = h[keep], active[keep]
        kw = {k: select_rows(v, keep, batch) for k, v in kw.items()}
        if not len(active):
            break
    if len(active):
        out[active] = h
    logits = head(norm(out))
    st = inst.stats
    st.executed += executed
    st.checks += checks
    st.checked_positions += [len(p) for p in positions]
    st.tokens += [int(attention_mask[r].sum()) if attention_mask is not None else T for r in range(B)]
    return CausalLMOutputWithPast(logits=logits)


def flops_per_token(model: nn.Module, adapter: Adapter, seq_len: int) -> tuple[float, float]:
    """(one block, the head) forward FLOPs per token: 2 x linear weights, plus attention's QK^T and AV at
    the mean causal length ``seq_len / 2`` (norms and activations are a few per mille and left out)."""
    block = adapter.blocks(model)[0]
    lin = sum(m.in_features * m.out_features for m in adapter.block_linears(block).values())
    geo = adapter.geometry(model.config)
    attn = 2 * 2 * geo["num_heads"] * geo["head_dim"] * (seq_len / 2)
    _, head = exit_modules(model, adapter)
    return 2.0 * lin + attn, 2.0 * head.in_features * head.out_features
