"""sparse_finetune: loss numerics against float64, exact mask preservation, LoRA, structural shapes, resume,
eval-overlap refusal, config errors, and wanda -> sparse_finetune -> gptq end to end through the CLI."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from compress.adapters import get_adapter
from compress.algos.distill import (causal_lm_loss, hidden_state_loss, kd_loss, lr_factor, mix_loss, topk_kd_loss,
                                    topk_logits)
from compress.calibration import CalibrationData
from compress.context import PassContext
from compress.errors import CompressError, ConfigError
from compress.passes.sparse_finetune import SparseFinetune, SparseFinetuneConfig, TrainingStopped
from compress.passes.wanda import Wanda, WandaConfig
from compress.passes.width_prune import WidthPrune, WidthPruneConfig
from compress.recipe import recipe_from_dict

VOCAB = 256
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 60


class ByteTokenizer:
    """Bytes as token ids: enough tokenizer for a vocabulary-256 model."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode())], dtype=torch.long))


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      initializer_range=0.1)  # logits wide enough that a frozen lm_head does not cap the CE
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pruned(dense) -> LlamaForCausalLM:
    """The dense model after 50% Wanda on random calibration tokens."""
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(dense)
    calib = CalibrationData(input_ids=ids, source="random", seed=1, total_tokens=ids.numel())
    Wanda(WandaConfig(sparsity=0.5)).apply(model, PassContext(adapter=get_adapter(model), device=torch.device("cpu"),
                                                              calibration_factory=lambda: calib))
    return model


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(TEXT)
    return p


def ctx_for(model, dense, **kw) -> PassContext:
    return PassContext(adapter=get_adapter(model), device=torch.device("cpu"), tokenizer=ByteTokenizer(),
                       teacher_factory=lambda: copy.deepcopy(dense), **kw)


def finetune(model, dense, text_file, stop_at=None, **opts):
    cfg = SparseFinetuneConfig(**{"dataset": str(text_file), "steps": 4, "seqlen": 32, "batch_size": 2, "lr": 1.0e-3,
                                  "log_every": 100, **opts})
    p = SparseFinetune(cfg)
    p.stop_at = stop_at
    return p


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


# --- pure functions ---------------------------------------------------------------------------------
def test_kd_loss_matches_float64_reference_and_is_zero_for_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    T = 2.0
    p_t = torch.softmax(t.double() / T, -1)
    ref = T**2 * (p_t * (p_t.log() - torch.log_softmax(s.double() / T, -1))).sum(-1).mean()
    got = kd_loss(s, t, T)
    assert abs(float(got) - float(ref)) / float(ref) < 1e-5
    assert float(ref) > 0.1
    assert abs(float(kd_loss(t, t, T))) < 1e-6


def test_topk_kd_equals_full_kd_at_full_k_and_matches_reference_below():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 16, generator=g) * 2, torch.randn(3, 4, 16, generator=g) * 2
    vals, idx = t.topk(16, -1)
    assert abs(float(topk_kd_loss(s, vals, idx, 1.5)) - float(kd_loss(s, t, 1.5))) < 1e-5 * float(kd_loss(s, t, 1.5))
    v16, i32 = topk_logits(t, 5)
    assert v16.dtype == torch.float16 and i32.dtype == torch.int32 and v16.shape == (3, 4, 5)
    p_t = torch.softmax(v16.double() / 1.5, -1)
    log_s = torch.log_softmax(s.double() / 1.5, -1).gather(-1, i32.long())
    ref = 1.5**2 * (p_t * (p_t.log() - log_s)).sum(-1).mean()
    assert abs(float(topk_kd_loss(s, v16, i32, 1.5)) - float(ref)) / float(ref) < 1e-5


def test_ce_mix_hidden_and_schedule():
    g = torch.Generator().manual_seed(2)
    logits, ids = torch.randn(2, 6, 9, generator=g), torch.randint(0, 9, (2, 6), generator=g)
    lp = torch.log_softmax(logits.double(), -1)
    ref = -lp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    ce = causal_lm_loss(logits, ids)
    assert abs(float(ce) - float(ref)) / float(ref) < 1e-6
    kd = kd_loss(logits, torch.randn(2, 6, 9, generator=g), 1.0)
    assert float(mix_loss(ce, kd, 0.25)) == pytest.approx(0.75 * float(ce) + 0.25 * float(kd), rel=1e-6)
    a = [torch.randn(2, 6, 4, generator=g) for _ in range(3)]
    b = [x + 0.1 * torch.randn(2, 6, 4, generator=g) for x in a]
    ref_h = sum(float(((x.double() - y.double()) ** 2).sum() / (y.double() ** 2).sum()) for x, y in zip(b, a)) / 3
    assert float(hidden_state_loss(b, a)) == pytest.approx(ref_h, rel=1e-5) and ref_h > 0
    assert float(hidden_state_loss(a, a)) == 0.0
    f = [lr_factor(k, 20, 4) for k in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and 0 < f[-1] < 0.01
    assert all(x >= y for x, y in zip(f[4:], f[5:]))
    assert f[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))


# --- the pass ---------------------------------------------------------------------------------------
def test_wanda_then_finetune_keeps_every_zero_exactly(pruned, dense, text_file):
    model = copy.deepcopy(pruned)
    zeros = {n: m.weight == 0 for n, m in linears(model).items()}
    start = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    rep = finetune(model, dense, text_file, loss="kd", weight_decay=0.1).apply(model, ctx_for(model, dense))
    for n, m in linears(model).items():
        assert zeros[n].float().mean() == 0.5, n
        assert torch.all(m.weight[zeros[n]] == 0.0), n
        changed = (m.weight != start[n])[~zeros[n]]
        assert changed.float().mean() > 0.9, n  # the surviving weights did train
    s = rep.summary
    assert s["masked_entries"] == sum(int(z.sum()) for z in zeros.values()) and s["masked_nonzero_after"] == 0
    assert s["teacher"]["mode"] == "live" and s["tokens_seen"] == 4 * 2 * 32 and s["trained_modules"] == 14
    assert not model.training and all(p.requires_grad for p in model.parameters())  # mode and flags restored


@pytest.mark.parametrize("loss,steps,lr,teacher", [("ce", 30, 2.0e-2, "none"), ("kd", 20, 3.0e-3, "live")])
def test_loss_decreases_on_repetitive_text(pruned, dense, text_file, loss, steps, lr, teacher):
    model = copy.deepcopy(pruned)
    rep = finetune(model, dense, text_file, loss=loss, steps=steps, lr=lr, batch_size=4, warmup_ratio=0.1,
                   ).apply(model, ctx_for(model, dense))
    s = rep.summary
    assert s["teacher"]["mode"] == teacher
    assert s["loss_end"] < 0.6 * s["loss_start"], s["loss_curve"]  # measured: ce 5.0 -> 1.4, kd 0.17 -> 0.07
    assert len(s["loss_curve"]) == (15 if steps == 30 else 20) and s["loss_curve"][-1][0] == steps


def test_disk_teacher_cache_at_full_k_matches_live_teacher(pruned, dense, text_file, tmp_path):
    live, disk = copy.deepcopy(pruned), copy.deepcopy(pruned)
    r1 = finetune(live, dense, text_file, steps=2, loss="mix", kd_weight=0.5).apply(live, ctx_for(live, dense))
    r2 = finetune(disk, dense, text_file, steps=2, loss="mix", kd_weight=0.5, teacher_cache="disk",
                  teacher_topk=VOCAB).apply(disk, ctx_for(disk, dense, run_dir=tmp_path / "out"))
    assert r2.summary["teacher"] == {"mode": "disk", "topk": VOCAB, "files_built_this_run": 2}
    a, b = r1.summary["loss_curve"][0][1], r2.summary["loss_curve"][0][1]
    assert abs(a - b) / a < 1e-3  # only the float16 rounding of the cached logits differs
    assert not (tmp_path / "out.ckpt").exists()  # the cache went with the checkpoint folder


def test_lora_merges_and_masks_hold(pruned, dense, text_file):
    model = copy.deepcopy(pruned)
    zeros = {n: m.weight == 0 for n, m in linears(model).items()}
    start = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    rep = finetune(model, dense, text_file, lr=1.0e-2, lora={"rank": 4, "alpha": 8.0},
                   ).apply(model, ctx_for(model, dense))
    assert not [n for n, _ in model.named_modules() if "lora" in n] and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    for n, m in linears(model).items():
        assert torch.all(m.weight[zeros[n]] == 0.0) and not torch.equal(m.weight, start[n]), n
    lora = rep.summary["lora"]
    assert lora["rank"] == 4 and 0 < lora["remask_rel_change_mean"] < 1
    assert rep.summary["trainable_params"] == sum(4 * (m.in_features + m.out_features) for m in linears(model).values())


def test_structural_pruning_then_finetune_keeps_shapes(dense, text_file):
    model = copy.deepcopy(dense)
    WidthPrune(WidthPruneConfig(mlp_ratio=0.5)).apply(model, PassContext(adapter=get_adapter(model), device=torch.device("cpu")))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    start = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    rep = finetune(model, dense, text_file, hidden_weight=0.5).apply(model, ctx_for(model, dense))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert model.config.intermediate_size == 64 and shapes["model.layers.1.mlp.down_proj.weight"] == (64, 64)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, start)
    assert rep.summary["masked_entries"] == 0 and rep.summary["loss_parts_end"]["hidden"] > 0
    model.model.layers = torch.nn.ModuleList([model.model.layers[0]])  # depth pruned: blocks no longer pair up
    with pytest.raises(ConfigError, match="sparse_finetune.hidden_weight: the student has 1 blocks and the teacher 2"):
        finetune(model, dense, text_file, hidden_weight=0.5).apply(model, ctx_for(model, dense))


def test_resume_equals_uninterrupted(pruned, dense, text_file, tmp_path):
    opts = dict(steps=6, checkpoint_every=2, loss="mix", kd_weight=0.3)
    ref = copy.deepcopy(pruned)
    finetune(ref, dense, text_file, **opts).apply(ref, ctx_for(ref, dense, run_dir=tmp_path / "a"))

    first = copy.deepcopy(pruned)
    with pytest.raises(TrainingStopped, match="--resume"):
        finetune(first, dense, text_file, stop_at=3, **opts).apply(first, ctx_for(first, dense, run_dir=tmp_path / "b"))
    assert (tmp_path / "b.ckpt" / "0_sparse_finetune" / "train" / "step_000003" / "state.safetensors").is_file()
    with pytest.raises(CompressError, match="without --resume"):  # another configuration may not continue it
        other = copy.deepcopy(pruned)
        finetune(other, dense, text_file, **{**opts, "kd_weight": 0.4}).apply(
            other, ctx_for(other, dense, run_dir=tmp_path / "b", resume=True))
    resumed = copy.deepcopy(pruned)
    rep = finetune(resumed, dense, text_file, **opts).apply(resumed, ctx_for(resumed, dense, run_dir=tmp_path / "b", resume=True))
    assert rep.summary["resumed_from_step"] == 3 and rep.summary["steps_this_run"] == 3
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert not (tmp_path / "b.ckpt").exists()


def test_stale_checkpoint_without_resume_warns_and_starts_over(pruned, dense, text_file, tmp_path):
    m = copy.deepcopy(pruned)
    with pytest.raises(TrainingStopped):
        finetune(m, dense, text_file, stop_at=1, steps=2).apply(m, ctx_for(m, dense, run_dir=tmp_path / "o"))
    m = copy.deepcopy(pruned)
    rep = finetune(m, dense, text_file, steps=2).apply(m, ctx_for(m, dense, run_dir=tmp_path / "o"))
    assert rep.summary["resumed_from_step"] == 0 and "starting over" in rep.warnings[0]


def test_training_on_the_eval_text_is_refused(pruned, dense, text_file):
    m = copy.deepcopy(pruned)
    ctx = ctx_for(m, dense, eval_texts=[TEXT])
    with pytest.raises(ConfigError, match="sparse_finetune.allow_eval_overlap"):
        finetune(m, dense, text_file, steps=1).apply(m, ctx)
    rep = finetune(m, dense, text_file, steps=1, allow_eval_overlap=True).apply(m, ctx)
    assert rep.summary["steps"] == 1


def test_module_patterns_that_match_nothing_are_errors(pruned, dense, text_file):
    m = copy.deepcopy(pruned)
    with pytest.raises(ConfigError, match="sparse_finetune.modules: 'mlp.nope'"):
        finetune(m, dense, text_file, modules=["mlp.nope"]).apply(m, ctx_for(m, dense))
    rep = finetune(m, dense, text_file, steps=1, modules=["mlp.down_proj"], train_norms=True).apply(m, ctx_for(m, dense))
    assert rep.summary["trained_modules"] == 2 and rep.summary["trainable_params"] == 2 * 64 * 128 + 2 * 2 * 64


BASE = {"model": "m", "output": "out/x", "calibration": {"dataset": "x.jsonl", "nsamples": 4, "seqlen": 64}}


@pytest.mark.parametrize("opts,needle", [
    ({"steps": 0}, "passes[1].sparse_finetune.steps"),
    ({"lr": "1e-4"}, "passes[1].sparse_finetune.lr: Value error, must be a number"),
    ({"loss": "l2"}, "passes[1].sparse_finetune.loss"),
    ({"loss": "mix"}, "kd_weight is required with loss: mix"),
    ({"kd_weight": 0.5}, "kd_weight is only used with loss: mix"),
    ({"loss": "mix", "kd_weight": 1.5}, "passes[1].sparse_finetune.kd_weight"),
    ({"temperature": 0}, "passes[1].sparse_finetune.temperature"),
    ({"teacher_cache": "disk", "hidden_weight": 1.0}, "hidden_weight > 0 needs the teacher's hidden states"),
    ({"teacher_cache": "disk", "loss": "ce"}, "teacher_cache: disk"),
    ({"lora": {"rank": 0}}, "passes[1].sparse_finetune.lora.rank"),
    ({"lora": {"rnk": 4}}, "lora.rnk: unknown key (allowed: rank"),
    ({"autocast": "fp16"}, "passes[1].sparse_finetune.autocast"),
    ({"seqlen": 1}, "passes[1].sparse_finetune.seqlen"),
    ({"modules": []}, "modules: an empty list"),
    ({"stepz": 3}, "stepz: unknown key (allowed: dataset"),
])
def test_bad_config_values_name_the_field(opts, needle):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({**BASE, "passes": [{"wanda": {"sparsity": 0.5}}, {"sparse_finetune": opts}]})
    assert needle in str(e.value)


@pytest.mark.parametrize("passes,needle", [
    ([{"sparse_finetune": {}}], "needs an earlier pruning"),
    ([{"wanda": {"sparsity": 0.5}}, {"gptq": {}}, {"sparse_finetune": {}}], "must come before quantization"),
])
def test_finetune_order_rules(passes, needle):
    with pytest.raises(ConfigError, match=needle):
        recipe_from_dict({**BASE, "passes": passes})


def test_wanda_finetune_gptq_run_resumes_and_keeps_zeros(tmp_path, tiny_llama_dir, small_text, monkeypatch, capsys):
    """Through the CLI: stop mid fine-tuning, continue with --resume, quantize; the INT4 checkpoint keeps the zeros."""
    from compress.cli import main
    from compress.formats.io import load_quantized
    from compress.nn.qlinear import QuantizedLinear

    evaltxt = tmp_path / "eval.txt"
    evaltxt.write_text("An unrelated evaluation text about rivers and hills. " * 100)
    recipe = {"model": str(tiny_llama_dir), "output": str(tmp_path / "out"),
              "calibration": {"dataset": str(small_text), "nsamples": 2, "seqlen": 32},
              "passes": [{"wanda": {"sparsity": 0.5}},
                         {"sparse_finetune": {"dataset": str(small_text), "steps": 4, "seqlen": 32, "batch_size": 2,
                                              "lr": 1.0e-3, "checkpoint_every": 1}},
                         {"gptq": {"bits": 4, "group_size": 32, "act_order": False}}],
              "eval": {"perplexity": {"dataset": str(evaltxt), "seqlen": 32, "max_windows": 1, "original": False}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(SparseFinetune, "stop_at", 2)
    assert main(["run", str(path)]) == 2
    assert "--resume" in capsys.readouterr().err and (tmp_path / "out.ckpt" / "1_sparse_finetune").is_dir()
    monkeypatch.setattr(SparseFinetune, "stop_at", None)
    assert main(["run", str(path), "--resume"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    ft = rep["passes"][1]["summary"]
    assert ft["resumed_from_step"] == 2 and ft["masked_nonzero_after"] == 0 and ft["teacher"]["mode"] == "live"
    assert not (tmp_path / "out.ckpt").exists()
    q, _ = load_quantized(tmp_path / "out")
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 14
    for name, mod in quantized.items():  # the masked half is still exactly zero after GPTQ and packing
        assert (mod.dequantize() == 0).float().mean() >= 0.5, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_disk_cache_masks_and_resume(pruned, dense, text_file, tmp_path):
    """The GPU path: bf16 autocast, the top-k disk cache, CUDA RNG state in checkpoints, masks exact."""
    dev = torch.device("cuda")

    def ctx(m, **kw):
        return PassContext(adapter=get_adapter(m), device=dev, tokenizer=ByteTokenizer(),
                           teacher_factory=lambda: copy.deepcopy(dense).to(dev), **kw)

    opts = dict(steps=6, checkpoint_every=2, autocast="bf16", teacher_cache="disk", teacher_topk=32, lora=None)
    ref = copy.deepcopy(pruned).to(dev)
    zeros = {n: m.weight == 0 for n, m in linears(ref).items()}
    rep = finetune(ref, dense, text_file, **opts).apply(ref, ctx(ref, run_dir=tmp_path / "a"))
    assert rep.summary["masked_nonzero_after"] == 0 and rep.summary["teacher"]["mode"] == "disk"
    for n, m in linears(ref).items():
        assert torch.all(m.weight[zeros[n]] == 0.0) and m.weight.dtype == torch.float32, n
    first = copy.deepcopy(pruned).to(dev)
    with pytest.raises(TrainingStopped):
        finetune(first, dense, text_file, stop_at=3, **opts).apply(first, ctx(first, run_dir=tmp_path / "b"))
    resumed = copy.deepcopy(pruned).to(dev)
    rep = finetune(resumed, dense, text_file, **opts).apply(resumed, ctx(resumed, run_dir=tmp_path / "b", resume=True))
    assert rep.summary["resumed_from_step"] == 3 and rep.summary["teacher"]["files_built_this_run"] == 0
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), n  # cuBLAS may reorder sums between runs
