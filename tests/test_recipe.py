"""Recipe validation: every bad input fails before any model is loaded, naming the field."""
import pytest
import yaml

from compress.errors import ConfigError
from compress.recipe import apply_override, load_recipe, recipe_from_dict

BASE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "output": "out/x",
    "calibration": {"dataset": "../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl", "nsamples": 4, "seqlen": 64},
    "passes": [{"gptq": {"bits": 4, "group_size": 64}}],
}


def recipe(**changes):
    d = {k: (v.copy() if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    d.update(changes)
    return recipe_from_dict(d)


def test_valid_recipe_round_trips():
    r = recipe()
    assert r.passes[0].name == "gptq" and r.passes[0].config.bits == 4
    again = recipe_from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


def test_quickstart_recipe_is_valid():
    r = load_recipe("recipes/quickstart.yaml")
    assert r.save.format == "compressed-tensors" and r.eval.perplexity.seqlen == 2048


@pytest.mark.parametrize("passes,needle", [
    ([{"gptq": {"bits": 5}}], "passes[0].gptq.bits"),
    ([{"gptq": {"group_size": 100}}], "passes[0].gptq.group_size"),
    ([{"gptq": {"bitz": 4}}], "unknown key (allowed: bits"),
    ([{"gptq": {"dampening": 1.5}}], "passes[0].gptq.dampening"),
    ([{"gptq": {"bits": "4"}}], "passes[0].gptq.bits"),
    ([{"gptqq": {}}], "unknown pass 'gptqq' (known: rtn, gptq"),
    ([{"gptq": {}, "rtn": {}}], "one key"),
])
def test_bad_pass_options_name_the_field(passes, needle):
    with pytest.raises(ConfigError) as e:
        recipe(passes=passes)
    assert needle in str(e.value)


@pytest.mark.parametrize("key,value,needle", [
    ("calibration", {"nsamples": 0}, "calibration.nsamples"),
    ("calibration", {"dataset": "x.txt", "bogus": 1}, "calibration.bogus: unknown key"),
    ("save", {"format": "onnx"}, "save.format"),
    ("load", {"device": "tpu"}, "load.device"),
    ("eval", {"perplexity": {"seqlen": -1}}, "eval.perplexity.seqlen"),
    ("colour", "red", "colour: unknown key"),
])
def test_bad_sections_name_the_field(key, value, needle):
    with pytest.raises(ConfigError) as e:
        recipe(**{key: value})
    assert needle in str(e.value)


def test_gptq_needs_calibration():
    with pytest.raises(ConfigError, match="needs calibration"):
        recipe(calibration=None)


def test_rtn_runs_without_calibration():
    r = recipe(calibration=None, passes=[{"rtn": {"bits": 4}}])
    assert r.passes[0].name == "rtn"


def test_quantization_before_another_quantization_is_allowed_but_dynamic_groups_need_gptq_format():
    with pytest.raises(ConfigError, match="static_groups"):
        recipe(passes=[{"gptq": {"act_order": True, "static_groups": False}}])
    r = recipe(passes=[{"gptq": {"act_order": True, "static_groups": False}}], save={"format": "gptq"})
    assert r.save.format == "gptq"


def test_override_edits_before_validation(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    r = load_recipe(p, ["passes.0.gptq.group_size=32", "calibration.seed=3"], output="elsewhere")
    assert r.passes[0].config.group_size == 32 and r.calibration.seed == 3 and r.output == "elsewhere"
    with pytest.raises(ConfigError, match="passes\\[0\\].gptq.group_size"):
        load_recipe(p, ["passes.0.gptq.group_size=100"])
    with pytest.raises(ConfigError, match="not an index"):
        load_recipe(p, ["passes.3.gptq.bits=4"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe(p, ["passes.0.gptq.bits"])


def test_override_creates_missing_sections():
    raw = {"model": "m"}
    apply_override(raw, "eval.perplexity.max_windows=2")
    assert raw["eval"] == {"perplexity": {"max_windows": 2}}


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_calibration_need_follows_pass_options():
    with pytest.raises(ConfigError, match="needs calibration"):
        recipe(calibration=None, passes=[{"width_prune": {"mlp_ratio": 0.2, "importance": "taylor"}}])
    r = recipe(calibration=None, passes=[{"width_prune": {"mlp_ratio": 0.2, "importance": "magnitude"}}])
    assert r.passes[0].name == "width_prune"


def test_pruning_after_quantization_is_refused():
    with pytest.raises(ConfigError, match="before quantization"):
        recipe(passes=[{"gptq": {"group_size": 64}}, {"wanda": {"sparsity": 0.5}}])
    with pytest.raises(ConfigError, match="followed by a pruning pass"):
        recipe(passes=[{"alpha_allocation": {"target_sparsity": 0.7}}, {"gptq": {}}])


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(path):
    assert load_recipe(path).passes
