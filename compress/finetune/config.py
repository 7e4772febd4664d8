"""The options of the ``sparse_finetune`` pass (``SparseFinetuneConfig``), shared by the pass and the training loop.

They live in the finetune package so that ``compress.finetune.trainer`` can read them without importing the pass
module, which itself imports the trainer.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.passes.base import PassConfig, StrictModel

DEFAULT_DATASET = "../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl"


class LoraSpec(StrictModel):
    rank: int = Field(16, gt=0, description="LoRA rank r of each adapter")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is (alpha / rank) · B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input during training")
    targets: list[str] | None = Field(None, description="decoder-block linears that get adapters (names, suffixes, "
                                      "globs or re:REGEX); null: those chosen by `modules` (all by default)")


class SparseFinetuneConfig(PassConfig):
    dataset: str = Field(DEFAULT_DATASET, description="training text: local .txt/.jsonl file or a `datasets` name "
                         "(must not be the evaluation text)")
    text_field: str | None = Field(None, description="jsonl/datasets field holding text (auto: text, prompt+response, query)")
    split: str = Field("train", description="split, for a `datasets` name")
    subset: str | None = Field(None, description="configuration name, for a `datasets` name")
    steps: int = Field(200, gt=0, description="optimizer steps")
    lr: float = Field(1.0e-4, gt=0, description="peak learning rate of AdamW (write 1.0e-4: YAML reads 1e-4 as text)")
    loss: Literal["ce", "kd", "mix"] = Field("kd", description="ce: next-token cross-entropy on the data; kd: "
                                             "distillation from the uncompressed model; mix: (1-kd_weight)·ce + kd_weight·kd")
    kd_weight: float | None = Field(None, ge=0.0, le=1.0, description="weight of kd in loss: mix (required there, "
                                    "refused with ce or kd)")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (loss scaled by T²)")
    seqlen: int = Field(512, ge=2, description="tokens per training window")
    batch_size: int = Field(4, gt=0, description="windows per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of steps of linear warm-up before the cosine decay to 0")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay on the trained matrices")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    modules: list[str] | None = Field(None, description="decoder-block linears to train (names, suffixes, globs or "
                                      "re:REGEX); null: all of them. Embeddings and lm_head stay frozen")
    train_norms: bool = Field(False, description="also train the 1-D norm parameters inside the decoder blocks")
    lora: LoraSpec | None = Field(None, description="null: full fine-tuning; {rank, alpha, dropout, targets}: LoRA "
                                  "adapters (peft), merged back at the end and re-masked")
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of per-block hidden-state matching "
                                 "(normalized squared error vs the teacher); 0 = off; needs teacher_cache: off")
    teacher_cache: Literal["off", "disk"] = Field("off", description="off: run the teacher on every batch; disk: "
                                                  "cache its top-k logits (float16 + int32 indices) before training")
    teacher_topk: int = Field(64, gt=0, description="logits kept per token by the disk cache; KD is taken on that support")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward (less memory, ~30% slower)")
    checkpoint_every: int = Field(50, ge=0, description="write a training checkpoint every N steps for --resume (0: never)")
    log_every: int = Field(10, gt=0, description="log the loss every N steps")
    allow_eval_overlap: bool = Field(False, description="permit training on the evaluation text (inflates results)")
    autocast: Literal["none", "bf16"] = Field("none", description="bf16 autocast of forward passes (GPU speed; "
                                              "float32 master weights)")
    seed: int | None = Field(None, ge=0, description="seed of window sampling, LoRA init and dropout; null: the run's seed")

    @field_validator("lr", "temperature", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError(f"must be a number, got the text {v!r} (YAML reads 1e-4 as text; write 1.0e-4)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SparseFinetuneConfig":
        if self.loss == "mix" and self.kd_weight is None:
            raise ValueError("kd_weight is required with loss: mix (a number in [0, 1])")
        if self.loss != "mix" and self.kd_weight is not None:
            raise ValueError(f"kd_weight is only used with loss: mix; drop it or set loss: mix (loss is {self.loss})")
        if self.teacher_cache == "disk" and self.loss == "ce":
            raise ValueError("teacher_cache: disk caches the teacher for loss kd or mix; with loss: ce there is no teacher")
        if self.teacher_cache == "disk" and self.hidden_weight > 0:
            raise ValueError("hidden_weight > 0 needs the teacher's hidden states, which the disk cache does not keep; "
                             "use teacher_cache: off")
        if self.modules is not None and not self.modules:
            raise ValueError("modules: an empty list trains nothing; give patterns or null for all")
        if self.lora is not None and self.lora.targets is not None and self.modules is not None:
            raise ValueError("modules and lora.targets both choose layers; set only one")
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "ce" or self.hidden_weight > 0
