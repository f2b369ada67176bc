"""``tiercache demo``, ``batch`` and ``inspect`` on a checkpoint of every family the README lists,
with and without sliding-window (or chunked) layers: a tiny random model saved with a tokenizer
built here (``helpers.tiny_tokenizer``), run through the command line's ``main``. The default run
takes a representative few (full attention, sliding layers, soft-capping on eager attention);
``-m slow`` the rest."""

from __future__ import annotations

import json

import pytest

from helpers import WINDOW, read_answers, save_tiny_checkpoint, tiny_tokenizer
from tiercache.cli import main

pytestmark = pytest.mark.model

#: name: (helpers.FAMILIES key, config settings), per README family, with and without windows.
CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "mistral-window": ("mistral-window", {}),
    "qwen2": ("qwen2-window", dict(use_sliding_window=False)),
    "qwen2-window": ("qwen2-window", {}),
    "qwen3": ("qwen3-window", dict(use_sliding_window=False)),
    "qwen3-window": ("qwen3-window", {}),
    "gemma": ("gemma", {}),
    "gemma2-window": ("gemma2", {}),  # soft-capped: eager attention, its layers alternate sliding and full
    "gemma3": ("gemma3", dict(layer_types=["full_attention", "full_attention"])),
    "gemma3-window": ("gemma3", {}),
    "phi3": ("phi3", {}),
    "phi3-window": ("phi3", dict(sliding_window=WINDOW)),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "smollm3": ("smollm3", dict(use_sliding_window=False)),
    "smollm3-window": ("smollm3", {}),
    "llama4-chunked": ("llama4", {}),
    "llama4": ("llama4", dict(attention_chunk_size=None)),
    "gpt2": ("gpt2", {}),
}
DEFAULT_RUN = ("llama", "qwen2-window", "gemma2-window")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DEFAULT_RUN else [pytest.mark.slow])
                                  for n in CASES])
def test_demo_batch_and_inspect_run_every_family(name, tokenizer, tmp_path, capsys):
    family, settings = CASES[name]
    checkpoint = str(save_tiny_checkpoint(tmp_path / name, family, tokenizer, **settings))
    store = tmp_path / "demo"
    assert main(["demo", "--model", checkpoint, "--tokens", "120", "--max-new-tokens", "3", "--store",
                 str(store), "--device", "cpu"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "accuracy: tiercache" in out and f"tiercache inspect {store}" in out
    assert main(["inspect", str(store), "--model", checkpoint]) == 0
    out = capsys.readouterr().out
    assert f"reopens with {name}: yes" in out and f"loads into {name}: yes" in out
    assert all(len(line) <= 100 for line in out.splitlines()), out
    jobs, answers = tmp_path / "jobs.jsonl", tmp_path / "answers.jsonl"
    jobs.write_text(json.dumps({"document": "The vault code is 58203. The lamp turned slowly. " * 4,
                                "questions": ["The vault code is", "The lamp"]}))
    assert main(["batch", str(jobs), "--out", str(answers), "--store", str(tmp_path / "contexts"), "--model",
                 checkpoint, "--max-new-tokens", "3", "--stop", "", "--quiet"]) == 0
    assert "answered 2 questions" in capsys.readouterr().out
    assert [r["index"] for r in read_answers(answers)] == [0, 1]
    assert main(["inspect", str(tmp_path / "contexts"), "--model", checkpoint]) == 0
    out = capsys.readouterr().out
    assert "context store: 1 documents" in out and f"loads into {name}: yes" in out
