"""The ``tiercache`` command: --help everywhere, inspect, batch on a tiny jobs file, a short demo,
errors as exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from tiercache.cli import FACTS, main, plant_facts, question_text
from tiercache.io.codec import make_codec
from tiercache.io.contexts import save_kv_context
from tiercache.io.store import DiskStore


@pytest.mark.parametrize("command", [[], ["demo"], ["inspect"], ["batch"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    assert "usage: tiercache" in capsys.readouterr().out


def test_inspect_a_small_store(tmp_path, capsys):
    kv = torch.randn(2, 2, 3, 300, 64)
    with DiskStore(tmp_path, 64 << 20, sync=False) as store:
        save_kv_context(store, "doc-a", kv, make_codec("zstd"))
        save_kv_context(store, "doc-b", kv[:, :, :, :100], make_codec("quant", bits=4))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 contexts, 0 blocks" in out
    assert "doc-a" in out and "codec zstd" in out and "codec quant" in out
    assert "records" in out and "segment seg-" in out


def test_errors_exit_with_code_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "tiercache: error:" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2  # a directory without a store
    assert "no tiercache disk store" in capsys.readouterr().err


@pytest.mark.model
def test_batch_on_a_tiny_jobs_file(smollm2, tmp_path, capsys):
    _, tok = smollm2
    from tiercache.corpus import text_tokens

    document = tok.decode(plant_facts(tok, text_tokens(tok, 300, offset_tokens=8000), FACTS[:1]))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"document": document, "questions": [question_text(FACTS[0])]}) + "\nnot json\n")
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(jobs), "--out", str(out), "--store", str(tmp_path / "store"), "--codec", "zstd",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"{jobs}:2: skipped: bad JSON" in captured.err
    # The progress bar (stderr) shows answer tokens/s and the stored-context and device hit rates.
    assert "answering" in captured.err and "tok/s=" in captured.err and "ctx hit=0/1" in captured.err
    assert "dev hit=" in captured.err
    assert "answered 1 questions" in captured.out and "prefill time saved" in captured.out
    [record] = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["line"] == 1 and FACTS[0].answer in record["answer"]
    args.append("--quiet")
    assert main(args) == 0  # a rerun answers nothing again
    assert "answered 0 questions (1 already answered before)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "store")]) == 0
    assert "context store: 1 documents" in capsys.readouterr().out


@pytest.mark.model
def test_demo_quick(smollm2, capsys):
    assert main(["demo", "--tokens", "300", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "accuracy: tiercache" in out and "full attention" in out
    for word in ("device", "host", "disk codec cachegen", "device hit rate", "tokens/s"):
        assert word in out
