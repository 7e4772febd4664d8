"""The Pass protocol and the strict config base every pass config derives from.

A pass is ``PassClass(config).apply(model, ctx) -> PassReport``. Its config is a pydantic model that
forbids unknown keys and checks types strictly, so a recipe typo fails at load time, before any model
is loaded, with an error naming the field (see ``compress.recipe``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol, get_args, get_origin, runtime_checkable

from pydantic import BaseModel, ConfigDict
from torch import nn

from compress.context import PassContext, PassReport


class StrictModel(BaseModel):
    """Base for every config in compress: unknown keys and wrong types are errors, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


class PassConfig(StrictModel):
    """Base of pass configs."""


@runtime_checkable
class Pass(Protocol):
    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]
    #: what the pass does to weights: "quantize", "prune", "allocate", "structure", "finetune"
    kind: ClassVar[str]

    def __init__(self, config: PassConfig) -> None: ...

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport: ...


def describe_config(cls: type[PassConfig]) -> list[dict[str, Any]]:
    """Options of a config class with types, defaults and descriptions (for `compress passes`)."""
    rows = []
    for fname, field in cls.model_fields.items():
        tname = _type_name(field.annotation)
        rows.append({
            "name": fname,
            "type": tname,
            "default": None if field.is_required() else field.get_default(call_default_factory=True),
            "required": field.is_required(),
            "description": field.description or "",
        })
    return rows


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if args:
        inner = ", ".join(_type_name(a) for a in args)
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{inner}]" if name not in ("Union", "UnionType") else " | ".join(_type_name(a) for a in args)
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
