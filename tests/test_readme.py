"""Every fenced ``python`` and ``bash`` block of README.md runs as written, each in a fresh process
and a fresh temporary directory (with ``.venv`` there pointing at the environment running the
tests, so ``. .venv/bin/activate`` works), importing this checkout's ``tiercache``.

An HTML comment on the line before a block sets how it is run, e.g.
``<!-- readme-test: slow, expect(Biscuit.) -->``:

- ``slow``: marked ``slow`` (left out of the default run);
- ``repo``: run in the repository root instead of a temporary directory (``make`` targets);
- ``expect(TEXT)``: its output must contain TEXT;
- ``xfail(REASON)``: known not to run yet (strict: once it runs, the test fails until the mark
  is removed).
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


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, first code line (1-based), code and flags."""

    lang: str
    line: int
    code: str
    flags: dict[str, str] = field(default_factory=dict)


def readme_blocks(text: str) -> list[Block]:
    """The python and bash blocks of ``text`` with the flags of the comment just before each."""
    blocks = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("python", "bash"):
            continue
        before = text[: m.start()].rstrip().splitlines()
        mark = _MARK.fullmatch(before[-1].strip()) if before else None
        flags = {f.group(1): f.group(2) or "" for f in _FLAG.finditer(mark.group(1))} if mark else {}
        unknown = set(flags) - {"slow", "repo", "expect", "xfail"}
        if unknown:
            raise ValueError(f"README.md line {len(before)}: unknown readme-test flags {sorted(unknown)}")
        blocks.append(Block(m.group(1), text[: m.start(2)].count("\n") + 1, m.group(2), flags))
    return blocks


def test_blocks_and_flags_are_found():
    text = ("x\n<!-- readme-test: slow, expect(a, b) -->\n```bash\necho hi\n```\n\n```python\nprint(1)\n```\n"
            "```text\nnot code\n```\n")
    assert readme_blocks(text) == [Block("bash", 4, "echo hi\n", {"slow": "", "expect": "a, b"}),
                                   Block("python", 8, "print(1)\n")]
    with pytest.raises(ValueError, match="unknown readme-test flags"):
        readme_blocks("<!-- readme-test: fast -->\n```bash\ntrue\n```\n")


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


@pytest.mark.parametrize("block", _params())
def test_readme_block_runs_as_written(block: Block, tmp_path):
    cwd = ROOT if "repo" in block.flags else tmp_path
    if cwd == tmp_path:
        (tmp_path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
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
    if "expect" in block.flags:
        assert block.flags["expect"] in out.stdout, f"README.md line {block.line} printed:\n{out.stdout[-2000:]}"
