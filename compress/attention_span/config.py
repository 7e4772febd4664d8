"""The span policy's settings: one validated object for the recipe pass, ``compress eval --span``,
``compress bench --span`` and the settings file saved beside a checkpoint.

Recipe snippet::

    passes:
      - attention_span: {policy: quest, block_size: 64, budget_tokens: 1024, sink_tokens: 4, recent_tokens: 256}
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, model_validator

from compress.attention_span.policies import forced_block_count
from compress.errors import ConfigError
from compress.passes.base import PassConfig

POLICIES = ("quest", "window", "snapkv", "trained")
#: the training-free policies (``trained`` needs a model fine-tuned to emit span references)
TRAINING_FREE = ("quest", "window", "snapkv")


class SpanSpec(PassConfig):
    policy: Literal["quest", "window", "snapkv", "trained"] = Field(
        description="quest: query-aware top-k blocks from per-block key min/max; window: sinks + the newest "
                    "blocks; snapkv: prompt blocks voted by the prompt's last queries at prefill; trained: spans "
                    "the model names itself (needs a model fine-tuned with span tokens)")
    block_size: int = Field(64, gt=0, description="KV positions per block (a power of two)")
    budget_tokens: int = Field(1024, gt=0, description="KV positions read per decode step, per layer and KV head "
                                                       "(a multiple of block_size)")
    sink_tokens: int = Field(4, ge=0, description="first positions always kept (attention sinks)")
    recent_tokens: int = Field(256, ge=0, description="last positions always kept")
    observation_window: int = Field(32, gt=0, description="snapkv: prompt-end queries whose attention votes")
    pool_kernel: int = Field(7, gt=0, description="snapkv: positions averaged when pooling the votes (odd)")

    @model_validator(mode="after")
    def _check(self) -> "SpanSpec":
        bs, budget = self.block_size, self.budget_tokens
        if bs & (bs - 1):
            raise ValueError(f"block_size: {bs} is not a power of two")
        if bs > budget:
            raise ValueError(f"block_size: {bs} is larger than budget_tokens {budget}")
        if budget % bs:
            raise ValueError(f"budget_tokens: {budget} is not a multiple of block_size {bs}")
        if budget < self.sink_tokens + self.recent_tokens:
            raise ValueError(f"budget_tokens: {budget} is smaller than sink_tokens + recent_tokens "
                             f"({self.sink_tokens} + {self.recent_tokens})")
        need = forced_block_count(bs, self.sink_tokens, self.recent_tokens) * bs
        if budget < need:
            raise ValueError(f"budget_tokens: {budget} cannot hold the sinks and the recent window in whole blocks "
                             f"of {bs} (up to {need} positions: sink blocks + recent blocks + the block the window "
                             "straddles); raise budget_tokens or lower recent_tokens")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel: {self.pool_kernel} is not odd")
        return self

    @property
    def max_blocks(self) -> int:
        return self.budget_tokens // self.block_size

    def label(self) -> str:
        return f"{self.policy} {self.budget_tokens}/{self.block_size}"


def parse_span(text: str) -> SpanSpec:
    """``--span`` on the command line: ``quest`` or ``policy=quest,budget_tokens=512,block_size=64``
    (a bare first item is the policy)."""
    fields: dict[str, object] = {}
    for i, item in enumerate(p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        if not sep:
            if i:
                raise ConfigError(f"--span {text!r}: {item!r} is not KEY=VALUE")
            key, value = "policy", item
        key = key.strip()
        if key not in SpanSpec.model_fields:
            raise ConfigError(f"--span: unknown key {key!r} (allowed: {', '.join(SpanSpec.model_fields)})")
        value = value.strip()
        fields[key] = value if key == "policy" else _int(key, value)
    return spec_from_dict(fields, where="--span")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--span: {key} must be an integer, got {value!r}") from None


def spec_from_dict(raw: dict, where: str = "attention_span") -> SpanSpec:
    """A SpanSpec from a mapping; errors name the field."""
    try:
        return SpanSpec(**raw)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key (allowed: {', '.join(SpanSpec.model_fields)})"
            parts.append(f"{where}.{loc}: {msg}" if loc else f"{where}.{msg}")
        raise ConfigError("; ".join(parts)) from None
