"""DiskStore and DiskTier: persistence, recovery, capacity, compaction, processes and bad input."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiercache import (
    BlockKey,
    BlockLayout,
    BlockNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlockError,
    ShapeError,
    StoreError,
    StoreWarning,
    TierConfig,
)
from tiercache.io.codec import CODECS, make_codec
from tiercache.contexts.backends import DiskContexts
from tiercache.contexts.kv import content_key, load_kv_context, save_kv_context
from tiercache.io.store import DiskStore
from tiercache.tiers.disk import DiskTier
from tiercache.io.frames import ContextPart, key_from_bytes, record_crc
from tiercache.io.record import decode_record, encode_record

LAYOUT = BlockLayout(kv_heads=2, block_tokens=16, head_dim=8, dtype=torch.float32)
RAW = make_codec("raw")
ROOT = Path(__file__).resolve().parents[1]


def kv_block(seed: int, tokens: int = LAYOUT.block_tokens) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, LAYOUT.kv_heads, tokens, LAYOUT.head_dim), generator=g, dtype=LAYOUT.dtype)


def record(key: BlockKey, seed: int, tokens: int = LAYOUT.block_tokens) -> bytes:
    kv = kv_block(seed, tokens)
    return encode_record(RAW, kv[0], kv[1], LAYOUT, key)


def assert_record(data, key: BlockKey, seed: int) -> None:
    header, k, v = decode_record(data)
    assert header.key == key
    expected = kv_block(seed, header.tokens)
    assert torch.equal(k, expected[0]) and torch.equal(v, expected[1])


def open_store(path: Path, budget: int = 64 << 20, **kw) -> DiskStore:
    kw.setdefault("segment_bytes", 256 << 10)
    return DiskStore(path, budget, **kw)


KEYS = [BlockKey(seq, layer, i) for seq in range(2) for layer in range(3) for i in range(10)]


@pytest.fixture
def filled(tmp_path):
    """A store holding ``KEYS``, record of key i seeded with i; closed."""
    with open_store(tmp_path) as s:
        s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:30])])
        s.put_many([(k, record(k, i + 30)) for i, k in enumerate(KEYS[30:])])
    return tmp_path


def check_all(store: DiskStore, keys=KEYS, skip=()) -> None:
    wanted = [k for k in keys if k not in skip]
    for k, data in zip(wanted, store.get_many(wanted)):
        assert_record(data, k, KEYS.index(k))


# ---------------------------------------------------------------- persistence and recovery


def test_roundtrip_and_reopen_from_manifest(filled):
    with open_store(filled) as s:
        assert s.recovery_note == ""
        assert len(s) == len(KEYS)
        check_all(s)


def test_index_rebuilt_by_scanning_when_manifest_missing_or_garbage(filled):
    (filled / "manifest.json").unlink()
    with open_store(filled) as s:
        assert "missing" in s.recovery_note
        check_all(s)
    (filled / "manifest.json").write_text("{not json")
    with pytest.warns(StoreWarning, match="ignoring its manifest"), open_store(filled) as s:
        assert "unreadable" in s.recovery_note
        check_all(s)


def test_stale_manifest_replays_later_batches(tmp_path):
    s = open_store(tmp_path)
    s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:20])])
    s.checkpoint()
    s.put_many([(k, record(k, i + 20)) for i, k in enumerate(KEYS[20:])])
    s.delete([KEYS[0]])
    s._writer_lock.release()  # as if the process died here: no final checkpoint
    reopened = open_store(tmp_path)
    assert "replayed" in reopened.recovery_note
    assert KEYS[0] not in reopened
    check_all(reopened, skip={KEYS[0]})
    reopened.close()


def test_uncommitted_tail_is_ignored(filled):
    seg = sorted(filled.glob("seg-*"))[-1]
    with open(seg, "ab") as f:  # a torn batch: frames of a batch whose COMMIT never came
        f.write(open(seg, "rb").read()[:5000])
    with open_store(filled) as s:
        check_all(s)
        s.put_many([(KEYS[0], record(KEYS[0], 0))])
    with open_store(filled) as s:
        check_all(s)


def test_overwrite_delete_and_delete_seq(filled):
    with open_store(filled) as s:
        s.put_many([(KEYS[1], record(KEYS[1], 999))])
        s.delete([KEYS[2]])
        assert s.delete_seq(1) == 30
        with pytest.raises(BlockNotFoundError):
            s.delete([KEYS[2]])
        with pytest.raises(BlockNotFoundError):
            s.get(KEYS[2])
    for drop_manifest in (False, True):
        if drop_manifest:
            (filled / "manifest.json").unlink()
        with open_store(filled) as s:
            assert len(s) == 29 and s.block_keys(1) == []
            assert_record(s.get(KEYS[1]), KEYS[1], 999)
            check_all(s, KEYS[:30], skip={KEYS[1], KEYS[2]})


def test_many_reads_in_flight(filled):
    with open_store(filled, io_threads=16) as s:
        futures = s.read_async(KEYS * 5)
        for i, f in enumerate(futures):
            assert_record(f.result(), KEYS[i % len(KEYS)], i % len(KEYS))


def test_records_are_validated_on_write(tmp_path):
    with open_store(tmp_path) as s:
        with pytest.raises(StoreError, match="not a record"):
            s.put_many([(KEYS[0], b"x" * 100)])
        with pytest.raises(StoreError, match="says it is"):
            s.put_many([(KEYS[0], record(KEYS[0], 0) + b"junk")])
        assert len(s) == 0


# ---------------------------------------------------------------- capacity, eviction, compaction


def test_compaction_reclaims_space_and_keeps_deletes(tmp_path):
    frame = open_store(tmp_path / "probe").frame_bytes(KEYS[0], len(record(KEYS[0], 0)))
    budget = 40 * frame
    with open_store(tmp_path / "s", budget, segment_bytes=8 * frame) as s:
        for round_ in range(6):  # overwrite the same 30 keys: 6x the budget goes through
            s.put_many([(k, record(k, i + 100 * round_)) for i, k in enumerate(KEYS[:30])])
            assert s.disk_bytes <= budget + 16 * frame
        s.delete(KEYS[:10])
        s.compact(0)
        assert s.disk_bytes < s.used_bytes + 8 * frame
        assert len(list((tmp_path / "s").glob("seg-*"))) <= 5
    for drop_manifest in (False, True):
        if drop_manifest:
            (tmp_path / "s" / "manifest.json").unlink()
        with open_store(tmp_path / "s", budget) as s:
            assert sorted(s.block_keys()) == sorted(KEYS[10:30]), "a deleted block came back"
            for k, data in zip(KEYS[10:30], s.get_many(KEYS[10:30])):
                assert_record(data, k, KEYS.index(k) + 500)


def test_blocks_never_evicted_contexts_evicted_lru(tmp_path):
    rec = record(KEYS[0], 0)
    probe = open_store(tmp_path / "probe")
    frame = probe.frame_bytes(ContextPart("a" * 8, 0), len(rec))
    budget = 10 * frame
    # Eviction is the context cache's policy; the store itself only refuses what does not fit.
    with DiskContexts(tmp_path / "s", budget, segment_bytes=256 << 10) as s:
        s.save_context("ctx-a", [rec] * 3)
        s.save_context("ctx-b", [rec] * 3)
        s.load_context("ctx-a")  # a is now more recent than b
        s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:3])])
        s.save_context("ctx-c", [rec] * 3)  # needs room: evicts b, the least recently used
        assert s.contexts() == ["ctx-a", "ctx-c"] and s.evictions == 1
        with pytest.raises(CapacityError, match="do not fit"):
            s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[3:13])])
        # The contexts went for the attempt, but the blocks that fit before are untouched and the
        # failed batch stored nothing.
        assert s.block_keys() == KEYS[:3]
        check_all(s, KEYS[:3])
    with open_store(tmp_path / "s", budget, readonly=True) as r:
        assert not r.has_context("ctx-b")


def test_the_store_evicts_nothing_and_the_cache_keeps_its_order_across_processes(tmp_path):
    rec = record(KEYS[0], 0)
    frame = open_store(tmp_path / "probe").frame_bytes(ContextPart("a" * 8, 0), len(rec))
    budget = 7 * frame
    with open_store(tmp_path / "plain", budget) as s:
        s.save_context("ctx-a", [rec] * 3)
        s.save_context("ctx-b", [rec] * 3)
        with pytest.raises(CapacityError, match="do not fit"):
            s.save_context("ctx-c", [rec] * 3)
        assert s.contexts() == ["ctx-a", "ctx-b"], "least recently saved first; nothing evicted"
    with DiskContexts(tmp_path / "s", budget) as s:
        s.save_context("ctx-a", [rec] * 3)
        s.save_context("ctx-b", [rec] * 3)
        s.load_context("ctx-a")  # a is now more recent than b, which the next process must know
    with DiskContexts(tmp_path / "s", budget) as s:
        s.save_context("ctx-c", [rec] * 3)
        assert s.contexts() == ["ctx-a", "ctx-c"] and s.evictions == 1
        with pytest.raises(CapacityError, match="do not fit"):
            s.save_context("ctx-c", [rec] * 8)  # never evicts itself; a goes for the attempt
        assert s.contexts() == ["ctx-c"] and s.evictions == 2
        assert [bytes(r) for r in s.load_context("ctx-c")] == [rec] * 3


def test_save_context_replaces_atomically(tmp_path):
    recs = [record(KEYS[i], i) for i in range(5)]
    with open_store(tmp_path) as s:
        s.save_context("doc", recs)
        s.save_context("doc", recs[:2])
        assert [bytes(r) for r in s.load_context("doc")] == recs[:2]
        s.delete_context("doc")
        with pytest.raises(BlockNotFoundError, match="no context"):
            s.load_context("doc")
        with pytest.raises(ShapeError, match="context key"):
            s.save_context("", recs)
    with open_store(tmp_path) as s:
        assert s.contexts() == [] and len(s) == 0


# ---------------------------------------------------------------- processes


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_context_saved_in_one_process_loads_in_another(tmp_path, fingerprint_for):
    expected = torch.randn((3, 2, 2, 300, 8), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    fingerprint = fingerprint_for(expected, RAW, chunk_tokens=64)
    key = content_key(fingerprint.digest, list(range(300)))
    assert key == content_key(fingerprint.digest, list(range(300))) != content_key("x", list(range(300)))
    proc = run_python(f"""
        import torch
        from tiercache.contexts.kv import content_key, save_kv_context
        from tiercache.io.store import DiskStore
        from tiercache.io.codec import make_codec
        from tiercache.fingerprint import Fingerprint
        g = torch.Generator().manual_seed(7)
        kv = torch.randn((3, 2, 2, 300, 8), generator=g).to(torch.bfloat16)
        fingerprint = Fingerprint.from_json({fingerprint.to_json()!r})
        with DiskStore({str(tmp_path)!r}, 1 << 24) as store:
            # The key is recomputed here: it must not depend on the process (no per-process hash).
            save_kv_context(store, content_key(fingerprint.digest, list(range(300))), kv, make_codec("raw"),
                            fingerprint, chunk_tokens=64)
    """)
    assert proc.returncode == 0, proc.stderr
    with DiskStore(tmp_path, 0, readonly=True) as r:
        assert torch.equal(load_kv_context(r, key, fingerprint), expected)


def test_second_writer_refused_readers_see_commits(tmp_path):
    with open_store(tmp_path) as w:
        w.put_many([(KEYS[0], record(KEYS[0], 0))])
        with pytest.raises(StoreError, match=r"already open for writing by pid \d+.*writer.lock"):
            open_store(tmp_path)
        proc = run_python(f"""
            from tiercache.io.store import DiskStore
            from tiercache.errors import StoreError
            try:
                DiskStore({str(tmp_path)!r}, 1 << 20)
            except StoreError as e:
                print(e)
        """)
        assert f"pid {os.getpid()}" in proc.stdout, proc.stdout + proc.stderr
        with open_store(tmp_path, readonly=True) as r:
            assert_record(r.get(KEYS[0]), KEYS[0], 0)
            w.put_many([(KEYS[1], record(KEYS[1], 1))])
            assert KEYS[1] not in r
            r.refresh()
            assert_record(r.get(KEYS[1]), KEYS[1], 1)
            with pytest.raises(StoreError, match="read-only"):
                r.put_many([(KEYS[2], record(KEYS[2], 2))])
    with open_store(tmp_path) as w:  # the lock went with the first writer
        assert len(w) == 2


# ---------------------------------------------------------------- bad input and failures


def test_missing_or_unusable_directory(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        DiskStore(tmp_path / "nope", 1 << 20, readonly=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create disk store directory"):
        DiskStore(tmp_path / "file" / "store", 1 << 20)
    with pytest.raises(StoreError, match="budget_bytes"):
        DiskStore(tmp_path / "s", -1)


@pytest.mark.parametrize("key_bytes", [b"not json", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'["b", -1, 0, 0]',
                                       b'["c", "x", -1]', b'{"b": 1}'],
                         ids=["text", "utf8", "deep", "negative", "part", "object"])
def test_a_frame_key_that_is_no_key_raises_corrupt_block_error(key_bytes):
    with pytest.raises(CorruptBlockError, match="not a store key"):
        key_from_bytes(key_bytes)


def test_a_record_without_its_checksum_raises_corrupt_block_error():
    with pytest.raises(CorruptBlockError, match="no checksum"):
        record_crc(b"abc")


def test_disk_full_loses_nothing_and_recovers(filled, monkeypatch):
    s = open_store(filled)
    real = os.pwrite
    written = []

    def full(fd, data, offset):  # the drive fills up half-way through the batch
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        return real(fd, data[: len(data) // 2], offset)

    monkeypatch.setattr(os, "pwrite", full)
    new = [BlockKey(5, 0, i) for i in range(4)]
    with pytest.raises(StoreError, match=r"seg-\d+\.tcseg at offset \d+ failed \(disk full\)"):
        s.put_many([(k, record(k, 50 + i)) for i, k in enumerate(new)])
    assert not any(k in s for k in new)
    check_all(s)
    monkeypatch.setattr(os, "pwrite", real)  # space was freed
    s.put_many([(k, record(k, 50 + i)) for i, k in enumerate(new)])
    s.close()
    for drop_manifest in (False, True):
        if drop_manifest:
            (filled / "manifest.json").unlink()
        with open_store(filled) as s:
            check_all(s)
            for i, (k, data) in enumerate(zip(new, s.get_many(new))):
                header, kk, vv = decode_record(data)
                assert header.key == k and torch.equal(kk, kv_block(50 + i)[0])


def test_a_new_segment_that_cannot_be_made_durable_is_removed_and_reported(filled, monkeypatch):
    import tiercache.io.writes

    real = tiercache.io.writes.fsync_dir

    def failing(path):  # the directory entry of the new segment cannot be synced
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with open_store(filled) as s:
        monkeypatch.setattr(tiercache.io.writes, "fsync_dir", failing)
        before = sorted(p.name for p in filled.glob("seg-*"))
        with pytest.raises(StoreError, match="cannot make segment .* durable"):
            s.put_many([(KEYS[0], record(KEYS[0], 0))])
        monkeypatch.setattr(tiercache.io.writes, "fsync_dir", real)
        assert sorted(p.name for p in filled.glob("seg-*")) == before
        s.put_many([(KEYS[0], record(KEYS[0], 0))])
        check_all(s)


def test_failed_checkpoint_loses_nothing(filled, monkeypatch):
    s = open_store(filled, checkpoint_every=1)
    real = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    s.put_many([(KEYS[0], record(KEYS[0], 0))])  # committed; only the checkpoint failed
    assert "manifest" in s.checkpoint_error and "previous one stands" in s.checkpoint_error
    with pytest.raises(StoreError, match="writing manifest"):
        s.close()
    assert not list(filled.glob("manifest.json.tmp*"))
    monkeypatch.setattr(os, "replace", real)
    with open_store(filled) as s:
        check_all(s)


def test_reader_keeps_reading_across_compaction(tmp_path):
    frame = open_store(tmp_path / "probe").frame_bytes(KEYS[0], len(record(KEYS[0], 0)))
    with open_store(tmp_path / "s", 64 * frame, segment_bytes=8 * frame) as w:
        w.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:30])])
        with open_store(tmp_path / "s", readonly=True) as r:
            w.delete(KEYS[:20])
            w.compact(0)  # removes the segments the reader indexed
            check_all(r, KEYS[20:30])  # still readable through its open files
            w.put_many([(KEYS[0], record(KEYS[0], 0))])
            r.refresh()
            assert sorted(r.block_keys()) == sorted(KEYS[20:30] + [KEYS[0]])
            check_all(r, KEYS[20:30] + [KEYS[0]])


def corrupt(store_dir: Path, key: BlockKey, how: str) -> tuple[Path, int]:
    with open_store(store_dir, readonly=True) as r:
        entry = r.entry(key)
        path = r.segment_path(entry.segment)
    if how == "flip":
        with open(path, "r+b") as f:
            f.seek(entry.offset + entry.span - 100)
            byte = f.read(1)
            f.seek(entry.offset + entry.span - 100)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.truncate(path, entry.offset + entry.span // 2)
    return path, entry.offset


@pytest.mark.parametrize("how, message", [("flip", "checksum mismatch"), ("truncate", "truncated")])
def test_damaged_record_fails_closed_rest_usable(filled, how, message):
    victim = KEYS[-1]  # the last record of the last segment, so truncation spares the others
    path, offset = corrupt(filled, victim, how)
    with open_store(filled) as s:
        with pytest.raises(CorruptBlockError, match=f"segment {path} offset {offset}: .*{message}"):
            s.get(victim)
        tier = DiskTier(s, RAW, LAYOUT, keep_blocks=True)
        with pytest.raises(CorruptBlockError, match=str(path)):
            tier.read_many([KEYS[0], victim], [LAYOUT.block_tokens] * 2, torch.device("cpu"))
        check_all(s, skip={victim})
        s.put_many([(victim, record(victim, KEYS.index(victim)))])  # rewriting heals it
        check_all(s)
    with open_store(filled) as s:
        check_all(s)


def test_odirect_where_supported_buffered_where_refused(tmp_path, monkeypatch):
    with open_store(tmp_path / "ext") as s:
        s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS)])
        segs = list(s._index.segments.values())
        direct_fds = {seg.direct_fd for seg in segs} - {None}
        if not direct_fds:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        # A filesystem that accepts O_DIRECT at open but wants a coarser alignment at read time.
        real_preadv = os.preadv

        def picky(fd, buffers, offset):
            if fd in direct_fds:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", picky)
        check_all(s)
        assert not any(seg.direct for seg in segs)
    monkeypatch.undo()
    real_open = os.open

    def no_direct(path, flags, *args):  # a filesystem that refuses O_DIRECT at open (older tmpfs)
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with open_store(tmp_path / "ext") as s:
        assert not any(seg.direct for seg in s._index.segments.values())
        check_all(s)
        s.put_many([(KEYS[0], record(KEYS[0], 0))])
    monkeypatch.undo()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):  # and a real tmpfs, whatever it supports
        import tempfile

        with tempfile.TemporaryDirectory(dir=shm) as d:
            with open_store(Path(d)) as s:
                s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS)])
                check_all(s)


# ---------------------------------------------------------------- DiskTier


def tier_at(path: Path, budget: int = 1 << 22, codec: str = "raw") -> DiskTier:
    return DiskTier(open_store(path, budget), make_codec(codec), LAYOUT)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_tier_roundtrip_partial_blocks(tmp_path, codec):
    tier = tier_at(tmp_path, codec=codec)
    keys = [BlockKey(0, 1, i) for i in range(6)]
    tokens = [16, 16, 3, 16, 1, 9]
    kv = torch.stack([kv_block(i) for i in range(6)])
    sizes = tier.write_many(keys, kv, tokens)
    assert len(sizes) == 6 and tier.used_bytes == sum(sizes)
    out = tier.read_many(keys, tokens, torch.device("cpu"))
    assert out.shape == kv.shape and out.dtype == kv.dtype
    for i, t in enumerate(tokens):
        if tier.codec.lossless:
            assert torch.equal(out[i, :, :, :t], kv[i, :, :, :t])
        else:
            assert torch.allclose(out[i, :, :, :t], kv[i, :, :, :t], atol=0.5 * kv.abs().max().item())
    tier.remove(keys[0])
    assert keys[0] not in tier and keys[1] in tier
    with pytest.raises(BlockNotFoundError):
        tier.remove(keys[0])
    tier.close()


def test_tier_capacity_error_stores_nothing(tmp_path):
    tier = tier_at(tmp_path, budget=1 << 20)
    fits = tier.free_blocks()
    assert fits > 0
    kv = torch.stack([kv_block(i) for i in range(fits)])
    keys = [BlockKey(0, 0, i) for i in range(fits)]
    tier.write_many(keys, kv, [16] * fits)
    assert tier.used_bytes <= tier.capacity_bytes and tier.free_blocks() == 0
    extra = [BlockKey(2, 0, i) for i in range(fits)]
    used = tier.used_bytes
    with pytest.raises(CapacityError, match="do not fit"):
        tier.write_many(extra, kv, [16] * fits)
    assert tier.used_bytes == used and not any(k in tier for k in extra)
    assert torch.equal(tier.read_many(keys, [16] * fits, torch.device("cpu")), kv)
    tier.close()


def test_tier_from_config_drops_blocks_of_previous_process_keeps_contexts(tmp_path, fingerprint_for):
    cfg = TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0, disk_budget_bytes=1 << 22,
                     disk_path=tmp_path / "disk", block_tokens=16, dtype=torch.float32, device="cpu")
    tier = DiskTier.from_config(cfg, LAYOUT)
    tier.write_many([BlockKey(0, 0, 0)], kv_block(0)[None], [16])
    ctx = torch.randn(2, 2, 2, 40, 8)
    fingerprint = fingerprint_for(ctx, RAW, chunk_tokens=16)
    save_kv_context(tier.store, "c", ctx, tier.codec, fingerprint, chunk_tokens=16)
    tier.close()
    tier = DiskTier.from_config(cfg, LAYOUT)
    assert BlockKey(0, 0, 0) not in tier, "a block of another process would be served as this one's"
    assert torch.equal(load_kv_context(tier.store, "c", fingerprint), ctx)
    tier.close()
    with pytest.raises(ConfigError, match="disk_budget_bytes"):
        DiskTier.from_config(TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0), LAYOUT)


def test_tier_refuses_a_record_of_another_block(tmp_path):
    tier = tier_at(tmp_path)
    a, b = BlockKey(0, 0, 0), BlockKey(0, 0, 1)
    # A record that names block a stored under key b: read_many must not hand it out as b.
    tier.store.put_many([(b, record(a, 0))])
    with pytest.raises(CorruptBlockError, match="expected block"):
        tier.read_many([b], [16], torch.device("cpu"))
    tier.close()
