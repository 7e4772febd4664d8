"""Losses and the learning-rate schedule of fine-tuning a pruned model (pure tensor functions).

- Knowledge distillation (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
  arXiv:1503.02531): ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per token, averaged over tokens. The T²
  keeps the gradient scale independent of the temperature.
- Top-k KD, for a teacher cached on disk: the teacher keeps only its k largest logits per token, so its
  distribution is renormalized over those k entries and the KL is taken on that support against the
  student's full-vocabulary log-probabilities. With k = vocabulary size it equals ``kd_loss`` exactly.
- Causal-LM cross-entropy on the data (next-token prediction), and their weighted mix.
- Hidden-state matching per block (as in Sheared-LLaMA / MiniLLM-style layer distillation): the squared
  error normalized by the teacher's energy, ``Σ(s-t)² / Σt²`` per block, averaged over blocks. The
  normalization makes ``hidden_weight`` independent of the hidden-state scale, which varies by orders of
  magnitude between blocks of real LLMs.
- Linear warm-up then cosine decay to zero (Loshchilov & Hutter, "SGDR", arXiv:1608.03983).

Recipe snippet (the pass built on these functions)::

    - sparse_finetune: {loss: kd, temperature: 2.0, steps: 200, lr: 1.0e-4}
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · mean over tokens of KL(softmax(t/T) ‖ softmax(s/T))``; logits ``[..., vocab]``, computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(_flat(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_flat(teacher_logits) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


def topk_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per token as (float16 values, int32 indices), each ``[..., k]``: a disk cache entry."""
    if not 0 < k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    vals, idx = logits.float().topk(k, dim=-1)
    return vals.to(torch.float16), idx.to(torch.int32)


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KD against a teacher known only on its top-k support (see module docstring).

    ``student_logits [..., vocab]``; ``teacher_values``/``teacher_indices`` ``[..., k]`` (from ``topk_logits``).
    """
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k {tuple(teacher_values.shape)}/{tuple(teacher_indices.shape)} does not "
                         f"match student logits {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(_flat(student_logits) / temperature, dim=-1)
    log_s = log_s.gather(-1, teacher_indices.reshape(log_s.shape[0], -1).long())
    log_t = F.log_softmax(_flat(teacher_values) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position i predicts token i+1 (``logits [B, L, V]``, ``input_ids [B, L]``)."""
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    return F.cross_entropy(_flat(logits[:, :-1]), input_ids[:, 1:].reshape(-1))


def mix_loss(ce: torch.Tensor, kd: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """``(1 - kd_weight) · ce + kd_weight · kd``."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    return (1.0 - kd_weight) * ce + kd_weight * kd


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ``Σ(s - t)² / Σt²`` (normalized squared error of each block's output)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of student and teacher hidden states, got "
                         f"{len(student)} and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"hidden states differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
        t = t.float()
        terms.append((s.float() - t).square().sum() / t.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``: linear warm-up, then cosine decay to 0.

    Warm-up steps 0..w-1 get (step+1)/w; the remaining steps follow 0.5·(1 + cos(π·p)) with
    p = (step - w) / (total - w), so the first post-warm-up step runs at the peak and the last one just above 0.
    """
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps or not 0 <= step < total_steps:
        raise ValueError(f"need 0 <= step < total_steps and 0 <= warmup_steps <= total_steps, got step {step}, "
                         f"total {total_steps}, warmup {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
