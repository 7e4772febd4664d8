"""Per-block loading, several gloo processes, and --resume after kill -9 (tiny models from configs, CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DOLLY, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A saved 6-block tiny Llama with tied embeddings and the real tokenizer."""
    path = tmp_path_factory.mktemp("deep") / "tiny-deep"
    m = tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=6, tie_word_embeddings=True)
    m.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _recipe(model: Path, out: Path, strategy: str, pass_: dict, nsamples: int = 5, seqlen: int = 32) -> dict:
    return {"model": str(model), "output": str(out), "load": {"strategy": strategy},
            "calibration": {"dataset": str(DOLLY), "nsamples": nsamples, "seqlen": seqlen}, "passes": [pass_]}


@pytest.mark.parametrize("pass_", [{"gptq": {"group_size": 32}}, {"sparsegpt": {"sparsity": 0.5}}])
def test_per_block_equals_in_memory(deep_dir, tmp_path, pass_):
    from transformers import AutoModelForCausalLM

    from compress.recipe import recipe_from_dict
    from compress.runner import run

    a = run(recipe_from_dict(_recipe(deep_dir, tmp_path / "mem", "in_memory", pass_)))
    b = run(recipe_from_dict(_recipe(deep_dir, tmp_path / "blk", "per_block", pass_)))
    ta, tb = _tensors(a.output), _tensors(b.output)
    assert sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "lm_head.weight" not in tb  # tied: re-tied on load
    assert b.report["load"]["strategy"] == "per_block" and b.report["load"]["peak_rss_bytes"] > 0
    index = json.loads((b.output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 7  # one shard per block + one for the rest
    assert not (tmp_path / ".blk.partial").exists()
    if "sparsegpt" in pass_:  # dense output: plain from_pretrained, tied head, every tensor real
        m = AutoModelForCausalLM.from_pretrained(b.output)
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert not any(p.is_meta for p in m.parameters())


def test_meta_model_rebuilds_rotary_and_refuses_bad_recipes(deep_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.adapters import get_adapter
    from compress.errors import ConfigError
    from compress.recipe import recipe_from_dict
    from compress.streaming import ShardedCheckpoint, build_meta_model, load_outside_blocks, meta_tensors
    from compress.streaming_run import choose_strategy

    ref = AutoModelForCausalLM.from_pretrained(deep_dir)
    m = build_meta_model(deep_dir)
    adapter = get_adapter(m)
    load_outside_blocks(m, adapter, ShardedCheckpoint(deep_dir), torch.float32)
    assert torch.equal(m.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert meta_tensors(m) and all(n.startswith("model.layers.") for n in meta_tensors(m))
    two = _recipe(deep_dir, tmp_path / "o", "per_block", {"wanda": {"sparsity": 0.5}})
    two["passes"].append({"gptq": {"group_size": 32}})
    with pytest.raises(ConfigError, match="exactly one pass"):
        choose_strategy(recipe_from_dict(two), torch.device("cpu"))
    auto = recipe_from_dict(_recipe(deep_dir, tmp_path / "o", "auto", {"wanda": {"sparsity": 0.5}}))
    strategy, reason = choose_strategy(auto, torch.device("cpu"))
    assert strategy == "in_memory" and "fit" in reason


# --- several processes -------------------------------------------------------------------------------
def _observe64(handler_cls):
    """A handler whose Hessians accumulate in float64, so that 1 and 2 processes agree to the last code."""
    from compress.observers import HessianObserver

    class H64(handler_cls):
        def observer(self, name, module):
            return HessianObserver(module.in_features, self.device, torch.float64) if self.selected(name, module) else None
    return H64


def _compress(model, kind: str, comm, ids):
    from compress.adapters import get_adapter
    from compress.algos.gptq import gptq_quantize
    from compress.passes.quantize import QuantConfig, QuantHandler
    from compress.passes.pruning import PruneHandler
    from compress.passes.wanda import ActNormObserver, WandaConfig
    from compress.algos.sparsity import mask_for, wanda_scores
    from compress.sequential import run_sequential

    adapter = get_adapter(model)
    dev = torch.device("cpu")
    if kind == "gptq":
        def q(W, H):
            r = gptq_quantize(W, H.float(), 4, 32, True, True, True, 0.01, 128)
            return r.codes, r.scales, r.zeros, r.g_idx, r.weight, {}
        handler = _observe64(QuantHandler)(QuantConfig(group_size=32), q, dev)
    else:
        cfg = WandaConfig(sparsity=0.5)

        def prune(name, W, obs, s):
            keep = mask_for(wanda_scores(W, obs.sq), s, cfg.mask, per_row=True)
            return W * keep, keep, {}
        handler = PruneHandler(cfg, None, prune, lambda m: ActNormObserver(m.in_features, dev))
    return run_sequential(model, adapter, ids, handler, dev, comm=comm)


def _worker(rank: int, world: int, port: int, out: str, kind: str, fail_rank: int) -> None:
    import torch.distributed as dist

    from compress.distributed import Comm, PeerFailed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm = Comm(rank, world, torch.device("cpu"))
    model = tiny_model("llama", vocab_size=64)
    ids = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    if rank == fail_rank:
        model.model.layers[1].mlp.down_proj = torch.nn.Identity()  # not a Linear: a user error on this rank
    try:
        _compress(model, kind, comm, ids)
    except PeerFailed:
        sys.exit(3)
    except Exception as e:  # noqa: BLE001 - the failing rank reports, as the CLI would
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["gptq", "wanda"])
def test_two_gloo_processes_equal_one(tmp_path, kind):
    import torch.multiprocessing as mp

    out = tmp_path / "two.safetensors"
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(out), kind, -1), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 60
    while not ctx.join(timeout=1):
        assert time.time() < deadline, "2-process run timed out"
    model = tiny_model("llama", vocab_size=64)
    ids = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    _compress(model, kind, None, ids)
    two = load_file(out)
    one = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert sorted(one) == sorted(two)
    assert any(k.endswith(".qweight") for k in one) == (kind == "gptq")
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_failure_on_one_process_stops_all(tmp_path):
    """Rank 1 hits a user error; rank 0 stops at its next collective; the error is printed once."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_streaming as t, "
            f"torch.multiprocessing as mp; mp.start_processes(t._worker, args=(2, {_free_port()}, "
            f"{str(tmp_path / 'x')!r}, 'gptq', 1), nprocs=2, start_method='spawn')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode != 0
    assert res.stderr.count("error: model.layers.1.mlp.down_proj is Identity, not nn.Linear") == 1
    assert not (tmp_path / "x").exists()


# --- resume -------------------------------------------------------------------------------------------
def test_resume_after_kill_is_bit_identical(tmp_path, smollm2_tokenizer):
    import yaml

    model = tmp_path / "m"
    m = tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=8, hidden_size=128,
                   intermediate_size=256)
    m.save_pretrained(model)
    smollm2_tokenizer.save_pretrained(model)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def recipe(out: str) -> Path:
        p = tmp_path / f"{out}.yaml"
        p.write_text(yaml.safe_dump(_recipe(model, tmp_path / out, "per_block", {"gptq": {"group_size": 32}},
                                            nsamples=16, seqlen=128)))
        return p

    cmd = [sys.executable, "-m", "compress.cli", "-q", "run"]
    subprocess.run(cmd + [str(recipe("full"))], check=True, env=env, timeout=120, capture_output=True)
    progress = tmp_path / ".cut.partial" / "progress.json"
    proc = subprocess.Popen(cmd + [str(recipe("cut"))], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file():
            try:
                done = len(json.loads(progress.read_text())["blocks"])
            except (ValueError, KeyError):
                done = 0
            if done >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert 2 <= done < 8 and not (tmp_path / "cut").exists()
    res = subprocess.run(cmd + [str(recipe("cut")), "--resume"], env=env, timeout=120, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "cut")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    rep = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert len(rep["passes"][0]["modules"]) == 8 * 7  # stats of the blocks finished before the kill are kept
