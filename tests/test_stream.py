"""StreamSession on SmolLM2-135M-Instruct (fp32, CPU): a real-text stream 8x the device budget
with facts planted early, answered later; flat append cost; device budget; save and reopen in
another process; frame-embedding streams; bad inputs."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiercache import ConfigError, RetrievalConfig, ShapeError, StoreError, TierConfig
from tiercache.corpus import text_tokens
from tiercache.evaluation import FACTS, plant_facts, question_text
from tiercache.generation import full_attention_answers
from tiercache.stream import StreamSession
from helpers import kv_bytes

pytestmark = pytest.mark.model

TEXT_TOKENS = 1024
CHUNK = 128
BLOCK = 32


def stream_config(model, tokens: int, disk_path: Path) -> TierConfig:
    """The device holds 1/8 of the stream's KV (at least 3 blocks a layer: sink, open block and
    one to stream through), the host 1/16 or what token retrieval needs at least (so that the
    disk tier is in use early in the stream),
    a lossless disk tier the rest. Questions retrieve with a budget covering the stream: under
    test here are the encoding, the tiers and the undoing of questions; QA at partial budgets is
    measured by benchmarks/bench_quality.py --qa (no partial budget answers early facts reliably)."""
    device = max(kv_bytes(model, tokens) // 8, kv_bytes(model, 3 * BLOCK))
    # The host holds each layer's open block and a device's worth of blocks, little more.
    host = max(kv_bytes(model, tokens) // 16, kv_bytes(model, BLOCK) + device)
    return TierConfig(device_budget_bytes=device, host_budget_bytes=host,
                      disk_budget_bytes=4 * kv_bytes(model, tokens), disk_path=disk_path, disk_codec="zstd",
                      block_tokens=BLOCK, dtype=torch.float32, device="cpu", retrieval=RetrievalConfig(budget=1.0))


@pytest.fixture(scope="module")
def stream(smollm2, tmp_path_factory):
    """A session over ~1.1K tokens of real text with the facts planted at 10%-60% depth, appended
    chunk by chunk; the blocks each chunk read."""
    model, tok = smollm2
    ids = plant_facts(tok, text_tokens(tok, TEXT_TOKENS, offset_tokens=1000))
    path = tmp_path_factory.mktemp("stream")
    session = StreamSession(model, tok, stream_config(model, len(ids), path), chunk_tokens=CHUNK)
    reads = []
    for a in range(0, len(ids), CHUNK):
        lookups = session.cache.manager.stats().lookups
        session.append(torch.tensor(ids[a : a + CHUNK]))
        reads.append(session.cache.manager.stats().lookups - lookups)
    yield session, ids, reads
    session.close()


def test_stream_is_eight_times_the_device_budget_and_stays_within_it(stream):
    session, ids, _ = stream
    stats = session.cache.manager.stats()
    assert kv_bytes(session.model, len(ids)) >= 8 * session.config.device_budget_bytes
    assert stats.peak_bytes["device"] <= session.config.device_budget_bytes
    assert stats.moved_bytes["host->disk"] > 0, "the stream should have spilled to the disk tier"


def test_facts_planted_early_are_answered_later(stream):
    session, ids, _ = stream
    model, tok = session.model, session.tokenizer
    tokens = session.tokens
    # Room for more than the fact: the model would run on ("71432. Remember it."); answers stop
    # at the end of their first sentence.
    got = [session.ask(question_text(f), max_new_tokens=12) for f in FACTS]
    ref = full_attention_answers(model, tok, [question_text(f) for f in FACTS], input_ids=ids,
                                 max_new_tokens=6)
    ours = sum(f.answer in a for f, a in zip(FACTS, got))
    full = sum(f.answer in a for f, a in zip(FACTS, ref))
    print(f"\nQA accuracy over {len(ids)} streamed tokens: tiercache {ours}/{len(FACTS)}, "
          f"full attention {full}/{len(FACTS)}; answers {got} vs {ref}")
    assert full == len(FACTS), f"the reference itself misses: {ref}"
    assert ours == len(FACTS), f"answers {got}, full attention {ref}"
    assert got == [f"{f.answer}." for f in FACTS], "each answer is its first sentence"
    assert session.tokens == tokens, "asking must leave the stream as it was"


def test_append_cost_does_not_grow_with_the_stream(stream):
    """The work per chunk is flat: once the window is full, every chunk reads the same number of
    blocks however long the stream (the time per chunk is measured by benchmarks/bench_stream.py,
    not asserted here)."""
    session, ids, reads = stream
    window_full = (session.config.retrieval.window_tokens + CHUNK - 1) // CHUNK + 1
    steady = reads[window_full:-1]  # the last chunk may be short
    assert len(steady) >= 5 and len(set(steady)) == 1, f"blocks read per chunk vary: {reads}"
    assert session.cache.manager.stats().moved_bytes["host->disk"] > 0, "the steady part must include the disk tier"

def test_stream_continues_after_questions(stream):
    session, ids, _ = stream
    before = session.tokens
    session.append(torch.tensor(ids[:CHUNK]))
    assert session.tokens == before + CHUNK
    session.cache.truncate(before)  # keep the module's stream as it was for the other tests
    assert FACTS[0].answer in session.ask(question_text(FACTS[0]), max_new_tokens=6)


def test_saved_stream_reopens_in_another_process(smollm2, tmp_path):
    model, tok = smollm2
    ids = plant_facts(tok, text_tokens(tok, 384, offset_tokens=3000), FACTS[:1])
    path = tmp_path / "session"
    with StreamSession(model, tok, stream_config(model, len(ids), path)) as session:
        session.append(ids)
        assert session.save() > 0
        answer = session.ask(question_text(FACTS[0]), max_new_tokens=6)
    manifest = json.loads((path / "stream.json").read_text())
    assert manifest["tokens"] == len(ids) and manifest["config"]["disk_codec"] == "zstd"
    script = (
        "import sys; from tiercache.models import load_default_model; from tiercache.stream import StreamSession\n"
        "model, tok = load_default_model()\n"
        "s = StreamSession.open(sys.argv[1], model, tok)\n"
        "print(s.tokens); print(s.ask(sys.argv[2], max_new_tokens=6)); s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), question_text(FACTS[0])], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-2000:]
    tokens, reopened = out.stdout.strip().splitlines()[-2:]
    assert int(tokens) == len(ids)
    assert reopened == answer and FACTS[0].answer in reopened


def test_embedding_stream_end_to_end(smollm2, tmp_path):
    """Frames already projected to the hidden size: here the token embeddings of real text."""
    model, tok = smollm2
    ids = plant_facts(tok, text_tokens(tok, 512, offset_tokens=5000), FACTS[1:2])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor(ids))
    with StreamSession(model, tok, stream_config(model, len(ids), tmp_path)) as session:
        for a in range(0, len(ids), CHUNK):
            session.append(inputs_embeds=embeds[a : a + CHUNK].unsqueeze(0))
        assert session.tokens == len(ids)
        assert FACTS[1].answer in session.ask(question_text(FACTS[1]), max_new_tokens=6)


def test_bad_inputs_raise_clear_errors(smollm2, tmp_path):
    model, tok = smollm2
    hidden = model.config.hidden_size
    config = stream_config(model, 256, tmp_path / "a")
    with StreamSession(model, tok, config) as session:
        bad = [
            ({}, "exactly one"),
            ({"input_ids": [1, 2], "inputs_embeds": torch.zeros(2, hidden)}, "exactly one"),
            ({"input_ids": torch.zeros(3)}, "integer"),
            ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "(1, tokens)"),
            ({"input_ids": torch.zeros(0, dtype=torch.long)}, "tokens >= 1"),
            ({"input_ids": [model.config.vocab_size]}, "must lie in"),
            ({"inputs_embeds": torch.zeros(4, hidden + 1)}, f"hidden size"),
            ({"inputs_embeds": torch.zeros(4, hidden, dtype=torch.long)}, "floating-point"),
            ({"inputs_embeds": torch.zeros(2, 4, hidden)}, "(1, tokens"),
        ]
        for kwargs, message in bad:
            with pytest.raises(ShapeError, match=re.escape(message)):
                session.append(**kwargs)
        with pytest.raises(ShapeError, match="question"):
            session.ask("  ")
        with pytest.raises(ShapeError, match="context is empty"):
            session.ask(question_text(FACTS[0]))
        with pytest.raises(ShapeError, match="not text.*tokenize it first"):
            session.append("hello world")
        with pytest.raises(ShapeError, match="integer token ids"):
            session.append(["hello", "world"])
        with pytest.raises(ShapeError, match="padded"):
            session.append(tok(["hello world", "hi"], padding=True))
        with pytest.raises(ShapeError, match="without 'input_ids'"):
            session.append({"ids": [1, 2]})
        assert session.tokens == 0
        # What a tokenizer returns is accepted as it is.
        assert session.append(tok("hello world", add_special_tokens=False)) == 2
        assert session.append(tok("hello world", add_special_tokens=False, return_tensors="pt")) == 4
    with pytest.raises(ConfigError, match="chunk_tokens"):
        StreamSession(model, tok, config, chunk_tokens=0)
    no_disk = TierConfig(device_budget_bytes=config.device_budget_bytes, host_budget_bytes=0, dtype=torch.float32)
    with StreamSession(model, tok, no_disk) as session, pytest.raises(ConfigError, match="session directory"):
        session.save()
    with pytest.raises(StoreError, match="stream.json"):
        StreamSession.open(tmp_path / "nothing", model, tok)


def test_holding_the_question_selection_at_full_budget_is_exact(stream):
    """At a budget covering the stream, the held selection is every block: the answer equals the
    one decoded with retrieval at every step (a held set must not lose blocks as the question and
    answer grow the context)."""
    session, _, _ = stream
    for fact in FACTS[:2]:
        held = session.ask(question_text(fact), max_new_tokens=6, hold=True)
        assert held == session.ask(question_text(fact), max_new_tokens=6, hold=False)
        assert fact.answer in held


@pytest.mark.parametrize("index", ["tokens", "blocks"])
def test_a_question_selects_once_and_its_answer_keeps_that_selection(stream, index, monkeypatch):
    """ReKV-style asking at a partial budget: the question's queries select from the whole
    stream once (at its prefill); with ``hold`` the answer's decode steps attend that selection
    (plus sink and window) instead of selecting again at every step. Either way the question
    leaves nothing behind."""
    import dataclasses

    from tiercache.retrieval import token_select

    session, ids, _ = stream
    config = dataclasses.replace(session.config, disk_budget_bytes=0, disk_path=None,
                                 host_budget_bytes=2 * kv_bytes(session.model, len(ids)),
                                 retrieval=RetrievalConfig(budget=0.25, index=index))
    kv = session.cache.export_kv()
    with StreamSession(session.model, session.tokenizer, config) as partial:
        partial.cache.import_kv(kv)
        calls = []
        owner = token_select if index == "tokens" else partial.cache.step.selector
        select = owner.select
        monkeypatch.setattr(owner, "select", lambda plan, q, *rest: calls.append(q.shape[2]) or select(plan, q, *rest))
        question = question_text(FACTS[0])
        n_question = len(session.tokenizer(question, add_special_tokens=False)["input_ids"])
        answers = {}
        for hold in (True, False):
            calls.clear()
            answers[hold] = partial.ask(question, max_new_tokens=4, stop=None, hold=hold)
            layers = session.model.config.num_hidden_layers
            prefill, decode = calls[:layers], calls[layers:]
            assert prefill == [n_question] * layers, "the question's queries select, all positions at once"
            assert decode == ([] if hold else [1] * (3 * layers)), f"hold={hold}: decode-step selections {decode}"
            assert partial.tokens == len(ids) and not partial.cache.step.held
        assert all(answers.values())


def test_saves_a_crash_left_behind_are_removed_never_the_current_one(smollm2, tmp_path, monkeypatch):
    """Killed after committing a new save but before stream.json named it, or after the switch
    but before the previous save went: the orphan is removed by the next save, and the save
    stream.json names always loads."""
    import tiercache.stream as stream_module
    from tiercache.io.store import DiskStore

    model, tok = smollm2
    ids = text_tokens(tok, 45, offset_tokens=100)
    path = tmp_path / "session"

    def saved() -> list[str]:
        """The saves in the store, as stream-<tokens> (their names also hold the fingerprint's
        digest); the one stream.json names first (it must load)."""
        current = json.loads((path / "stream.json").read_text())["context"]
        with DiskStore(path / "saved", 0, readonly=True) as r:
            assert r.load_context(current)
            names = [current] + sorted(c for c in r.contexts() if c != current)
        return [re.sub(r"^stream-[0-9a-f]{16}-", "stream-", n) for n in names]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with StreamSession(model, tok, stream_config(model, 256, path)) as session:
        session.append(ids[:20])
        session.save()
        session.append(ids[20:30])
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(stream_module, "write_json_atomic", killed)  # before the switch
            session.save()
        assert saved() == ["stream-20", "stream-30"]  # the current one, and an orphan
        session.append(ids[30:40])
        real_delete = DiskStore.delete_context
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(DiskStore, "delete_context",  # after the switch, removing the previous save
                      lambda store, name: killed() if name.endswith("-20") else real_delete(store, name))
            session.save()
        assert saved() == ["stream-40", "stream-20"]  # stream-30 went first
        session.append(ids[40:45])
        session.save()
        assert saved() == ["stream-45"]
