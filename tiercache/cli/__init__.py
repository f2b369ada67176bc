"""The ``tiercache`` command: ``demo`` (a streaming QA session on the embedded SmolLM2 against
full attention), ``inspect PATH`` (what a store holds) and ``batch`` (offline QA jobs).

This module parses the arguments only; each command's module imports what it needs (torch,
transformers, the model) when it runs, so ``tiercache --help`` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version

from .. import __version__
from ..errors import TiercacheError
from . import batch, demo, inspect
from .options import model_options, stops


def parser() -> argparse.ArgumentParser:
    """The ``tiercache`` argument parser: one subcommand per module of this package."""
    try:
        torch = version("torch")  # from the installed metadata: importing torch takes seconds
    except PackageNotFoundError:
        torch = "not installed"
    p = argparse.ArgumentParser(prog="tiercache", description="Tiered KV cache for long-context LLMs.")
    p.add_argument("--version", action="version", version=f"tiercache {__version__} (torch {torch})")
    commands = p.add_subparsers(dest="command", required=True)
    model = model_options()
    demo.register(commands, model)
    inspect.register(commands)
    batch.register(commands, model)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tiercache`` command; returns its exit code (2: an error, reported on
    stderr as ``tiercache: error: ...``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if hasattr(args, "stop"):
        args.stop = stops(args.stop)
    threads = _torch_threads()
    try:
        return args.func(args)
    except TiercacheError as exc:
        print(f"tiercache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        command = shlex.join(["tiercache", *argv])
        print(f"\ntiercache: interrupted{args.interrupted(args, command) if 'interrupted' in args else ''}",
              file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
    finally:
        if threads is not None:  # main may run inside a longer process (tests, notebooks)
            sys.modules["torch"].set_num_threads(threads)


def _torch_threads() -> int | None:
    """torch's intra-op threads if torch is imported already (a command that loads it sets its
    own), else None."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None
