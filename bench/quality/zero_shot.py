"""Zero-shot accuracy of a saved model through lm-eval, offline, one task at a time.

Each task is scored in its own ``run_tasks`` call and the JSON is rewritten after every task, so a
run that is stopped early keeps the tasks it finished (its entry in "runs" lists those not run).
``--append`` adds tasks to an existing file, e.g. a partial run of a long task beside full runs of
the others; every task records which run (command, limit, machine, date) scored it.

Usage::

    python bench/quality/zero_shot.py /root/.cache/compress/models/HuggingFaceTB--SmolLM2-135M-Instruct \\
        --tasks arc_easy,arc_challenge,piqa,winogrande --threads 1 \\
        --out bench/results/zero_shot_smollm2-135m-fp32.json

``--threads 1`` is the polite setting on a CPU shared with other jobs: torch's default (one thread
per core) slows down many times when the cores are already busy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import sys
from dataclasses import fields
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from compress.eval.tasks import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    TaskResult,
    TaskResults,
    TasksSpec,
    resolve_tasks,
    run_tasks,
)
from compress.commands.eval import load_any  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder (or hub id / .gguf, as compress loads them)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. arc_easy,piqa")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (partial run)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--assets-dir", default=None, help="folder of the task jsonl files (default ../shared/assets/data/tasks)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="JSON file to write, e.g. bench/results/zero_shot_<name>.json")
    p.add_argument("--append", action="store_true",
                   help="add to an existing --out file of the same model (a task scored again replaces its entry)")
    return p.parse_args(argv)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dequantize_once(model: torch.nn.Module) -> int:
    """Give each QuantizedLinear its dequantized weight once. Its default forward dequantizes on every
    call, which dominates scoring of short requests on a CPU; F.linear on the same float weight gives the
    same numbers (same dequantization, same matmul), only once instead of per batch."""
    import torch.nn.functional as F

    from compress.nn.qlinear import QuantizedLinear

    n = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            w = m.dequantize()
            m.set_backend(lambda x, w=w, b=m.bias: F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)))
            n += 1
    return n


def _read_existing(out: Path, model: str, dtype: str) -> dict:
    record = json.loads(out.read_text())
    if (record.get("model"), record.get("dtype")) != (model, dtype):
        raise SystemExit(f"--append: {out} holds {record.get('model')} ({record.get('dtype')}), not {model} ({dtype})")
    return record


def _table(record: dict, batch_size: int, num_fewshot: int) -> str:
    names = {f.name for f in fields(TaskResult)}
    tasks = [TaskResult(**{k: v for k, v in t.items() if k in names}) for t in record["tasks"]]
    runs = record["runs"]
    merged = TaskResults(
        tasks=tasks, limit=None, num_fewshot=num_fewshot, batch_size=batch_size,
        seconds=sum(t.get("seconds", 0.0) for t in record["tasks"]),
        lm_eval_version=runs[-1]["lm_eval_version"], assets_dir=runs[-1]["assets_dir"],
    )
    return merged.to_markdown()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    spec = TasksSpec(names=names, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                     assets_dir=args.assets_dir)
    resolve_tasks(spec.names, spec.assets_dir)  # fail on a bad name or a missing file before loading
    out = Path(args.out)
    if args.append and out.is_file():
        record = _read_existing(out, args.model, args.dtype)
    else:
        record = {"model": args.model, "dtype": args.dtype, "runs": [], "tasks": []}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # a compress checkpoint (GPTQ v1 / compressed-tensors) loads through our reader, anything else as compress loads models
    model, tokenizer = load_any(args.model, args.device, args.dtype)
    _dequantize_once(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "batch_size": spec.batch_size,
        "not_run": list(spec.names),
    }
    record["runs"].append(run)
    run_index = len(record["runs"]) - 1
    for name in spec.names:
        res = run_tasks(model, tokenizer, [name], limit=spec.limit, batch_size=spec.batch_size,
                        assets_dir=spec.assets_dir, num_fewshot=spec.num_fewshot)
        record["tasks"] = [t for t in record["tasks"] if t["name"] != name]  # a re-run replaces
        record["tasks"].extend({**t, "seconds": round(res.seconds, 1), "run": run_index} for t in res.to_dict()["tasks"])
        run["not_run"].remove(name)
        run["lm_eval_version"], run["assets_dir"] = res.lm_eval_version, res.assets_dir
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(out)  # never leave a half-written file
        logging.info("%s done in %.0f s", name, res.seconds)
    print(_table(record, spec.batch_size, spec.num_fewshot))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
