"""Prompt helpers for the local task YAMLs beside this file (loaded by lm-eval's `!function`).

The local data is MosaicML llm-foundry's evaluation format (`{"query", "choices", "gold"}`), whose
queries were built from the original fields in a task-specific way. Each helper turns such a row
back into exactly the prompt that lm-eval's standard task builds from the Hugging Face row, so our
numbers are comparable with published lm-eval numbers. The lm-eval template each one mirrors is
quoted in its docstring; tests/test_tasks.py checks them against the installed lm-eval's YAMLs.

A row that does not have the expected shape raises ValueError: a silently different prompt would
change the score without anyone noticing.
"""

from __future__ import annotations

from typing import Any

_PIQA_PREFIX = "Question: "
_BOOLQ_PREFIX = "Passage: "


def piqa_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval piqa: ``"Question: {{goal}}\\nAnswer:"``; local query is ``"Question: {goal}\\n"``."""
    query = doc["query"]
    if not (query.startswith(_PIQA_PREFIX) and query.endswith("\n")):
        raise ValueError(f"piqa row does not look like 'Question: <goal>\\n': {query[:80]!r}")
    return query + "Answer:"


def boolq_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval boolq: ``"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"``.

    The local query is ``"Passage: {passage}\\nQuestion: {question}?"``: lm-eval has no "Passage: "
    prefix, so it is removed.
    """
    query = doc["query"]
    if not (query.startswith(_BOOLQ_PREFIX) and "\nQuestion: " in query):
        raise ValueError(f"boolq row does not look like 'Passage: ...\\nQuestion: ...': {query[:80]!r}")
    return query[len(_BOOLQ_PREFIX) :] + "\nAnswer:"


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """lm-eval winogrande's partial evaluation: doc_to_text returns the gold index (an int), which
    tells lm-eval that the choices are the contexts and the shared continuation is scored."""
    return int(doc["gold"])


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """lm-eval: ``sentence[:idx] + option`` for both options; the local ``context_options`` are those."""
    return list(doc["context_options"])


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """lm-eval: ``sentence[idx + 1:].strip()``; the local ``continuation`` is that text."""
    return doc["continuation"]


def copa_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval copa: ``premise.strip()[:-1] + " because"`` (or ``" therefore"``). The local query
    has a comma before the connective ("..., therefore"), which lm-eval's prompt does not."""
    query = doc["query"]
    for connective in ("because", "therefore"):
        if query.endswith(", " + connective):
            return query[: -len(", " + connective)] + " " + connective
    raise ValueError(f"copa row does not end with ', because' or ', therefore': {query[-60:]!r}")


def copa_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """lm-eval copa: ``" " + convert_choice(choice)`` (first letter lowered, already done in the
    local data). With lm-eval's default target_delimiter " " the scored continuation therefore
    starts with two spaces; we keep that quirk so the numbers match lm-eval's."""
    return [" " + choice for choice in doc["choices"]]
