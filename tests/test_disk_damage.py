"""The disk store under damage a bad disk or an attacker would do: flipped bits and overwritten
bytes in segments and manifest, segments compacted away under a reader, junk where segments
should be. Whatever happens, it serves each record as last committed or raises
``CorruptBlockError`` naming the file and offset; never an older version, a deleted key, a mix
of two saves, or a state that never existed. (Random damage: test_disk_fuzz.py.)"""

from __future__ import annotations

import errno
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from test_disk import KEYS, assert_record, open_store, record
from tiercache import BlockNotFoundError, CorruptBlockError, StoreError, StoreWarning
from tiercache.io.frames import HEADER_SIZE, ContextPart, FrameKind
from tiercache.io.commits import TRAILER
from tiercache.io.scan import SegmentScan
from tiercache.io.store import DiskStore


def history(path: Path, checkpoint_after: int | None = None, **kw) -> dict:
    """Six batches: puts, overwrites, deletes, a context saved twice (shorter the second time),
    more puts; ``checkpoint_after`` batches the manifest is written and the writer then dies
    (no final checkpoint). Returns what the store must hold: key -> record seed (None: deleted)
    and the context's record seeds."""
    s = open_store(path, **kw)
    steps = [
        lambda: s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:10])]),
        lambda: s.put_many([(k, record(k, 100 + i)) for i, k in enumerate(KEYS[:5])]),
        lambda: s.delete(KEYS[5:7]),
        lambda: s.save_context("c", [record(KEYS[0], 200 + p) for p in range(4)]),
        lambda: s.save_context("c", [record(KEYS[0], 300 + p) for p in range(3)]),
        lambda: s.put_many([(k, record(k, 400 + i)) for i, k in enumerate(KEYS[10:15])]),
    ]
    for n, step in enumerate(steps, start=1):
        step()
        if n == checkpoint_after:
            s.checkpoint()
    if checkpoint_after is None:
        s.close()
    else:
        s._writer_lock.release()  # as if the process died here
    seeds = {k: 100 + i if i < 5 else (None if i < 7 else i) for i, k in enumerate(KEYS[:10])}
    seeds |= {k: 400 + i for i, k in enumerate(KEYS[10:15])}
    return {"blocks": seeds, "context": [300 + p for p in range(3)]}


def check(store: DiskStore, expected: dict, damaged=()) -> None:
    """Every key reads back exactly as last committed; the ``damaged`` ones raise
    ``CorruptBlockError`` naming their segment file and offset."""
    for key, seed in expected["blocks"].items():
        if key in damaged:
            with pytest.raises(CorruptBlockError, match=r"segment .*seg-\d+\.tcseg offset \d+"):
                store.get(key)
        elif seed is None:
            with pytest.raises(BlockNotFoundError):
                store.get(key)
        else:
            assert_record(store.get(key), key, seed)
    if "c" in damaged:
        with pytest.raises(CorruptBlockError):
            store.load_context("c")
    else:
        want = [record(KEYS[0], s) for s in expected["context"]]
        assert [bytes(r) for r in store.load_context("c")] == want


def frames(path: Path) -> list[tuple[Path, int, object]]:
    """(segment file, batch end, frame) of every frame of every committed batch, in log order."""
    out = []
    with DiskStore(path, 0, readonly=True) as r:
        for seg in sorted(r._index.segments.values(), key=lambda s: s.id):
            for batch in SegmentScan(seg, seg.data_start).batches():
                out += [(seg.path, batch.end, f) for f in batch.frames]
    return out


def frame_of(path: Path, key, seq_rank: int = -1, kind=FrameKind.PUT):
    """(file, batch end, frame) of the ``seq_rank``-th frame of ``key`` (default: the newest)."""
    return [x for x in frames(path) if x[2].key == key and x[2].kind == kind][seq_rank]


def overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("manifest", ["none", "stale"])
def test_damaged_record_keeps_every_committed_record_after_it(tmp_path, manifest):
    expected = history(tmp_path, checkpoint_after=1 if manifest == "stale" else None)
    if manifest == "none":
        (tmp_path / "manifest.json").unlink()
    seg, _, f = frame_of(tmp_path, KEYS[0])  # the second version, written after the checkpoint
    flip(seg, f.offset + HEADER_SIZE + f.key_len + 500)
    with pytest.warns(StoreWarning, match="damaged"), open_store(tmp_path, readonly=True) as r:
        assert any(f"offset {f.offset}" in d for d in r.damage), r.damage
        check(r, expected, damaged={KEYS[0]})


@pytest.mark.parametrize("manifest", ["none", "stale"])
def test_newer_version_with_damaged_header_is_reported_never_shadowed(tmp_path, manifest):
    expected = history(tmp_path, checkpoint_after=1 if manifest == "stale" else None)
    if manifest == "none":
        (tmp_path / "manifest.json").unlink()
    seg, _, f = frame_of(tmp_path, KEYS[1])
    overwrite(seg, f.offset, b"\xff" * 40)  # the frame header of its second version
    with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
        check(r, expected, damaged={KEYS[1]})  # never the first version
    with pytest.warns(StoreWarning), open_store(tmp_path) as w:  # the next writer's checkpoint...
        check(w, expected, damaged={KEYS[1]})
    with open_store(tmp_path, readonly=True) as r:  # ...keeps it reported
        check(r, expected, damaged={KEYS[1]})


@pytest.mark.parametrize("manifest", ["none", "stale"])
def test_damaged_delete_frame_still_deletes(tmp_path, manifest):
    expected = history(tmp_path, checkpoint_after=1 if manifest == "stale" else None)
    if manifest == "none":
        (tmp_path / "manifest.json").unlink()
    seg, _, f = frame_of(tmp_path, KEYS[5], kind=FrameKind.DELETE)
    flip(seg, f.offset + 20)
    with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
        assert any("applied from the directory" in d for d in r.damage), r.damage
        check(r, expected)  # KEYS[5] stays deleted, the part deleted by the shorter save too


def test_damage_in_dead_records_and_commit_frames_loses_nothing(tmp_path):
    expected = history(tmp_path)
    (tmp_path / "manifest.json").unlink()
    found = frames(tmp_path)
    seg, _, dead = frame_of(tmp_path, KEYS[2], seq_rank=0)  # overwritten since
    flip(seg, dead.offset + HEADER_SIZE + dead.key_len + 40)
    _, end2, _ = frame_of(tmp_path, KEYS[1])  # batch 2: its COMMIT frame header
    commit2 = max(f.offset + f.frame_len for _, e, f in found if e == end2)
    overwrite(seg, commit2 + 4, b"\0" * 30)
    _, end6, _ = frame_of(tmp_path, KEYS[12])  # the last batch: its trailer (the commit mark)
    flip(seg, end6 - TRAILER.size + 10)
    with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
        check(r, expected)
        assert len(r.damage) == 3, r.damage


def test_damage_that_hides_a_frame_refuses_what_it_may_have_changed(tmp_path):
    """A frame header and its directory entry both damaged: the frame is unknowable, so every
    record it could have superseded is refused, never served possibly stale."""
    expected = history(tmp_path)
    (tmp_path / "manifest.json").unlink()
    seg, end2, f = frame_of(tmp_path, KEYS[1])
    overwrite(seg, f.offset, b"\xff" * 40)
    directory = end2 - TRAILER.size - 5 * 48 - sum(len(str(k.seq)) for k in KEYS[:5])
    overwrite(seg, end2 - TRAILER.size - 400, b"\xff" * 400)  # the directory's tail
    assert directory > 0
    with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
        for key in KEYS[:10]:  # written at or before the unknowable batch 2: refused
            with pytest.raises(CorruptBlockError, match="may hold a newer version"):
                r.get(key)
        for key in KEYS[10:15]:
            assert_record(r.get(key), key, expected["blocks"][key])
        assert [bytes(x) for x in r.load_context("c")] == [record(KEYS[0], s) for s in expected["context"]]


@pytest.mark.parametrize("which", ["middle", "last"])
def test_destroyed_commit_frame_refuses_what_it_may_have_changed(tmp_path, which):
    """A batch's whole COMMIT frame overwritten with junk (longer than its two copies are apart):
    the batch is known to be committed (later batches follow it, or junk, not the end of a cut
    short write, lies where it ends) but not what it held, so every record it could have
    superseded is refused; what was written after it is served."""
    expected = history(tmp_path)
    (tmp_path / "manifest.json").unlink()
    key = KEYS[1] if which == "middle" else KEYS[12]  # batch 2 or batch 6
    seg, end, f = frame_of(tmp_path, key)
    commit = max(x.offset + x.frame_len for _, e, x in frames(tmp_path) if e == end)
    overwrite(seg, commit, random.Random(1).randbytes(end - commit))
    with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
        assert any("unknowable" in d for d in r.damage), r.damage
        for k in KEYS[:15] if which == "last" else KEYS[:10]:
            with pytest.raises(CorruptBlockError, match="may hold a newer version"):
                r.get(k)
        if which == "middle":
            for k in KEYS[10:15]:
                assert_record(r.get(k), k, expected["blocks"][k])


def test_damaged_segment_header_is_worked_around(tmp_path):
    expected = history(tmp_path)
    (tmp_path / "manifest.json").unlink()
    seg = sorted(tmp_path.glob("seg-*"))[0]
    flip(seg, 12)
    with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
        check(r, expected)
        assert any("segment header" in d for d in r.damage)


# ---------------------------------------------------------------------- the manifest


def many_segments(path: Path) -> dict:
    """Records spread over at least six segments, a context, some deletes; closed."""
    with open_store(path, segment_bytes=16 << 10) as s:
        for i, k in enumerate(KEYS[:24]):
            s.put_many([(k, record(k, i))])
        s.delete(KEYS[20:24])
        s.save_context("ctx-a", [record(KEYS[0], 50 + p) for p in range(6)])
        assert len(list(path.glob("seg-*"))) >= 6
    return {k: (i if i < 20 else None) for i, k in enumerate(KEYS[:24])}


def check_many(store: DiskStore, expected: dict) -> None:
    for key, seed in expected.items():
        if seed is None:
            assert key not in store
        else:
            assert_record(store.get(key), key, seed)
    assert [bytes(r) for r in store.load_context("ctx-a")] == [record(KEYS[0], 50 + p) for p in range(6)]


@pytest.mark.parametrize("old, new", [
    (b"[4,", b"[5,"),  # a segment id: the old writer deleted seg-4 and its records
    (b'"seq":', b'"seq":1'),  # the sequence number
    (b'["c","ctx-a",5]', b'["c","ctx-b",5]'),  # a context part renamed
    (b'"unresolved":[]', b'"unresolved":[["seg-00000001.tcseg",1]]'),  # damage it never had
])
def test_edited_manifest_is_ignored_with_a_warning_and_deletes_nothing(tmp_path, old, new):
    expected = many_segments(tmp_path)
    manifest = tmp_path / "manifest.json"
    data = manifest.read_bytes()
    assert old in data
    manifest.write_bytes(data.replace(old, new, 1))
    segments = sorted(p.name for p in tmp_path.glob("seg-*"))
    with pytest.warns(StoreWarning, match="ignoring its manifest"), open_store(tmp_path) as w:
        check_many(w, expected)
        w.put_many([(KEYS[0], record(KEYS[0], 0))])
        w.compact()
    assert set(segments) <= {p.name for p in tmp_path.glob("seg-*")}, "a segment was deleted"
    with open_store(tmp_path, readonly=True) as r:
        assert r.recovery_note == ""
        check_many(r, expected)


def test_manifest_bit_flips_are_all_caught(tmp_path):
    expected = many_segments(tmp_path)
    manifest = tmp_path / "manifest.json"
    data = manifest.read_bytes()
    head = data.index(b"\n") * 8
    for bit in [*range(0, head, 13), *random.Random(0).sample(range(head, len(data) * 8), 40)]:
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << bit % 8
        manifest.write_bytes(bytes(damaged))
        with pytest.warns(StoreWarning), open_store(tmp_path, readonly=True) as r:
            check_many(r, expected)
    manifest.write_bytes(data)


def test_manifest_contradicting_the_segments_is_ignored(tmp_path):
    """A whole, checksummed manifest that no longer fits the segments: an old copy put back after
    compaction removed a segment it names; then one whose recorded batch end lost its commit
    trailer. The segments decide."""
    with open_store(tmp_path, segment_bytes=16 << 10) as s:
        s.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:4])])
        s.put_many([(k, record(k, 10 + i)) for i, k in enumerate(KEYS[4:8])])
    old = (tmp_path / "manifest.json").read_bytes()
    with open_store(tmp_path, segment_bytes=16 << 10) as s:
        s.put_many([(k, record(k, 20 + i)) for i, k in enumerate(KEYS[:4])])
        s.delete(KEYS[4:6])
        s.compact(0)
        assert not (tmp_path / "seg-00000001.tcseg").exists()
    new = (tmp_path / "manifest.json").read_bytes()

    def expect(r: DiskStore) -> None:
        assert KEYS[4] not in r and KEYS[5] not in r
        for i in (0, 1, 2, 3, 6, 7):
            assert_record(r.get(KEYS[i]), KEYS[i], 20 + i if i < 4 else 10 + i - 4)

    (tmp_path / "manifest.json").write_bytes(old)
    with pytest.warns(StoreWarning, match="seg-00000001.tcseg it names is missing"):
        with open_store(tmp_path) as w:
            expect(w)
    with open_store(tmp_path, readonly=True) as r:
        expect(r)
    with open_store(tmp_path, readonly=True) as r:
        expect(r)
        seg = max(r._index.segments.values(), key=lambda x: x.id)
        end = r._index.committed[seg.id]
    flip(seg.path, end - TRAILER.size + 3)
    with pytest.warns(StoreWarning, match="holds no commit of batch"):
        with open_store(tmp_path, readonly=True) as r:
            expect(r)


# ---------------------------------------------------------------------- readers and compaction


def test_refreshed_reader_never_sees_a_state_that_never_existed(tmp_path):
    """A segment created and compacted away between two refreshes, holding the deletes and the
    third save of a context: the old reader's refresh kept the deleted blocks and served parts
    of two saves. Now the reader notices the segment is gone and loads its index afresh."""
    frame = open_store(tmp_path / "probe").frame_bytes(ContextPart("c", 0), len(record(KEYS[0], 0)))
    w = open_store(tmp_path / "s", 1 << 30, segment_bytes=12 * frame)
    w.put_many([(k, record(k, i)) for i, k in enumerate(KEYS[:4])])
    w.save_context("c", [record(KEYS[0], 100 + p) for p in range(4)])
    r = open_store(tmp_path / "s", readonly=True)
    w.save_context("c", [record(KEYS[0], 200 + p) for p in range(4)])  # fills the first segment
    w.delete(KEYS[:4])  # a new segment from here
    w.save_context("c", [record(KEYS[0], 300 + p) for p in range(2)])
    w.put_many([(KEYS[10], record(KEYS[10], 10))] * 1)
    w.save_context("d", [record(KEYS[0], 400 + p) for p in range(12)])  # and another one
    w.compact(0)  # the segments the reader never saw, and the one it did, go
    first = r.segment_path(1)
    assert not first.exists()
    r.refresh()
    assert not any(k in r for k in KEYS[:4]), "a deleted block is still served"
    assert [bytes(x) for x in r.load_context("c")] == [record(KEYS[0], 300 + p) for p in range(2)]
    assert_record(r.get(KEYS[10]), KEYS[10], 10)
    r.close()
    w.close()


# ---------------------------------------------------------------------- failures and junk


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_junk_named_like_a_segment_is_a_clear_error(tmp_path, kind):
    with open_store(tmp_path / "s") as s:
        s.put_many([(KEYS[0], record(KEYS[0], 0))])
    junk = tmp_path / "s" / "seg-00000007.tcseg"
    if kind == "directory":
        junk.mkdir()
    else:
        (tmp_path / "elsewhere").mkdir()
        junk.symlink_to(tmp_path / "elsewhere")
    for readonly in (False, True):
        with pytest.raises(StoreError, match="seg-00000007.tcseg is named like a segment file but is not"):
            open_store(tmp_path / "s", readonly=readonly)


def test_unreadable_segment_is_an_error_for_readers_too(tmp_path, monkeypatch):
    with open_store(tmp_path) as s:
        s.put_many([(KEYS[0], record(KEYS[0], 0))])
    victim = str(sorted(tmp_path.glob("seg-*"))[0])
    real_open = os.open

    def denied(path, flags, *args):  # as chmod 000 would, for a user that is not root
        if str(path) == victim:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(StoreError, match=r"cannot open segment .*Permission denied"):
        open_store(tmp_path, readonly=True)


def test_failures_leave_no_stale_temporaries_or_empty_segments(tmp_path, monkeypatch):
    with open_store(tmp_path) as s:
        s.put_many([(KEYS[0], record(KEYS[0], 0))])
    (tmp_path / "manifest.json.tmp12345").write_text("a checkpoint a kill interrupted")
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with open_store(tmp_path) as s:
        assert not list(tmp_path.glob("manifest.json.tmp*"))
        before = sorted(tmp_path.glob("seg-*"))
        monkeypatch.setattr(os, "pwrite", full)
        for _ in range(3):  # each failed write starts a fresh segment
            with pytest.raises(StoreError, match="disk full"):
                s.put_many([(KEYS[1], record(KEYS[1], 1))])
        assert sorted(tmp_path.glob("seg-*")) == before, "a failed write left an empty segment"
        monkeypatch.setattr(os, "pwrite", real)
        s.put_many([(KEYS[1], record(KEYS[1], 1))])
    with open_store(tmp_path, readonly=True) as r:
        assert_record(r.get(KEYS[1]), KEYS[1], 1)
    empty = tmp_path / "seg-00000099.tcseg"  # a crash right after creating a segment
    empty.touch()
    with open_store(tmp_path):
        assert not empty.exists()


def test_older_format_is_refused_clearly(tmp_path):
    key = b'["b",0,0,0]'
    fixed = struct.pack("<4sBxHQQQI", b"TCSF", 1, len(key), 4096, 1, 100, 0)
    (tmp_path / "seg-00000001.tcseg").write_bytes(fixed + struct.pack("<I", zlib.crc32(fixed + key)) + key)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="older tiercache .*format 1.*reads format 2"):
            open_store(tmp_path, readonly=readonly)
