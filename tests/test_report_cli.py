"""``compress report RUNS_DIR``: three tiny runs made by ``compress.runner.run``, compared in one table."""
from __future__ import annotations

import json

import pytest
import yaml
from matplotlib.image import imread

from compress.cli import main
from compress.errors import CompressError
from compress.eval.roofline import estimate
from compress.eval.runs import (describe_passes, find_runs, mark_fronts, pareto_mask, summarize_runs,
                                write_summary)
from compress.recipe import recipe_from_dict
from compress.runner import run
from tests.conftest import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, smollm2_tokenizer):
    """runs/dense, runs/quant/pruned-gptq and runs/quant/rtn-ct (perplexity on 2 windows, no roofline),
    plus a hidden leftover folder that must be skipped. No zero-shot tasks here (lm-eval costs seconds
    per run): ``test_task_columns`` reads them from a report written by hand."""
    tmp = tmp_path_factory.mktemp("report")
    model_dir = tmp / "tiny-llama"
    tiny_model("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    text = tmp / "eval.txt"
    text.write_text("An unrelated evaluation text about rivers and hills. " * 200)
    roof = {"device": "h100", "prompt": 128, "generate": 16}
    root = tmp / "runs"
    specs = {
        "dense": ([], "dense", 3, roof),
        "quant/pruned-gptq": ([{"magnitude": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 32}}], "gptq", 3,
                              roof),
        "quant/rtn-ct": ([{"rtn": {"bits": 4, "group_size": 32}}], "compressed-tensors", 2, None),
    }
    for name, (passes, fmt, windows, roofline) in specs.items():
        ev = {"perplexity": {"dataset": str(text), "seqlen": 64, "max_windows": windows}, "roofline": roofline}
        run(recipe_from_dict({"model": str(model_dir), "output": str(root / name), "passes": passes,
                              "save": {"format": fmt}, "eval": ev}))
    hidden = root / ".out.tmp-x"
    hidden.mkdir()
    (hidden / "report.json").write_text("{}")
    return root


def _report(root, name):
    return json.loads((root / name / "report.json").read_text())


def test_table_values_equal_the_reports(runs_dir):
    s = summarize_runs(runs_dir)
    rows = {r["name"]: r for r in s["runs"]}
    assert list(rows) == ["dense", "quant/pruned-gptq", "quant/rtn-ct"]
    for name, r in rows.items():
        rep = _report(runs_dir, name)
        ppl = rep["eval"]["perplexity"]
        assert r["perplexity"] == ppl["compressed"]["perplexity"]
        assert r["perplexity_original"] == ppl["original"]["perplexity"]
        assert r["size_bytes"] == rep["checkpoint"]["size_bytes"] > 0
        assert r["parameters"] == rep["model"]["parameters"]
        assert r["zero_fraction"] == rep["sparsity"]["overall"]
        assert r["sparsity"] == (rep["sparsity"]["overall"] if rep["sparsity"]["shown"] else None)
    pruned = _report(runs_dir, "quant/pruned-gptq")
    assert rows["quant/pruned-gptq"]["speedup"] == pruned["eval"]["roofline"]["speedup_decode"]
    assert rows["quant/pruned-gptq"]["speedup_source"] == "report"
    assert rows["quant/pruned-gptq"]["passes"] == "magnitude 50% → rtn w4g32"
    assert rows["quant/pruned-gptq"]["sparsity"] >= 0.5 and rows["quant/rtn-ct"]["sparsity"] is None
    # the dense run's report has no speedup (nothing compressed): its own shape against itself is 1
    assert rows["dense"]["speedup"] == pytest.approx(1.0, rel=1e-12)
    # 2 windows instead of 3, and a speedup estimated with other task settings: flagged, off the fronts
    c = rows["quant/rtn-ct"]
    assert not c["comparable"] and not c["speed_comparable"] and not c["pareto_size"] and not c["pareto_speed"]
    assert c["speedup_source"] == "computed" and any("not comparable" in n for n in c["notes"])
    assert rows["dense"]["comparable"] and rows["quant/pruned-gptq"]["speed_comparable"]


def test_recomputed_speedup_uses_saved_config_and_quantization(runs_dir):
    s = summarize_runs(runs_dir, device="a100-80gb", recompute=True)
    c = next(r for r in s["runs"] if r["name"] == "quant/rtn-ct")
    cfg = json.loads((runs_dir / "quant/rtn-ct/config.json").read_text())
    cfg.pop("quantization_config")
    want = (estimate(cfg, {"device": "a100-80gb"}).decode_ms_per_token
            / estimate(cfg, {"device": "a100-80gb"}, {"weight_bits": 4, "group_size": 32, "symmetric": True})
            .decode_ms_per_token)
    assert c["speedup"] == pytest.approx(want, rel=1e-12) and c["speedup"] > 1
    assert all(r["speed_comparable"] for r in s["runs"])


def test_cli_writes_summary_files(runs_dir, tmp_path, capsys):
    out = tmp_path / "summary"
    assert main(["report", str(runs_dir), "--out", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)  # --json: the whole stdout is one object
    assert [r["name"] for r in obj["runs"]] == ["dense", "quant/pruned-gptq", "quant/rtn-ct"]
    assert obj["reference"]["perplexity"] == obj["runs"][0]["perplexity_key"]
    assert obj["reference"]["perplexity"].startswith(f"{runs_dir.parent / 'eval.txt'} @ 64, 3/")
    assert json.loads((out / "summary.json").read_text())["runs"] == obj["runs"]
    md = (out / "summary.md").read_text()
    assert "| quant/pruned-gptq | magnitude 50% → rtn w4g32 |" in md
    assert "![perplexity vs estimated speedup and size](pareto.png)" in md and "not comparable" in md
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert imread(out / "pareto.png").shape[:2] == (550, 1320)  # 12 x 5 inches at 110 dpi


def test_search_depth_and_hidden_folders(runs_dir):
    assert [p.name for p in find_runs(runs_dir, max_depth=1)] == ["dense"]
    assert len(find_runs(runs_dir)) == 3  # .out.tmp-x holds an (unreadable) report.json but is hidden


def test_pareto_on_a_constructed_example():
    # (perplexity, speedup): b dominates a; c and d trade off; e lacks a speedup
    ppl = [12.0, 11.0, 15.0, 10.5, 9.0]
    speed = [1.5, 2.0, 3.0, 1.2, None]
    assert pareto_mask(ppl, speed, maximize_other=True) == [False, True, True, True, False]
    size = [100.0, 100.0, 60.0, 120.0, 300.0]  # ties in size: the lower perplexity wins
    assert pareto_mask(ppl, size, maximize_other=False) == [False, True, True, True, True]
    assert pareto_mask([5.0, 5.0], [2.0, 2.0], maximize_other=True) == [True, True]  # equal points both stay


def test_mark_fronts_leaves_incomparable_runs_off():
    rows = [dict(name=n, perplexity=p, perplexity_key=k, speedup=s, roofline_key="h100", size_mb=m, notes=[])
            for n, p, k, s, m in [("a", 10.0, "w@64x3", 1.0, 200.0), ("b", 12.0, "w@64x3", 2.0, 60.0),
                                  ("c", 5.0, "w@64x2", 4.0, 50.0)]]
    ref = mark_fronts(rows)
    assert ref["perplexity"] == "w@64x3"
    assert [r["pareto_speed"] for r in rows] == [True, True, False]
    assert [r["pareto_size"] for r in rows] == [True, True, False]
    assert "not comparable" in rows[2]["notes"][0]


def test_describe_passes():
    assert describe_passes([{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 128}}]) == \
        "wanda 50% → gptq w4g128"
    assert describe_passes([{"alpha_allocation": {"target_sparsity": 0.7}}, {"sparsegpt": {"sparsity": "plan"}}]) == \
        "alpha 70% → sparsegpt plan"
    assert describe_passes([{"wanda": {"sparsity": None, "mask": "2:4"}}, {"rtn": {"bits": 4, "group_size": -1}}]) == \
        "wanda 2:4 → rtn w4ch"
    assert describe_passes([]) == "none (original)"


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(CompressError, match="runs folder not found"):
        find_runs(tmp_path / "nope")
    with pytest.raises(CompressError, match="no report.json found"):
        find_runs(tmp_path)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "report.json").write_text("{not json")
    with pytest.raises(CompressError, match=r"cannot read .*broken/report\.json"):
        summarize_runs(tmp_path)
    (bad / "report.json").write_text(json.dumps({"model": {"name": "x"}}))
    with pytest.raises(CompressError, match=r"broken/report\.json is not a compress report"):
        summarize_runs(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs folder not found") and err.count("\n") == 1
    with pytest.raises(CompressError, match="unknown device|not found|no device"):
        summarize_runs(tmp_path, device="no-such-gpu")


def test_write_summary_without_any_speedup(tmp_path):
    # a report-only run (save.format none, no roofline, source gone): no speedup, still a valid table and plot
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    rep = {"model": {"name": "m", "source": str(tmp_path / "gone"), "parameters": 10},
           "recipe": {"passes": [], "eval": {}}, "eval": {}, "checkpoint": {"format": "none"}}
    (run_dir / "report.json").write_text(json.dumps(rep))
    s = summarize_runs(tmp_path)
    assert s["runs"][0]["speedup"] is None and s["runs"][0]["notes"]
    paths = write_summary(s, tmp_path)
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert "| r | none (original) |" in paths["md"].read_text()
    assert yaml.safe_load(paths["json"].read_text())["runs"][0]["parameters"] == 10


def _task_row(name, acc, acc_norm):
    return {"name": name, "source": "local", "mirrors": name, "n": 4, "n_total": 100, "partial": True,
            "num_fewshot": 0, "acc": acc, "acc_stderr": 0.2, "acc_norm": acc_norm, "acc_norm_stderr": 0.2}


def test_task_columns(tmp_path):
    # the tasks section as compress.eval.tasks writes it (TaskResults.to_dict), written by hand here
    tasks = {"original": {"tasks": [_task_row("piqa", 0.75, 0.5), _task_row("boolq", 0.5, None)]},
             "compressed": {"tasks": [_task_row("piqa", 0.25, 0.5), _task_row("boolq", 0.75, None)]}}
    rep = {"model": {"name": "m", "parameters": 10}, "recipe": {"passes": [{"rtn": {"bits": 4, "group_size": 32}}]},
           "eval": {"tasks": tasks}, "checkpoint": {"format": "none"}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps(rep))
    s = summarize_runs(tmp_path)
    t = s["runs"][0]["tasks"]
    assert t["piqa"]["compressed"] == 0.25 and t["piqa"]["original"] == 0.75 and t["boolq"]["compressed"] == 0.75
    md = write_summary(s, tmp_path)["md"].read_text()
    assert "| boolq acc (orig) | piqa acc (orig) |" in md and "| 0.750 (0.500) | 0.250 (0.750) |" in md


def test_unknown_architecture_is_a_note_not_a_failure(tmp_path):
    run_dir = tmp_path / "odd"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    rep = {"model": {"name": "m", "source": str(run_dir), "parameters": 10}, "recipe": {"passes": []}, "eval": {}}
    (run_dir / "report.json").write_text(json.dumps(rep))
    row = summarize_runs(tmp_path)["runs"][0]
    assert row["speedup"] is None and "no_such_arch" in row["notes"][0]


def test_structural_run_speedup_is_against_the_original(tmp_path, tiny_llama_dir):
    """width_prune shrinks model.config in place; the report's roofline baseline must still be the
    original shape, and ``compress report`` takes that value (old reports: baseline estimated again)."""
    roof = {"device": "h100", "prompt": 64, "generate": 8}
    out = tmp_path / "runs" / "width"
    rep = run(recipe_from_dict({"model": str(tiny_llama_dir), "output": str(out), "save": {"format": "dense"},
                                "passes": [{"width_prune": {"mlp_ratio": 0.5}}], "eval": {"roofline": roof}})).report
    rf = rep["eval"]["roofline"]
    original = estimate(tiny_llama_dir, roof)
    assert rf["baseline"]["params"] == original.params
    assert rf["params"] < original.params
    assert rf["baseline"]["decode_ms_per_token"] == pytest.approx(original.decode_ms_per_token, rel=1e-12)
    assert rf["speedup_decode"] > 1.0
    row = summarize_runs(tmp_path / "runs")["runs"][0]
    assert row["speedup_source"] == "report" and row["speedup"] == rf["speedup_decode"]
    # a report written before the fix: no baseline params (and its speedup, if any, against the pruned shape)
    old = json.loads((out / "report.json").read_text())
    old["eval"]["roofline"]["speedup_decode"] = 1.0
    del old["eval"]["roofline"]["baseline"]["params"]
    (out / "report.json").write_text(json.dumps(old))
    row = summarize_runs(tmp_path / "runs")["runs"][0]
    assert row["speedup_source"] == "report, baseline estimated"
    assert row["speedup"] == pytest.approx(rf["speedup_decode"], rel=1e-12)
