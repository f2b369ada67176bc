"""ContextStore and the batch runner on SmolLM2-135M-Instruct (fp32, CPU): encode/load round trip,
loading in another process, resuming an interrupted run, bad job lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tiercache import RetrievalConfig, TierConfig
from tiercache.contexts.kv import content_key
from tiercache.contexts.store import ContextStore, prefill
from tiercache.corpus import text_tokens
from tiercache.evaluation import FACTS, plant_facts, question_text
from tiercache.generation import ask_cache
from tiercache.jobs import read_jobs, run_batch
from helpers import kv_bytes, read_answers

pytestmark = pytest.mark.model

NEW_TOKENS = 6


def qa_config(model, tokens: int = 1024) -> TierConfig:
    """The device holds a quarter of the KV; questions attend the whole document (retrieval at
    partial budgets is measured elsewhere: here the stored KV and the runner are under test)."""
    kv = kv_bytes(model, tokens)
    return TierConfig(device_budget_bytes=kv // 4, host_budget_bytes=2 * kv, block_tokens=32, dtype=torch.float32,
                      device="cpu", retrieval=RetrievalConfig(budget=1.0))


@pytest.fixture(scope="module")
def documents(smollm2):
    """Two real-text documents (~400 tokens) with one planted fact each."""
    _, tok = smollm2
    return [tok.decode(plant_facts(tok, text_tokens(tok, 400, offset_tokens=off), [fact]))
            for off, fact in ((2000, FACTS[0]), (6000, FACTS[2]))]


def test_encode_load_round_trip_equals_a_fresh_prefill(smollm2, documents, tmp_path):
    model, tok = smollm2
    question = question_text(FACTS[0])
    with ContextStore(tmp_path, model, tok, codec="zstd", config=qa_config(model)) as store:
        key = store.encode(documents[0])
        assert key == content_key(store.fingerprint.digest, store.tokens(documents[0]))
        assert store.encode(documents[0]) == key and (store.hits, store.misses) == (1, 1), "encoded twice"
        info = store.info(key)
        assert info.prefill_seconds > 0 and info.stored_bytes < info.raw_bytes
        fresh = prefill(model, store.config, store.tokens(documents[0]))
        loaded = store.load(key)
        assert torch.equal(loaded.export_kv(), fresh.export_kv()), "zstd is lossless"
        expected = ask_cache(model, tok, fresh, question, NEW_TOKENS)
        assert ask_cache(model, tok, loaded, question, NEW_TOKENS) == expected
        assert FACTS[0].answer in expected
        fresh.close()
        loaded.close()
    # Another process loads the stored KV (the same content key) and answers the same.
    script = (
        "import sys; sys.path.insert(0, sys.argv[4])\n"
        "from test_batch import NEW_TOKENS, qa_config\n"
        "from tiercache.contexts.store import ContextStore\n"
        "from tiercache.models import load_default_model\n"
        "from tiercache.generation import ask_cache\n"
        "model, tok = load_default_model()\n"
        "with ContextStore(sys.argv[1], model, tok, codec='zstd', config=qa_config(model)) as store:\n"
        "    cache = store.load(store.key(sys.argv[2]))\n"
        "    print(ask_cache(model, tok, cache, sys.argv[3], NEW_TOKENS)); print(store.misses)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), documents[0], question,
                          os.path.dirname(__file__)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-2000:]
    answer, misses = out.stdout.strip().splitlines()[-2:]
    assert answer == expected and misses == "0"


def write_jobs(path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_interrupted_run_resumes_without_redoing_anything(smollm2, documents, tmp_path):
    model, tok = smollm2
    (tmp_path / "doc.txt").write_text(documents[1])
    jobs = tmp_path / "jobs.jsonl"
    q0, q2 = question_text(FACTS[0]), question_text(FACTS[2])
    write_jobs(jobs, [
        {"document": documents[0], "questions": [q0, "\nWhat is this text about? It is about"]},
        {"path": "doc.txt", "questions": [q2]},
        {"document": documents[0], "questions": [q0]},
    ])
    out = tmp_path / "answers.jsonl"

    class Stop(Exception):
        pass

    def stop_after_two(record: dict) -> None:
        if len(read_answers(out)) == 2:
            raise Stop

    with ContextStore(tmp_path / "store", model, tok, codec="zstd", config=qa_config(model)) as store, pytest.raises(Stop):
        run_batch(jobs, out, store, max_new_tokens=NEW_TOKENS, progress=False, on_answer=stop_after_two)
    assert len(read_answers(out)) == 2
    with open(out, "a") as f:  # a crash in the middle of writing the third answer
        f.write('{"line": 2, "question": "\\nWhat is the va')
    with ContextStore(tmp_path / "store", model, tok, codec="zstd", config=qa_config(model)) as store:
        report = run_batch(jobs, out, store, max_new_tokens=NEW_TOKENS, progress=False)
    got = read_answers(out)
    pairs = [(r["line"], r["question"]) for r in got]
    assert len(pairs) == len(set(pairs)) == 4, pairs
    assert report.already_answered == 2 and report.answered == 2
    assert report.encoded == 1 and report.reused == 1, "document 1 was stored by the first run"
    by_pair = {(r["line"], r["question"]): r["answer"] for r in got}
    assert FACTS[0].answer in by_pair[(1, q0)]
    assert by_pair[(3, q0)] == by_pair[(1, q0)], "the same stored KV answers the same"
    assert report.saved_seconds != 0 and report.load_seconds > 0


def test_bad_job_lines_are_reported_with_line_numbers_and_skipped(smollm2, documents, tmp_path, capsys):
    model, tok = smollm2
    jobs = tmp_path / "jobs.jsonl"
    long_doc = tok.decode(text_tokens(tok, 700, offset_tokens=100))
    write_jobs(jobs, [
        '{"document": "unterminated',
        {"questions": ["Who?"]},
        {"document": documents[1], "questions": []},
        {"path": "missing.txt", "questions": ["Who?"]},
        "",
        {"document": long_doc, "questions": ["What?"]},
        [1, 2],
        {"document": documents[1], "questions": [question_text(FACTS[2])]},
    ])
    valid, bad = read_jobs(jobs)
    assert [j.line for j in valid] == [6, 8]
    assert [n for n, _ in bad] == [1, 2, 3, 4, 7]
    out = tmp_path / "answers.jsonl"
    with ContextStore(tmp_path / "store", model, tok, codec="zstd", max_tokens=600,
                      config=qa_config(model)) as store:
        report = run_batch(jobs, out, store, max_new_tokens=NEW_TOKENS, progress=False)
    reasons = dict(report.bad_lines)
    assert sorted(reasons) == [1, 2, 3, 4, 6, 7]
    assert "JSON" in reasons[1] and "document" in reasons[2] and "questions" in reasons[3]
    assert "missing.txt" in reasons[4] and "max_tokens=600" in reasons[6]
    err = capsys.readouterr().err
    assert f"{jobs}:6: skipped" in err and f"{jobs}:1: skipped" in err
    assert [r["line"] for r in read_answers(out)] == [8]


def test_sigkilled_batch_command_resumes_to_the_uninterrupted_output(smollm2, tmp_path, capsys):
    """``tiercache batch`` killed with SIGKILL after some answers are written, then rerun: the
    finished answers are kept and not redone, no line is lost, duplicated or torn, and the final
    output equals that of an uninterrupted run."""
    import signal
    import time

    from tiercache.cli import main

    _, tok = smollm2
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, [{"document": tok.decode(text_tokens(tok, 64, offset_tokens=2000 + 400 * i)),
                       "questions": [f"\nQuestion {j}: what is this text about? Answer:" for j in range(3)]}
                      for i in range(4)])

    def args(out, store):
        return ["batch", str(jobs), "--out", str(out), "--store", str(store), "--codec", "zstd",
                "--max-new-tokens", "3", "--quiet"]

    def complete_lines(path) -> int:
        return path.read_bytes().count(b"\n") if path.exists() else 0

    out, store = tmp_path / "answers.jsonl", tmp_path / "store"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tiercache.cli", *args(out, store)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while complete_lines(out) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = out.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]
    assert 4 <= kept.count(b"\n") < 12, "killed mid-run"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run's arithmetic, so that greedy answers agree bit for bit
    try:
        capsys.readouterr()
        assert main(args(out, store)) == 0  # the rerun resumes
        resumed = capsys.readouterr().out
        assert main(args(tmp_path / "reference.jsonl", tmp_path / "reference-store")) == 0
    finally:
        torch.set_num_threads(threads)
    done = kept.count(b"\n")
    assert f"answered {12 - done} questions ({done} already answered before)" in resumed, resumed
    assert ", 0 found stored" not in resumed, f"the documents encoded before the kill must be reused: {resumed}"
    after = out.read_bytes()
    assert after.startswith(kept), "answers written before the kill must stay as they were"
    got, reference = read_answers(out), read_answers(tmp_path / "reference.jsonl")
    pairs = [(r["line"], r["question"]) for r in got]
    assert len(pairs) == len(set(pairs)) == 12, "an answer was lost or duplicated"
    assert got == reference, "the resumed output differs from an uninterrupted run's"


def test_undecodable_and_duplicate_lines_are_skipped_with_their_numbers(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    good = json.dumps({"document": "text", "questions": ["Who?"]}).encode()
    jobs.write_bytes(b"\n".join([
        good,
        b'{"document": "caf\xe9", "questions": ["Who?"]}',  # Latin-1, not UTF-8
        json.dumps({"id": "a", "document": "text", "questions": ["Who?"]}).encode(),
        json.dumps({"id": "a", "document": "other", "questions": ["Why?"]}).encode(),
        json.dumps({"id": [], "document": "text", "questions": ["Who?"]}).encode(),
        json.dumps({"id": 7, "document": "text", "questions": ["Who?", "Who?"]}).encode(),
    ]) + b"\n")
    valid, bad = read_jobs(jobs)
    assert [(j.line, j.id) for j in valid] == [(1, 1), (3, "a"), (6, "7")]
    reasons = dict(bad)
    assert sorted(reasons) == [2, 4, 5]
    assert "not UTF-8" in reasons[2] and "taken by line 3" in reasons[4] and '"id"' in reasons[5]


def test_bad_answers_path_is_a_clear_error_before_the_model_loads(tmp_path, capsys):
    from tiercache import ConfigError
    from tiercache.cli import main

    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, [{"document": "text", "questions": ["Who?"]}])
    for out, message in [(tmp_path, "is a directory"), (tmp_path / "nowhere" / "a.jsonl", "does not exist")]:
        assert main(["batch", str(jobs), "--out", str(out), "--store", str(tmp_path / "s"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tiercache: error: answers file") and message in err and "Traceback" not in err
        with pytest.raises(ConfigError, match=message):
            run_batch(jobs, out, store=None, progress=False)


def test_repeated_questions_are_answered_apart_and_keyed_by_job_id(smollm2, tmp_path):
    model, tok = smollm2
    document = tok.decode(text_tokens(tok, 64, offset_tokens=2000))
    q = "\nWhat is this text about? Answer:"
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, [{"id": "doc-b", "document": document, "questions": [q, q]}])
    out = tmp_path / "answers.jsonl"
    with ContextStore(tmp_path / "store", model, tok, codec="zstd", config=qa_config(model)) as store:
        report = run_batch(jobs, out, store, max_new_tokens=1, progress=False)
        assert report.answered == 2
        got = read_answers(out)
        keys = [(r["job"], r["index"], r["line"], r["question"]) for r in got]
        assert keys == [("doc-b", 0, 1, q), ("doc-b", 1, 1, q)]
        assert got[0]["answer"] == got[1]["answer"], "one stored KV, one greedy answer"
        write_jobs(jobs, [{"document": "another", "questions": ["Who?"]},  # lines move; the id holds
                          {"id": "doc-b", "document": document, "questions": [q, q]}])
        again = run_batch(jobs, out, store, max_new_tokens=1, progress=False)
    assert again.already_answered == 2 and again.answered == 1 and len(read_answers(out)) == 3
    assert read_answers(out)[2]["job"] == 1
