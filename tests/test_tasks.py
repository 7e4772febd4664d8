"""compress.eval.tasks and eval/tasks/: prompts equal lm-eval's standard tasks, scores equal an
independent float64 computation, results have the promised shape.

The prompt tests take lm-eval's own YAML (and helper functions) from the installed package, apply
them to the original Hugging Face row of a task's first example (written out below), and compare
with what our local task builds from the shared llm-foundry row. They need lm-eval and the shared
assets (../shared/assets/data/tasks); the model tests also need the prepared SmolLM2 tokenizer.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from compress.errors import CompressError
from compress.eval import tasks as T

lm_eval = pytest.importorskip("lm_eval")

ASSETS = T.resolve_assets_dir(None)
TOKENIZER_DIR = Path.home() / ".cache" / "compress" / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"

needs_assets = pytest.mark.skipif(not ASSETS.is_dir(), reason=f"shared task data not found at {ASSETS}")
needs_tokenizer = pytest.mark.skipif(
    not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason="prepared SmolLM2 folder missing (compress prepare-default)"
)

# The first example of each task as the Hugging Face data set lm-eval reads has it.
HF_ROWS: dict[str, dict[str, Any]] = {
    "arc_easy": {
        "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
        "choices": {
            "text": [
                "Sunlight is the source of energy for nearly all ecosystems.",
                "Most ecosystems are found on land instead of in water.",
                "Carbon dioxide is more available than other gases.",
                "The producers in all ecosystems are plants.",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "A",
    },
    "piqa": {
        "goal": "How do I ready a guinea pig cage for it's new occupants?",
        "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
        "you will also need to supply it with a water bottle and a food dish.",
        "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
        "you will also need to supply it with a water bottle and a food dish.",
        "label": 0,
    },
    "winogrande": {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    },
    "copa": {
        "premise": "The man turned on the faucet.",
        "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.",
        "question": "effect",
        "label": 1,
    },
    "openbookqa": {
        "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the end "
        "of the year. After looking over their budget and expenses, they decide the best way to save money is to",
        "choices": {
            "text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "B",
    },
}
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "copa": "super_glue/copa/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}


class _KeepFunctionTags(yaml.SafeLoader):
    pass


_KeepFunctionTags.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _lm_eval_yaml(name: str) -> dict[str, Any]:
    return yaml.load((LM_EVAL_TASKS / LM_EVAL_YAML[name]).read_text(), Loader=_KeepFunctionTags)  # noqa: S506


def _lm_eval_helpers(name: str, module: str) -> ModuleType:
    path = (LM_EVAL_TASKS / LM_EVAL_YAML[name]).parent / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"lm_eval_helpers_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _render(template: str, doc: dict[str, Any]) -> Any:
    from lm_eval.utils import apply_template

    return apply_template(template, doc)


def _expected_requests(name: str, hf: dict[str, Any]) -> list[tuple[str, str]]:
    """(context, continuation) pairs lm-eval's standard task builds for ``hf``."""
    cfg = _lm_eval_yaml(name)
    delim = cfg.get("target_delimiter", " ")
    if name == "winogrande":
        h = _lm_eval_helpers(name, "preprocess_winogrande")
        return [(ctx, delim + h.doc_to_target(hf)) for ctx in h.doc_to_choice(hf)]
    if name == "copa":
        h = _lm_eval_helpers(name, "utils")
        return [(h.doc_to_text(hf), delim + c) for c in h.doc_to_choice(hf)]
    if name == "lambada_openai":
        return [(_render(cfg["doc_to_text"], hf), _render(cfg["doc_to_target"], hf))]
    ctx = _render(cfg["doc_to_text"], hf) if "{{" in cfg["doc_to_text"] else hf[cfg["doc_to_text"]]
    choices = cfg["doc_to_choice"] if isinstance(cfg["doc_to_choice"], list) else _eval_choices(cfg, hf)
    return [(ctx, delim + c) for c in choices]


def _expected_gold(name: str, hf: dict[str, Any]) -> int:
    """The answer index lm-eval's standard task reads from ``hf``."""
    if name == "winogrande":
        return _lm_eval_helpers(name, "preprocess_winogrande").doc_to_text(hf)
    target = _lm_eval_yaml(name)["doc_to_target"]
    if name == "copa":
        return hf["label"]  # its doc_to_target returns the text; label is the index
    return hf[target] if target in hf else int(_render(target, hf))


def _eval_choices(cfg: dict[str, Any], hf: dict[str, Any]) -> list[str]:
    import ast

    return ast.literal_eval(_render(cfg["doc_to_choice"], hf))


def _our_requests(name: str) -> tuple[list[tuple[str, str]], Any]:
    from lm_eval.tasks import TaskManager

    cfg = T.local_task_config(name)
    task = TaskManager(include_defaults=False).load([cfg])["tasks"][cfg["task"]]
    doc = task.eval_docs[0]
    reqs = task.construct_requests(doc, task.fewshot_context(doc, 0))
    reqs = reqs if isinstance(reqs, list) else [reqs]
    # winogrande-style tasks (several contexts) carry the gold index in doc_to_text
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return [tuple(r.arguments) for r in reqs], gold


def _first_row(file: str) -> dict[str, Any]:
    with open(ASSETS / file) as f:
        return json.loads(f.readline())


# ------------------------------------------------------------------------------- prompt formats
@needs_assets
@pytest.mark.parametrize("name", ["arc_easy", "piqa", "winogrande", "copa", "openbookqa"])
def test_prompts_equal_lm_eval_standard_task(name: str) -> None:
    ours, gold = _our_requests(name)
    assert ours == _expected_requests(name, HF_ROWS[name])
    assert gold == _expected_gold(name, HF_ROWS[name])


@needs_assets
def test_arc_prompt_literal() -> None:
    ours, _ = _our_requests("arc_easy")
    assert ours[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )


@needs_assets
def test_boolq_prompt_equals_lm_eval() -> None:
    # The first passage is long: it is taken from the shared row, the framing is checked exactly.
    query = _first_row("boolq.jsonl")["query"]
    passage = query.removeprefix("Passage: ").rsplit("\nQuestion: ", 1)[0]
    assert passage.startswith("All biomass goes through") and passage.endswith("than producing gasoline.")
    hf = {"passage": passage, "question": "does ethanol take more energy make that produces", "label": 0}
    ours, gold = _our_requests("boolq")
    assert ours == _expected_requests("boolq", hf)
    assert ours[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert not ours[0][0].startswith("Passage:")
    assert gold == 0


@needs_assets
def test_lambada_request_equals_lm_eval_split() -> None:
    row = _first_row("lambada_openai.jsonl")
    hf = {"text": row["context"] + " " + row["continuation"]}
    ours, _ = _our_requests("lambada_openai")
    assert ours == _expected_requests("lambada_openai", hf)
    assert ours[0][1] == " signs"


@needs_assets
@pytest.mark.parametrize(
    "file,helper",
    [("piqa.jsonl", "piqa_doc_to_text"), ("boolq.jsonl", "boolq_doc_to_text"), ("copa.jsonl", "copa_doc_to_text")],
)
def test_every_shared_row_has_the_shape_the_helpers_expect(file: str, helper: str) -> None:
    fn = getattr(T._load_helpers(), helper)
    with open(ASSETS / file) as f:
        rows = [json.loads(line) for line in f]
    prompts = [fn(row) for row in rows]  # raises ValueError on a row of another shape
    assert all(p.endswith(("\nAnswer:", " because", " therefore")) for p in prompts)


@needs_assets
def test_every_arc_row_is_a_bare_question() -> None:
    for file in ("arc_easy.jsonl", "arc_challenge.jsonl"):
        with open(ASSETS / file) as f:
            queries = [json.loads(line)["query"] for line in f]
        assert [q[:60] for q in queries if not q.startswith("Question: ") or "\nAnswer" in q] == []


def test_helper_rejects_a_row_of_the_wrong_shape() -> None:
    helpers = T._load_helpers()
    with pytest.raises(ValueError, match="piqa"):
        helpers.piqa_doc_to_text({"query": "How do I ready a cage?"})
    with pytest.raises(ValueError, match="boolq"):
        helpers.boolq_doc_to_text({"query": "Some passage without the question"})
    with pytest.raises(ValueError, match="copa"):
        helpers.copa_doc_to_text({"query": "The man turned on the faucet therefore"})


# ------------------------------------------------------------------------------- spec and names
def test_spec_accepts_recipe_shape() -> None:
    spec = T.TasksSpec.model_validate({"names": ["arc_easy", "piqa"], "limit": None})
    assert spec.names == ["arc_easy", "piqa"] and spec.num_fewshot == 0 and spec.limit is None


@pytest.mark.parametrize(
    "raw",
    [
        {"names": ["arc_easy"], "limt": 5},  # unknown key
        {"names": []},
        {"names": ["openbookqa", "openbook_qa"]},  # the same task twice through its alias
        {"names": ["arc_easy"], "limit": 0},
        {"names": ["arc_easy"], "num_fewshot": -1},
        {"names": ["arc_easy"], "batch_size": 0},
        {"names": [""]},
    ],
)
def test_spec_rejects(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        T.TasksSpec.model_validate(raw)


class _Registry:
    """Stands in for lm-eval's TaskManager index, which takes ~15 s to build."""

    all_tasks = ["hellaswag"]


@needs_assets
def test_unknown_name_lists_local_tasks() -> None:
    with pytest.raises(CompressError, match="not a local task") as err:
        T.resolve_tasks(["arc_easy", "no_such_task"], task_manager=_Registry())
    assert "piqa" in str(err.value) and "winogrande" in str(err.value)


@needs_assets
def test_external_and_forced_names_pass_through() -> None:
    resolved, _ = T.resolve_tasks(["hellaswag", "piqa"], task_manager=_Registry())
    assert [(r.name, r.source, r.spec) for r in resolved][0] == ("hellaswag", "lm-eval", "hellaswag")
    assert resolved[1].source == "local" and isinstance(resolved[1].spec, dict)
    forced, _ = T.resolve_tasks(["lm_eval:hellaswag"], task_manager=_Registry())
    assert forced[0].lm_eval_name == "hellaswag" and forced[0].source == "lm-eval"


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"num_fewshot": -1}, {"bootstrap_iters": 0}])
def test_run_tasks_rejects_bad_arguments_before_scoring(kwargs: dict[str, Any]) -> None:
    field = next(iter(kwargs))
    with pytest.raises(CompressError, match=field):
        T.run_tasks(torch.nn.Linear(1, 1), None, ["arc_easy"], **kwargs)  # type: ignore[arg-type]


def test_missing_data_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=str(tmp_path)):
        T.resolve_tasks(["arc_easy"], assets_dir=tmp_path, task_manager=_Registry())


@pytest.mark.slow
def test_names_against_real_lm_eval_registry() -> None:
    with pytest.raises(CompressError, match="arc_easy"):
        T.resolve_tasks(["surely_not_an_lm_eval_task"])
    resolved, _ = T.resolve_tasks(["hellaswag"])  # lm-eval's own task: passed through, data from the hub
    assert (resolved[0].source, resolved[0].spec) == ("lm-eval", "hellaswag")


# ------------------------------------------------------------------------------- scoring
def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=0.5,  # large weights: confident, varied predictions instead of near-uniform ones
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float64)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _reference_scores(model: torch.nn.Module, tok: Any, ctx: str, conts: list[str]) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens, computed directly in float64."""
    out = []
    for cont in conts:
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        cont_ids = whole[len(ctx_ids):]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = model(ids).logits.double().log_softmax(-1)[0]
        positions = range(len(whole) - len(cont_ids) - 1, len(whole) - 1)
        out.append(sum(logp[p, t].item() for p, t in zip(positions, cont_ids, strict=True)))
    return out


@needs_assets
@needs_tokenizer
def test_run_tasks_matches_direct_float64_scoring(tokenizer: Any) -> None:
    model = _tiny_llama()
    model.train()  # run_tasks must restore this
    limit = 10
    res = T.run_tasks(model, tokenizer, ["arc_easy"], limit=limit, batch_size=4)
    assert model.training

    from lm_eval.tasks import TaskManager

    cfg = T.local_task_config("arc_easy")
    task = TaskManager(include_defaults=False).load([cfg])["tasks"][cfg["task"]]
    hits, hits_norm = [], []
    for doc in list(task.eval_docs)[:limit]:
        ctx = task.fewshot_context(doc, 0)
        conts = [" " + c for c in doc["choices"]]
        scores = _reference_scores(model.eval(), tokenizer, ctx, conts)
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
        # lm-eval's acc_norm divides by the character length of the choice text (no delimiter)
        normed = [s / len(c) for s, c in zip(scores, doc["choices"], strict=True)]
        hits_norm.append(max(range(len(normed)), key=normed.__getitem__) == doc["gold"])
    assert 0 < sum(hits) < limit and hits != hits_norm  # a check that could not pass by accident
    (t,) = res.tasks
    assert t.acc == pytest.approx(sum(hits) / limit, abs=1e-12)
    assert t.acc_norm == pytest.approx(sum(hits_norm) / limit, abs=1e-12)


@needs_assets
@needs_tokenizer
def test_run_tasks_result_structure(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import socket

    import datasets.config

    lookups: list[str] = []

    def no_network(host: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        raise socket.gaierror("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    env_before, counts_before = dict(os.environ), datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    model = _tiny_llama().to(torch.float32)
    res = T.run_tasks(model, tokenizer, ["winogrande", "lambada_openai"], limit=5, batch_size=4)
    assert lookups == []  # local tasks touch no network (not even datasets' download counter)
    assert dict(os.environ) == env_before and datasets.config.HF_UPDATE_DOWNLOAD_COUNTS == counts_before
    assert [t.name for t in res.tasks] == ["winogrande", "lambada_openai"]
    wino, lam = res.tasks
    with open(ASSETS / "winogrande.jsonl") as f:
        n_wino = sum(1 for _ in f)
    assert (wino.n, wino.n_total, wino.partial, res.partial) == (5, n_wino, True, True)
    assert 0.0 <= wino.acc <= 1.0 and wino.acc_stderr is not None and wino.acc_stderr > 0
    assert wino.acc_norm is None  # lm-eval's winogrande defines acc only
    # an untrained model spreads probability over the 49,152-token vocabulary: huge but finite perplexity
    assert lam.perplexity is not None and math.isfinite(lam.perplexity) and lam.perplexity > 100
    assert 0.0 <= lam.acc <= 1.0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["partial"] is True and d["tasks"][0]["mirrors"] == "winogrande"
    md = res.to_markdown()
    assert "| winogrande | 5/" in md and "(partial)" in md
