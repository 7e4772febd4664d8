"""Peak memory and time of per-block vs in-memory compression, on a random-weight checkpoint of a given shape.

Writes a Llama-shaped checkpoint with random weights to disk one block at a time (so writing a 13B shape does
not need 13B of memory), then runs GPTQ on it in fresh processes, once per strategy, and reports wall time
per phase, peak host RSS (VmHWM), peak GPU memory, and the issue's bound: peak RSS above the bare process
(imports) within 1.5 x (one block + embeddings/head + calibration activations + the largest group's Hessians).

    # CPU, small shape (minutes)
    python bench/speed/large_model.py --layers 24 --hidden 512 --intermediate 1536 --nsamples 8 --seqlen 256
    # GPU, a Llama-2-13B shape (40 x 5120, 13824), 128 x 2048 calibration
    python bench/speed/large_model.py --layers 40 --hidden 5120 --intermediate 13824 --heads 40 --kv-heads 40 \\
        --device cuda --nsamples 128 --seqlen 2048 --strategies per_block
    # any local model folder instead of a random one
    python bench/speed/large_model.py --model ~/.cache/compress/models/HuggingFaceTB--SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO.parent / "shared" / "assets" / "data" / "text" / "dolly_hhrlhf_train_small.jsonl"

_CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from compress.streaming import peak_rss_bytes
if sys.argv[1] == "baseline":
    import compress.runner, transformers.models.llama.modeling_llama  # what every run imports
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()})); sys.exit(0)
from compress.recipe import load_recipe
from compress.runner import run
t0 = time.perf_counter()
res = run(load_recipe(sys.argv[1]))
rep = res.report
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "wall_s": round(time.perf_counter() - t0, 2),
                  "pass_s": rep["passes"][0]["seconds"], "strategy": rep["load"]["strategy"],
                  "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))
"""


def write_random_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                            seed: int = 0) -> None:
    """A Llama checkpoint of random float32 weights (std 0.02), one shard per block, written block by block."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from compress.default_model import prepare_default_model

    tok = AutoTokenizer.from_pretrained(prepare_default_model())
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    n = layers + 1
    weight_map = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rnd(heads * hd, hidden), p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden),
             p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
             p + "mlp.gate_proj.weight": rnd(intermediate, hidden), p + "mlp.up_proj.weight": rnd(intermediate, hidden),
             p + "mlp.down_proj.weight": rnd(hidden, intermediate),
             p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        del t
    t = {"model.embed_tokens.weight": rnd(len(tok), hidden), "model.norm.weight": torch.ones(hidden),
         "lm_head.weight": rnd(len(tok), hidden)}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(t, folder / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)


def bound_bytes(cfg: dict, nsamples: int, seqlen: int, dtype_bytes: int = 4) -> dict[str, int]:
    """The terms of the issue's bound for one Llama block (float32 weights, float32 Hessians)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    block = (h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h) * dtype_bytes
    outside = (cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2) + h) * dtype_bytes
    acts = 2 * nsamples * seqlen * h * dtype_bytes  # a block's inputs and outputs
    hess = max(3 * h * h, heads * hd * heads * hd, 2 * h * h, i * i) * 4  # the largest group's observers
    return {"block": block, "outside": outside, "activations": acts, "hessians": hess,
            "sum": block + outside + acts + hess}


def child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), **__import__("os").environ})
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local model folder (default: write a random one of the shape below)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategies", default="per_block,in_memory")
    ap.add_argument("--workdir", help="where the checkpoint and outputs go (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    import yaml

    work = Path(a.workdir or tempfile.mkdtemp(prefix="large-model-"))
    model = Path(a.model).expanduser() if a.model else work / "random"
    if not a.model and not (model / "config.json").exists():
        write_random_checkpoint(model, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads)
    cfg = json.loads((model / "config.json").read_text())
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    terms = bound_bytes(cfg, a.nsamples, a.seqlen)
    base = child(["baseline"])["peak_rss_bytes"]
    rows = []
    for strategy in a.strategies.split(","):
        out = work / f"out-{strategy}"
        recipe = {"model": str(model), "output": str(out), "load": {"strategy": strategy, "device": a.device},
                  "calibration": {"dataset": str(CALIB), "nsamples": a.nsamples, "seqlen": a.seqlen},
                  "passes": [{"gptq": {"bits": 4, "group_size": a.group_size}}], "save": {"overwrite": True}}
        rp = work / f"{strategy}.yaml"
        rp.write_text(yaml.safe_dump(recipe))
        r = child([str(rp)])
        r["rss_over_base_bytes"] = r["peak_rss_bytes"] - base
        r["bound_bytes"] = int(1.5 * terms["sum"])
        rows.append(r)
    mib = 2 ** 20
    print(f"model {model.name}: {cfg['num_hidden_layers']} x hidden {cfg['hidden_size']}, weights {weights / mib:.0f} MiB "
          f"(= {weights / terms['block']:.1f} blocks); bound terms (MiB): "
          + ", ".join(f"{k} {v / mib:.1f}" for k, v in terms.items()) + f"; bare process {base / mib:.0f} MiB")
    print(f"{'strategy':<10} {'wall s':>8} {'gptq s':>8} {'peak RSS MiB':>13} {'above bare':>11} {'1.5x bound':>11} {'GPU peak MiB':>13}")
    for r in rows:
        gpu = f"{r['gpu_peak_bytes'] / mib:.0f}" if r["gpu_peak_bytes"] else "-"
        print(f"{r['strategy']:<10} {r['wall_s']:>8.1f} {r['pass_s']:>8.1f} {r['peak_rss_bytes'] / mib:>13.0f} "
              f"{r['rss_over_base_bytes'] / mib:>11.0f} {r['bound_bytes'] / mib:>11.0f} {gpu:>13}")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "model": str(model),
                                            "config": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size",
                                                                           "intermediate_size", "vocab_size")},
                                            "weights_bytes": weights, "bound_terms": terms, "bare_rss_bytes": base,
                                            "nsamples": a.nsamples, "seqlen": a.seqlen, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
