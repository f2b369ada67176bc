"""The Redis context tier against a real ``redis-server`` (started by the tests, never a mock):
contexts saved in one process and loaded bit-exact in another, a writer killed mid-save leaving
nothing visible, tampered records refused and counted, ``maxmemory`` eviction as a clean miss,
a server restart survived or reported clearly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
import torch

from tiercache import BlockNotFoundError, CorruptBlockError, StoreError
from tiercache.errors import CapacityError, ConfigError, FingerprintError
from tiercache.contexts.backends import open_contexts
from tiercache.io.codec import make_codec
from tiercache.contexts.kv import load_kv_context, save_kv_context
from tiercache.io.redis_store import RedisStore

ROOT = Path(__file__).resolve().parents[1]
RAW = make_codec("raw")


def context_kv(seed: int, tokens: int = 300) -> torch.Tensor:
    """A made-up context ``(layers=2, 2, kv_heads=2, tokens, head_dim=16)`` in float16."""
    return torch.randn((2, 2, 2, tokens, 16), generator=torch.Generator().manual_seed(seed)).half()


def run_python(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_saved_in_one_process_loads_bit_exact_in_another(redis_url, fingerprint_for):
    fingerprint = fingerprint_for(context_kv(0), RAW, chunk_tokens=64)
    run_python("""
        import sys, torch
        from tiercache.fingerprint import Fingerprint
        from tiercache.contexts.backends import open_contexts
        from tiercache.io.codec import make_codec
        from tiercache.contexts.kv import content_key, save_kv_context
        sys.path.insert(0, "tests")
        from test_redis_store import context_kv
        fingerprint = Fingerprint.from_json(eval(sys.argv[2]))
        with open_contexts(sys.argv[1], 0) as store:
            key = content_key(fingerprint.digest, range(300))
            save_kv_context(store, key, context_kv(0), make_codec("raw"), fingerprint, 64)
    """, redis_url, repr(fingerprint.to_json()))
    from tiercache.contexts.kv import content_key

    with open_contexts(redis_url, 0) as store:
        assert isinstance(store, RedisStore)
        key = content_key(fingerprint.digest, range(300))
        assert store.contexts() == [key] and store.has_context(key)
        before = store.round_trips
        assert torch.equal(load_kv_context(store, key, fingerprint), context_kv(0)), "raw is bit-exact"
        # One round trip for the manifest, one for all 10 records, one for the counters.
        assert store.round_trips - before == 3 and store.records_read == 10
        manifest = store.manifest(key)
        assert manifest["fingerprint"] == fingerprint.digest and len(manifest["parts"]) == 10
        assert store.stats()["hits"] == 1 and store.context_hits() == {key: 1}
        store.delete_context(key)
        assert store.contexts() == [] and not store.has_context(key)
        with pytest.raises(BlockNotFoundError, match="holds no context"):
            load_kv_context(store, key, fingerprint)
        assert store.stats()["misses"] == 1


def test_a_killed_writer_leaves_no_visible_half_context(redis_url, fingerprint_for):
    fingerprint = fingerprint_for(context_kv(0), RAW, chunk_tokens=64)
    # Killed between writing every part and committing: deterministic.
    proc = run_python("""
        import os, sys
        from tiercache.fingerprint import Fingerprint
        from tiercache.io.codec import make_codec
        from tiercache.contexts.kv import save_kv_context
        from tiercache.io.redis_store import RedisStore
        sys.path.insert(0, "tests")
        from test_redis_store import context_kv
        store = RedisStore(sys.argv[1])
        store._commit = lambda keys, args: os.kill(os.getpid(), 9)
        fingerprint = Fingerprint.from_json(eval(sys.argv[2]))
        save_kv_context(store, "half", context_kv(0), make_codec("raw"), fingerprint, 64)
    """, redis_url, repr(fingerprint.to_json()), check=False)
    assert proc.returncode == -signal.SIGKILL
    with RedisStore(redis_url) as store:
        assert store.contexts() == [] and not store.has_context("half")
        with pytest.raises(BlockNotFoundError):
            load_kv_context(store, "half", fingerprint)
        assert store.pending_parts() == 10, "the parts were written, and will expire"
    # Killed at any moment of a stream of saves: every context a reader sees is whole and right.
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from tiercache.fingerprint import Fingerprint
        from tiercache.io.codec import make_codec
        from tiercache.contexts.kv import save_kv_context
        from tiercache.io.redis_store import RedisStore
        sys.path.insert(0, "tests")
        from test_redis_store import context_kv
        store, fp = RedisStore(sys.argv[1]), Fingerprint.from_json(eval(sys.argv[2]))
        for i in range(10**6):
            save_kv_context(store, f"ctx-{i}", context_kv(i, 64 * (1 + i % 5)), make_codec("raw"), fp, 64)
            print(i, flush=True)
    """), redis_url, repr(fingerprint.to_json())], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for _ in range(6):  # a few saves, then kill it mid-way through another
        writer.stdout.readline()
    time.sleep(0.013)
    writer.kill()
    writer.wait()
    with RedisStore(redis_url) as store:
        names = store.contexts()
        assert len(names) >= 6
        for name in names:
            i = int(name.split("-")[1])
            assert torch.equal(load_kv_context(store, name, fingerprint), context_kv(i, 64 * (1 + i % 5)))


def test_tampered_and_foreign_records_are_refused_and_counted(redis_url, fingerprint_for):
    fingerprint = fingerprint_for(context_kv(0), RAW, chunk_tokens=64)
    client = redis.Redis.from_url(redis_url)
    with RedisStore(redis_url) as store:
        for name, seed in (("a", 0), ("b", 1)):
            save_kv_context(store, name, context_kv(seed), RAW, fingerprint, 64)
        manifest = store.manifest("a")
        part = store.key("part", "a", manifest["parts"][3][0])
        good = client.get(part)

        def refused(error, match: str) -> None:
            count = store.stats()["refused"]
            with pytest.raises(error, match=match):
                load_kv_context(store, "a", fingerprint)
            assert store.stats()["refused"] == count + 1

        flipped = bytearray(good)
        flipped[len(flipped) // 2] ^= 0x10
        client.set(part, bytes(flipped))
        refused(CorruptBlockError, "part 3: .* sha256 is not")
        # A valid, checksummed record of the other context in its place: its digest differs.
        client.set(part, client.get(store.key("part", "b", store.manifest("b")["parts"][3][0])))
        refused(CorruptBlockError, "part 3: .* sha256 is not")
        client.set(part, good)
        assert torch.equal(load_kv_context(store, "a", fingerprint), context_kv(0))
        client.set(store.key("ctx", "a"), b"{not json")
        refused(CorruptBlockError, "manifest is not readable")
        # Records of another model's KV under a consistent manifest: the fingerprint refuses them.
        other = fingerprint_for(context_kv(0), RAW, chunk_tokens=64, weights="tensors:other-fine-tune")
        save_kv_context(store, "a", context_kv(0), RAW, other, 64)
        refused(FingerprintError, "not of this model and setting")
        assert store.stats()["hits"] == 1


def test_eviction_by_maxmemory_is_a_clean_miss(redis_servers, fingerprint_for):
    # The policy the README recommends, sampling enough keys that the newest contexts (saved
    # last) are kept: allkeys-random could evict a part of every one, and leave nothing whole.
    server = redis_servers("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "64")
    fingerprint = fingerprint_for(context_kv(0), RAW, chunk_tokens=64)
    with RedisStore(server.url()) as store:
        for i in range(24):  # 24 x 80 KB of records, 3 MB of memory: Redis evicts
            save_kv_context(store, f"ctx-{i}", context_kv(i, 320), RAW, fingerprint, 64)
        assert store.memory()["evicted_keys"] > 0
        whole, misses = [], 0
        for i in range(24):
            try:
                kv = load_kv_context(store, f"ctx-{i}", fingerprint)
            except BlockNotFoundError as exc:
                assert "holds no context" in str(exc) or "parts" in str(exc)
                misses += 1
                continue
            assert torch.equal(kv, context_kv(i, 320)), "never garbage"
            whole.append(f"ctx-{i}")
        assert misses and whole
        # A part evicted while the manifest stays (what allkeys policies do): a miss, named.
        name = whole[0]
        redis.Redis(port=server.port).delete(store.key("part", name, store.manifest(name)["parts"][2][0]))
        with pytest.raises(BlockNotFoundError, match=r"lost 1 of its 10 parts \(first: part 2"):
            load_kv_context(store, name, fingerprint)


def test_a_restart_is_survived_or_reported_clearly(redis_servers, fingerprint_for):
    server = redis_servers("--appendonly", "yes", "--appendfsync", "always")
    fingerprint = fingerprint_for(context_kv(0), RAW, chunk_tokens=64)
    with RedisStore(server.url(), reconnect_seconds=1.0) as store:
        save_kv_context(store, "a", context_kv(0), RAW, fingerprint, 64)
        server.stop()
        server.start()  # the same port; the append-only file brings "a" back
        assert torch.equal(load_kv_context(store, "a", fingerprint), context_kv(0)), "reconnected"
        server.stop()
        start = time.monotonic()
        with pytest.raises(StoreError, match=rf"redis at {server.url()}: ConnectionError"):
            load_kv_context(store, "a", fingerprint)
        assert time.monotonic() - start < 15
        for f in server.workdir.glob("appendonly*"):  # restarted empty: a miss, then a fresh save
            if f.is_dir():
                import shutil

                shutil.rmtree(f)
            else:
                f.unlink()
        server.start()
        with pytest.raises(BlockNotFoundError):
            load_kv_context(store, "a", fingerprint)
        save_kv_context(store, "a", context_kv(0), RAW, fingerprint, 64)
        assert torch.equal(load_kv_context(store, "a", fingerprint), context_kv(0))


def test_addresses_and_a_full_server_are_clear_errors(redis_servers, fingerprint_for):
    with pytest.raises(ConfigError, match="not a Redis address"):
        RedisStore("redis://127.0.0.1:notaport/0")
    server = redis_servers("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    with socket.socket() as closed, pytest.raises(StoreError, match="ConnectionError"):
        closed.bind(("127.0.0.1", 0))  # a port nothing listens on
        RedisStore(f"redis://127.0.0.1:{closed.getsockname()[1]}/0", reconnect_seconds=0.3)
    fingerprint = fingerprint_for(context_kv(0), RAW, chunk_tokens=64)
    with RedisStore(server.url()) as store:
        with pytest.raises(CapacityError, match="maxmemory"):
            for i in range(40):
                save_kv_context(store, f"ctx-{i}", context_kv(i, 320), RAW, fingerprint, 64)
        assert all(torch.equal(load_kv_context(store, n, fingerprint), context_kv(int(n[4:]), 320))
                   for n in store.contexts())


@pytest.mark.model
def test_a_context_store_on_redis_reencodes_an_evicted_context_and_inspect_shows_it(smollm2, redis_url,
                                                                                      tmp_path, capsys):
    """ContextStore("redis://..."): the answer from Redis is the answer from a directory store;
    a context that lost a part is encoded again by the batch runner, not an error; ``tiercache
    inspect redis://...`` shows the context, its bytes, fingerprint and hits."""
    import json

    from tiercache import RetrievalConfig, TierConfig
    from tiercache.contexts.store import ContextStore
    from tiercache.jobs import run_batch
    from tiercache.cli import main
    from tiercache.generation import ask_cache

    model, tok = smollm2
    document = "The vault code is 58203. The lamp turned slowly while the ship sailed on. " * 4
    question = "\nWhat is the vault code? The vault code is"
    config = TierConfig(device_budget_bytes=8 << 20, host_budget_bytes=32 << 20, block_tokens=32,
                        dtype=torch.float32, device="cpu", retrieval=RetrievalConfig(budget=1.0))
    answers = []
    for where in (redis_url, tmp_path / "disk"):
        with ContextStore(where, model, tok, codec="zstd", config=config) as store:
            cache = store.load(store.encode(document))
            answers.append(ask_cache(model, tok, cache, question, 7))
            cache.close()
    assert answers[0] == answers[1] and "58203" in answers[0]
    with RedisStore(redis_url) as store:
        [key] = store.contexts()
        parts = len(store.manifest(key)["parts"])
        redis.Redis.from_url(redis_url).delete(store.key("part", key, store.manifest(key)["parts"][5][0]))
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "answers.jsonl"
    jobs.write_text(json.dumps({"document": document, "questions": [question]}) + "\n")
    with ContextStore(redis_url, model, tok, codec="zstd", config=config) as store:
        report = run_batch(jobs, out, store, max_new_tokens=7, progress=False)
        assert store.key(document) == key
    assert report.encoded == 1 and report.answered == 1 and not report.bad_lines, "the miss was recomputed"
    assert json.loads(out.read_text())["answer"] == answers[0]
    assert "encoding it again" in capsys.readouterr().err
    assert main(["inspect", redis_url]) == 0
    shown = capsys.readouterr().out
    assert f"redis {redis_url} (redis 7" in shown and ": 1 contexts, " in shown
    assert "counters: 3 loads: 2 hits, 1 misses, 0 refused" in shown and "; 2 saves;" in shown
    assert f"fingerprint {store.fingerprint.digest[:16]} (SmolLM2-135M-Instruct, weights files:" in shown
    assert f"  {key[:16]}  {parts:>5} records " in shown
    assert f"fingerprint {store.fingerprint.digest[:16]}  2 hits  codec zstd" in shown
