"""Every fenced ``python`` and ``bash`` block of README.md runs as written and prints what the
README shows, in README order, in one directory shared by the blocks (the README's blocks are
meant to be run in order in one directory; ``.venv`` there points at the environment running the
tests, so ``. .venv/bin/activate`` works), importing this checkout's ``tiercache``.

An HTML comment on the line before a block sets how it is run, e.g.
``<!-- readme-test: slow, repo -->``:

- ``slow``: marked ``slow`` (left out of the default run);
- ``repo``: run in the repository root instead (``make`` targets);
- ``xfail(REASON)``: known not to run yet (strict: once it runs, the test fails until the mark
  is removed).

Every code block is followed by a ``text`` block marked ``<!-- readme-test: output -->``: what
it prints on stdout, line by line (trailing spaces aside). In an output line, ``...`` stands for
any text (a timing, a path, a digest); a line that is ``...`` alone stands for any number of
lines (what ``make`` and ``pytest`` print around the lines shown).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
_FLAG = re.compile(r"(\w+)(?:\((.*?)\))?\s*(?:,|$)")
_CODE_FLAGS = {"slow", "repo", "xfail"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based), code, flags, and the
    output it must print (the ``text`` block after it)."""

    lang: str
    line: int
    code: str
    flags: dict[str, str] = field(default_factory=dict)
    output: str | None = None


def readme_blocks(text: str) -> list[Block]:
    """The python and bash blocks of ``text``, with the flags of the comment just before each and
    the output block that follows each. ``ValueError`` for an unknown flag, an output block that
    follows no code block, or a code block without an output block."""
    blocks: list[Block] = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        mark = _MARK.fullmatch(before[-1].strip()) if before else None
        flags = {f.group(1): f.group(2) or "" for f in _FLAG.finditer(mark.group(1))} if mark else {}
        where = f"README.md line {len(before) + 1}"
        if m.group(1) == "text" and "output" in flags:
            if set(flags) != {"output"}:
                raise ValueError(f"{where}: an output block takes no other readme-test flags")
            if not blocks or blocks[-1].output is not None:
                raise ValueError(f"{where}: an output block must follow a python or bash block")
            blocks[-1] = Block(**{**vars(blocks[-1]), "output": m.group(2)})
        elif m.group(1) in ("python", "bash"):
            unknown = set(flags) - _CODE_FLAGS
            if unknown:
                raise ValueError(f"{where}: unknown readme-test flags {sorted(unknown)}")
            blocks.append(Block(m.group(1), text[: m.start(2)].count("\n") + 1, m.group(2), flags))
    missing = [b.line for b in blocks if b.output is None]
    if missing:
        raise ValueError(f"README.md lines {missing}: a code block without its output block "
                         "(<!-- readme-test: output --> and a text block after it)")
    return blocks


def output_pattern(expected: str) -> re.Pattern:
    """The regular expression ``expected`` (an output block) stands for: each line literally, but
    ``...`` for any text within a line and a lone ``...`` line for any lines."""
    parts = []
    for line in expected.splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.compile("".join(parts))


def prints(expected: str, stdout: str) -> bool:
    """Whether ``stdout`` is what ``expected`` (an output block) shows, every line of it."""
    text = "".join(line.rstrip() + "\n" for line in stdout.splitlines())
    return output_pattern(expected).fullmatch(text) is not None


def test_blocks_flags_and_outputs_are_found():
    text = ("x\n<!-- readme-test: slow, xfail(a, b) -->\n```bash\necho hi\n```\n"
            "<!-- readme-test: output -->\n```text\nhi\n```\n\n```python\nprint(1)\n```\n"
            "<!-- readme-test: output -->\n```text\n1\n```\n```text\nnot code\n```\n")
    assert readme_blocks(text) == [Block("bash", 4, "echo hi\n", {"slow": "", "xfail": "a, b"}, "hi\n"),
                                   Block("python", 12, "print(1)\n", {}, "1\n")]
    with pytest.raises(ValueError, match="unknown readme-test flags"):
        readme_blocks("<!-- readme-test: fast -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="without its output block"):
        readme_blocks("```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="must follow a python or bash block"):
        readme_blocks("<!-- readme-test: output -->\n```text\nhi\n```\n")


def test_output_blocks_check_every_line():
    assert prints("a ... s\nb\n", "a 1.5 s\nb\n")
    assert prints("a ... s\nb\n", "a 1.5 s  \nb")  # trailing spaces and the last newline aside
    assert not prints("a ... s\nb\n", "a 1.5 s\nb\nc\n")  # a line more
    assert not prints("a ... s\nb\n", "a 1.5 s\n")  # a line less
    assert not prints("a ... s\n", "a 1.5 s\nx s\n")  # "..." stays within its line
    assert prints("...\nresult ...\n...\n", "noise\nmore\nresult 3\ntail\n")
    assert prints("...\nresult ...\n", "result 3\n")
    assert not prints("...\nresult ...\n", "noise\n")
    assert prints("(a+b) [x] ...\n", "(a+b) [x] 2\n")  # regex characters are literal


def _params() -> list:
    params = []
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        marks = [pytest.mark.slow] if "slow" in block.flags else []
        if "load_default_model" in block.code or "tiercache " in block.code:
            marks.append(pytest.mark.model)
        if "xfail" in block.flags:
            marks.append(pytest.mark.xfail(strict=True, reason=block.flags["xfail"]))
        params.append(pytest.param(block, marks=marks, id=f"{block.lang}-line{block.line}"))
    return params


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory) -> Path:
    """The one directory the README's blocks run in, in order."""
    path = tmp_path_factory.mktemp("readme")
    (path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return path


@pytest.mark.parametrize("block", _params())
def test_readme_block_prints_what_the_readme_shows(block: Block, readme_dir):
    cwd = ROOT if "repo" in block.flags else readme_dir
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if block.lang == "python":
        # Blank lines first, so that a traceback's line numbers are README.md's.
        command = [sys.executable, "-c", "\n" * (block.line - 1) + block.code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"README.md line {block.line}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert prints(block.output, out.stdout), (f"README.md line {block.line} printed:\n{out.stdout[-3000:]}\n"
                                              f"where the README shows:\n{block.output}")
