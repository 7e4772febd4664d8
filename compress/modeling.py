"""Loading models and tokenizers: hub id, local folder, or .gguf file; safetensors only by default."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.default_model import DEFAULT_MODEL_ID, is_prepared, prepared_path
from compress.errors import CompressError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # where the weights came from (resolved path or hub id)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{keyword: cache}`` for ``model.forward``, which fills the cache in place. transformers 5.25
    renamed ``past_key_values`` to ``cache`` (the old name still works there but warns of its removal
    in 5.40); older versions, e.g. the GPU machine's 5.17, know only ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return {"cache" if "cache" in params else "past_key_values": cache}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"load.device: {device!r} asked for but no CUDA GPU is available; use cpu")
    return torch.device(device)


def resolve_model_path(model: str) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None). Local paths that do not exist are an error."""
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CompressError(f"model file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), None
    if model.startswith((".", "/", "~")) or p.suffix:
        raise CompressError(f"model path not found: {p}")
    if model == DEFAULT_MODEL_ID and is_prepared():
        local = prepared_path()
        log.info("using the prepared local copy of %s at %s", model, local)
        return str(local), None
    return model, None  # a hub id


def check_weights_format(folder: Path, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = [f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise CompressError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles)[:3])}); loading pickle can run "
            "arbitrary code. Convert to safetensors, or opt in with `load: {allow_pickle: true}` in the "
            "recipe (CLI: --allow-pickle).")
    if not pickles:
        raise CompressError(f"{folder} has no model weights (*.safetensors)")


def load_model(model: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
               allow_pickle: bool = False, revision: str | None = None, tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM and (unless ``tokenizer`` is False: then ``LoadedModel.tokenizer`` is None)
    its tokenizer. Weights stay on ``device``; the caller may offload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise CompressError(f"load.dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
    target, gguf = resolve_model_path(model)
    if gguf is None and Path(target).is_dir():
        check_weights_format(Path(target), allow_pickle)
    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision)
    try:
        tok = AutoTokenizer.from_pretrained(target, gguf_file=gguf, **kwargs) if tokenizer else None
        mdl = AutoModelForCausalLM.from_pretrained(
            target, gguf_file=gguf, dtype=_DTYPES[dtype],
            use_safetensors=None if (allow_pickle or gguf) else True, **kwargs)
    except OSError as e:
        hint = ""
        if not Path(target).exists():
            hint = (" (no local folder of that name; the hub is unreachable or the id is wrong. Pass a local "
                    "folder, or for the default model run `compress prepare-default`)")
        raise CompressError(f"could not load model {model!r}: {str(e).splitlines()[0]}{hint}") from None
    if gguf is not None:
        # transformers dequantizes GGUF tensors to floats but keeps a quantizer marker that blocks
        # save_pretrained; the weights are plain floats now, so the marker is dropped.
        mdl.hf_quantizer = None
        if hasattr(mdl.config, "quantization_config"):
            del mdl.config.quantization_config
    mdl.eval()
    mdl.to(resolve_device(device))
    return LoadedModel(model=mdl, tokenizer=tok, source=target if gguf is None else str(Path(target) / gguf))
