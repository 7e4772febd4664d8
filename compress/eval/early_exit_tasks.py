"""Zero-shot tasks with and without lossy early exit, same prompts, same run (``eval.tasks.early_exit: true``).

Each task is scored twice through lm-eval: by the model as it is, then with the EarlyExit installed. The
bridge registers every loglikelihood request's continuation length with the installed forward, so a
request is checked on exactly the positions lm-eval scores. Reported per task: accuracy with and without,
agreement (the fraction of documents whose prediction, i.e. the chosen option or for lambada the
greedy-match flag, is the same), mean and histogram of executed layers per scored sequence, and FLOPs of
the early-exit forwards including the checks against the full forwards of the same sequences.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from compress.eval import tasks as T

if TYPE_CHECKING:
    from torch import nn

    from compress.runtime.early_exit import EarlyExit


def _hflm_class(handle: Any) -> type:
    from lm_eval.models.huggingface import HFLM

    class EarlyExitHFLM(HFLM):
        """HFLM that tells the installed early-exit forward which positions each request scores."""

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):  # noqa: ANN001
            if handle is not None:
                for _, context_enc, continuation_enc in requests:
                    inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                    handle.expect(inp, len(continuation_enc))
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    return EarlyExitHFLM


def _prediction(sample: dict[str, Any]) -> Any:
    resps = sample["filtered_resps"]
    if len(resps) > 1:  # multiple choice: the option with the highest loglikelihood
        lls = [float(r[0]) for r in resps]
        return lls.index(max(lls))
    return bool(resps[0][1])  # a single continuation: whether it is the greedy one


def _evaluate(model: nn.Module, tok: Any, task: T.ResolvedTask, tm: Any, spec: T.TasksSpec, handle: Any):
    from lm_eval import simple_evaluate

    lm = _hflm_class(handle)(pretrained=model, tokenizer=tok, batch_size=spec.batch_size)
    with T._scoped_env({"DISABLE_MULTIPROC": "1"}), T._no_download_counts():
        return simple_evaluate(model=lm, tasks=[task.spec], num_fewshot=spec.num_fewshot, limit=spec.limit,
                               task_manager=tm, bootstrap_iters=T.DEFAULT_BOOTSTRAP_ITERS, log_samples=True,
                               random_seed=None, numpy_random_seed=None, torch_random_seed=None)


def run_tasks_early_exit(model: nn.Module, tok: Any, spec: T.TasksSpec, ee: EarlyExit) -> dict[str, Any]:
    """Per task: accuracy without/with early exit, agreement, executed layers, FLOPs (see module doc)."""
    import lm_eval

    from compress.runtime.early_exit import flops_per_token

    resolved, tm = T.resolve_tasks(spec.names, spec.assets_dir)
    was_training = model.training
    model.eval()
    rows: dict[str, Any] = {}
    try:
        for task in resolved:
            t0 = time.perf_counter()
            full = _evaluate(model, tok, task, tm, spec, None)
            t1 = time.perf_counter()
            handle = ee.install(model)
            try:
                early = _evaluate(model, tok, task, tm, spec, handle)
            finally:
                handle.remove()
            t2 = time.perf_counter()
            res_full = T._collect(full, [task], spec, t1 - t0, lm_eval.__version__, T.resolve_assets_dir(spec.assets_dir))
            res_ee = T._collect(early, [task], spec, t2 - t1, lm_eval.__version__, T.resolve_assets_dir(spec.assets_dir))
            s_full = {s["doc_id"]: _prediction(s) for s in full["samples"][task.lm_eval_name]}
            s_ee = {s["doc_id"]: _prediction(s) for s in early["samples"][task.lm_eval_name]}
            agree = sum(s_full[d] == s_ee[d] for d in s_full) / max(1, len(s_full))
            st = handle.stats
            mean_tokens = sum(st.tokens) / max(1, len(st.tokens))
            block_f, head_f = flops_per_token(model, handle.adapter, int(mean_tokens))
            a, b = res_full.tasks[0], res_ee.tasks[0]
            rows[task.name] = {
                "n": a.n, "n_total": a.n_total, "partial": a.partial,
                "acc": a.acc, "acc_early_exit": b.acc, "acc_norm": a.acc_norm, "acc_norm_early_exit": b.acc_norm,
                "agreement": agree, "seconds": t1 - t0, "seconds_early_exit": t2 - t1,
                "mean_tokens": mean_tokens, **st.summary(ee.num_layers, block_f, head_f),
            }
    finally:
        model.train(was_training)
    accs = [(r["acc"], r["acc_early_exit"]) for r in rows.values() if r["acc"] is not None]
    saved = [r["layers_saved"] for r in rows.values() if "layers_saved" in r]
    return {"tasks": rows, "mode": "lossy", "probes": ee.probes, "threshold": ee.threshold,
            "mean_acc": sum(a for a, _ in accs) / len(accs) if accs else None,
            "mean_acc_early_exit": sum(b for _, b in accs) / len(accs) if accs else None,
            "mean_layers_saved": sum(saved) / len(saved) if saved else None,
            "batch": "rows that exit leave the batch; the rest continue (no row runs past its exit)"}


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["| task | n | acc | acc (early exit) | agreement | layers executed (mean) | layers saved | FLOPs ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["tasks"].items():
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {name} | {r['n']}{' (partial)' if r['partial'] else ''} | {f(r['acc'])} | {f(r['acc_early_exit'])} "
                     f"| {r['agreement']:.4f} | {r.get('mean_layers', 0):.2f} / {r['num_layers']} "
                     f"| {100 * r.get('layers_saved', 0):.1f}% | {r.get('flops_ratio', 1):.3f} |")
    return "\n".join(lines)
