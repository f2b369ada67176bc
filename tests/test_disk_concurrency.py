"""Readers beside a writer that compacts continuously: every refresh shows one state the writer
passed through. The writer keeps a sliding window of blocks (put the next, delete the oldest)
and saves one context again and again with a varying number of parts, on segments so small
that compaction removes several between two refreshes of a reader. A reader must never see a
deleted block, miss a live one, mix two saves of the context, or fail to read what it indexed.

The default run lasts 3 s; ``-m slow`` 60 s (``TIERCACHE_CONCURRENCY_SECONDS`` overrides both).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from test_disk import record
from tiercache import BlockKey
from tiercache.io.store import DiskStore

WINDOW = 4
READERS = 3
SECONDS = float(os.environ.get("TIERCACHE_CONCURRENCY_SECONDS", "0"))


def block(i: int) -> tuple[BlockKey, bytes]:
    key = BlockKey(2, 0, i)
    return key, record(key, i)


def parts(version: int) -> list[bytes]:
    return [record(BlockKey(0, 0, p), 100_000 + 10 * version + p) for p in range(1 + version % 5)]


def writer(path, stop: threading.Event, done: list[int], errors: list[str]) -> None:
    try:
        with DiskStore(path, 96 << 10, segment_bytes=32 << 10, sync=False, checkpoint_every=7) as w:
            i = 0
            while not stop.is_set():
                i += 1
                w.put_many([block(i)])
                w.save_context("c", parts(i))
                if i > WINDOW:
                    w.delete([block(i - WINDOW)[0]])
                if i % 3 == 0:
                    w.compact(0)
                done.append(i)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"writer: {exc!r}")


def check(r: DiskStore) -> str:
    """What is wrong with the reader's current view ("" if it is a state the writer passed)."""
    ids = sorted(k.index for k in r.block_keys())
    if not ids:
        return ""
    m = ids[-1]
    full = list(range(max(1, m - WINDOW), m + 1))  # after putting m, before deleting m - WINDOW
    trimmed = list(range(max(1, m - WINDOW + 1), m + 1)) if m > WINDOW else full
    saves = {m - 1, m} if ids == full else {m} if ids == trimmed else None
    if saves is None:
        return f"blocks {ids} were never live together"
    for key, data in zip(r.block_keys(), r.get_many(r.block_keys())):
        if bytes(data) != block(key.index)[1]:
            return f"{key} does not hold what was written"
    got = [bytes(x) for x in r.load_context("c")] if r.has_context("c") else None
    if got is None:
        return "" if m == 1 else "the context vanished"
    if not any(got == parts(v) for v in saves):
        return f"the context is not the save of {sorted(saves)} (blocks up to {m})"
    return ""


def reader(path, seed: int, stop: threading.Event, errors: list[str], stats: list[int]) -> None:
    rng = random.Random(seed)
    try:
        with DiskStore(path, 0, readonly=True) as r:
            checks = 0
            while not stop.is_set():
                time.sleep(rng.uniform(0, 0.05))  # now and then long enough for segments to come and go
                r.refresh()
                problem = check(r)
                if problem:
                    errors.append(problem)
                    return
                checks += 1
            stats.append((checks, r.reloads))
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"reader: {exc!r}")


def run(path, seconds: float) -> tuple[int, list, list[str]]:
    stop, done, errors, stats = threading.Event(), [], [], []
    w = threading.Thread(target=writer, args=(path, stop, done, errors))
    w.start()
    while not done and not errors:
        time.sleep(0.01)
    readers = [threading.Thread(target=reader, args=(path, i, stop, errors, stats)) for i in range(READERS)]
    for t in readers:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in [w, *readers]:
        t.join()
    return len(done), stats, errors


def test_readers_beside_a_compacting_writer_see_only_real_states(tmp_path):
    writes, stats, errors = run(tmp_path, SECONDS or 3)
    print(f"\n  {writes} writer steps; readers' (checks, reloads): {stats}")
    assert not errors, errors[:5]
    assert writes > 20 and all(checks > 5 for checks, _ in stats)
    assert sum(reloads for _, reloads in stats) > 0, "no reader saw a segment come and go"


@pytest.mark.slow
def test_readers_beside_a_compacting_writer_for_a_minute(tmp_path):
    writes, stats, errors = run(tmp_path, SECONDS or 60)
    print(f"\n  {writes} writer steps; readers' (checks, reloads): {stats}")
    assert not errors, errors[:5]
