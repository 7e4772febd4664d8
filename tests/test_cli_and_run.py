"""End to end through the CLI and the Python API on a tiny local model; errors are one line, exit 2."""
import json

import pytest
import torch
import yaml

from compress.cli import main
from compress.recipe import recipe_from_dict
from compress.runner import run


def write_recipe(tmp_path, model_dir, text, name="recipe.yaml", **over):
    r = {
        "model": str(model_dir), "output": str(tmp_path / "out"),
        "calibration": {"dataset": str(text), "nsamples": 4, "seqlen": 64, "seed": 0},
        "passes": [{"gptq": {"bits": 4, "group_size": 32}}],
        "eval": {"perplexity": {"dataset": str(text.with_suffix(".txt")), "seqlen": 64, "max_windows": 3},
                 "roofline": {"device": "h100", "prompt": 128, "generate": 16},
                 "tasks": {"names": ["piqa"], "limit": 4}},
    }
    r.update(over)
    text.with_suffix(".txt").write_text("An unrelated evaluation text about rivers and hills. " * 200)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(r))
    return path


def test_cli_run_writes_checkpoint_and_reports(tmp_path, tiny_llama_dir, small_text, capsys):
    path = write_recipe(tmp_path, tiny_llama_dir, small_text)
    assert main(["run", str(path), "--set", "passes.0.gptq.act_order=false"]) == 0
    out = tmp_path / "out"
    for f in ("model.safetensors", "config.json", "report.json", "report.md", "recipe.yaml", "README.md",
              "tokenizer.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    ppl = rep["eval"]["perplexity"]
    assert ppl["compressed"]["partial"] and ppl["compressed"]["windows"] == 3
    assert ppl["original"]["perplexity"] > 1 and ppl["compressed"]["perplexity"] > 1
    assert rep["passes"][0]["name"] == "gptq" and rep["passes"][0]["config"]["act_order"] is False
    assert len(rep["passes"][0]["modules"]) == 14
    assert rep["calibration"]["nsamples"] == 4 and rep["checkpoint"]["format"] == "compressed-tensors"
    roof = rep["eval"]["roofline"]
    assert roof["compression"]["weight_bits"] == 4 and roof["speedup_decode"] > 1
    assert "Roofline estimate" in (out / "report.md").read_text()
    tasks = rep["eval"]["tasks"]
    assert tasks["compressed"]["tasks"][0]["n"] == 4 and tasks["original"]["tasks"][0]["partial"]
    assert "Zero-shot accuracy" in (out / "report.md").read_text()
    assert "perplexity" in capsys.readouterr().out
    assert not list(tmp_path.glob(".out.tmp-*"))
    # the same run again refuses to overwrite unless asked
    assert main(["run", str(path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_python_api_equals_cli(tmp_path, tiny_llama_dir, small_text):
    path = write_recipe(tmp_path, tiny_llama_dir, small_text, passes=[{"rtn": {"bits": 4, "group_size": 32}}])
    r = recipe_from_dict(yaml.safe_load(path.read_text()))
    result = run(r, keep_model=True)
    assert result.report["passes"][0]["name"] == "rtn"
    cli_out = tmp_path / "cli"
    assert main(["run", str(path), "-o", str(cli_out)]) == 0
    a = json.loads((result.output / "report.json").read_text())["eval"]["perplexity"]["compressed"]["perplexity"]
    b = json.loads((cli_out / "report.json").read_text())["eval"]["perplexity"]["compressed"]["perplexity"]
    assert a == pytest.approx(b, rel=1e-6)


def test_cli_errors_are_one_line(tmp_path, tiny_llama_dir, small_text, capsys):
    path = write_recipe(tmp_path, tiny_llama_dir, small_text)
    assert main(["run", str(path), "--set", "passes.0.gptq.bits=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: passes[0].gptq.bits") and err.count("\n") == 1 and "Traceback" not in err
    bad_model = write_recipe(tmp_path, tmp_path / "no-such-model", small_text, name="bad.yaml")
    assert main(["run", str(bad_model)]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["run", str(path), "--set", f"calibration.dataset={tmp_path / 'missing.jsonl'}"]) == 2
    assert "calibration dataset not found" in capsys.readouterr().err


def test_calibration_on_eval_text_is_refused(tmp_path, tiny_llama_dir, small_text, capsys):
    path = write_recipe(tmp_path, tiny_llama_dir, small_text)
    eval_txt = str(small_text.with_suffix(".txt"))
    assert main(["run", str(path), "--set", f"calibration.dataset={eval_txt}"]) == 2
    assert "is the evaluation text" in capsys.readouterr().err
    assert main(["run", str(path), "--set", f"calibration.dataset={eval_txt}",
                 "--set", "calibration.allow_eval_overlap=true", "-o", str(tmp_path / "forced")]) == 0


def test_pickle_only_folder_is_refused(tmp_path, tiny_llama_dir, small_text, capsys):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pk = tmp_path / "pickled"
    m.save_pretrained(pk, safe_serialization=False)
    for f in pk.glob("*.safetensors"):
        f.unlink()
    if not list(pk.glob("*.bin")):  # newer transformers always write safetensors: make a pickle file ourselves
        torch.save(m.state_dict(), pk / "pytorch_model.bin")
    path = write_recipe(tmp_path, pk, small_text)
    assert main(["run", str(path)]) == 2
    assert "allow_pickle" in capsys.readouterr().err


def test_passes_and_help(capsys):
    assert main(["passes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"rtn", "gptq"} <= set(info)
    opts = {o["name"]: o for o in info["gptq"]["options"]}
    assert opts["group_size"]["default"] == 128 and opts["act_order"]["default"] is True
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0 and "--set" in capsys.readouterr().out


def test_dry_run_prints_resolved_recipe(tmp_path, capsys):
    assert main(["run", "recipes/quickstart.yaml", "--dry-run", "--set", "passes.0.gptq.bits=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["passes"][0]["gptq"]["bits"] == 3 and printed["passes"][0]["gptq"]["block_size"] == 128
