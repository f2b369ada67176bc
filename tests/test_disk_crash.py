"""A writer killed with SIGKILL at random points loses nothing it reported committed.

The writer runs in a forked child (forking after ``import torch`` saves a second of start-up per
kill): it puts blocks, deletes some, saves contexts and compacts, and after each call returns it
writes what it committed to a pipe. The parent kills it at a random moment, reopens the store
read-only (the state the next writer recovers from) and checks every reported block and context
bit for bit. Each block records its version in its first element, so a newer write the child
finished but had no time to report is recognised, not mistaken for corruption.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import torch

from tiercache import BlockKey, BlockLayout, BlockNotFoundError
from tiercache.io.codec import make_codec
from tiercache.io.store import DiskStore
from tiercache.io.record import decode_record, encode_record

LAYOUT = BlockLayout(kv_heads=2, block_tokens=16, head_dim=32, dtype=torch.float32)
RAW = make_codec("raw")
KEYS = [BlockKey(s, layer, i) for s in range(2) for layer in range(2) for i in range(10)]
CONTEXTS = ["ctx-0", "ctx-1"]
#: Kills per run; raise it (``TIERCACHE_CRASH_KILLS=500``) for a longer hunt.
KILLS = int(os.environ.get("TIERCACHE_CRASH_KILLS", "25"))


def block(key_id: int, version: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(version * 1000 + key_id)
    kv = torch.randn((2, *LAYOUT.shape), generator=g, dtype=LAYOUT.dtype)
    kv[0, 0, 0, 0] = float(version)  # exact: versions stay below 2**24
    return kv


def record(key: BlockKey, key_id: int, version: int) -> bytes:
    kv = block(key_id, version)
    return encode_record(RAW, kv[0], kv[1], LAYOUT, key)


def open_store(path, readonly: bool = False) -> DiskStore:
    # Small segments and frequent checkpoints so kills land in rotation, checkpoints and compaction.
    return DiskStore(path, 1 << 30, readonly=readonly, segment_bytes=256 << 10, checkpoint_every=5)


def writer(path, out: int, seed: int, version: int) -> None:
    """Write forever; announce each operation on ``out`` before it starts and after it returns."""
    rng = random.Random(seed)
    store = open_store(path)
    while True:
        version += 1
        x = rng.random()
        if x < 0.65:
            op = ["put", rng.sample(range(len(KEYS)), rng.randint(1, 12)), version]
        elif x < 0.8:
            present = [i for i, k in enumerate(KEYS) if k in store]
            op = ["del", rng.sample(present, min(len(present), rng.randint(1, 4))), version]
        elif x < 0.95:
            op = ["ctx", rng.randrange(len(CONTEXTS)), version, rng.randint(1, 40)]
        else:
            op = ["compact"]
        os.write(out, f"begin {json.dumps(op)}\n".encode())
        if op[0] == "put":
            store.put_many([(KEYS[i], record(KEYS[i], i, version)) for i in op[1]])
        elif op[0] == "del":
            store.delete([KEYS[i] for i in op[1]])
        elif op[0] == "ctx":
            store.save_context(CONTEXTS[op[1]], [record(BlockKey(0, 0, p), p, version) for p in range(op[3])])
        else:
            store.compact(0)
        os.write(out, b"end\n")


def apply(state: dict, op: list) -> dict:
    """The store's content (``("b", id)`` -> version, ``("c", c)`` -> (version, parts)) after ``op``."""
    state = dict(state)
    if op[0] == "put":
        state.update({("b", i): op[2] for i in op[1]})
    elif op[0] == "del":
        state.update({("b", i): None for i in op[1]})
    elif op[0] == "ctx":
        state[("c", op[1])] = (op[2], op[3])
    return state


def run_and_kill(path, seed: int, version: int, delay: float) -> tuple[list[list], list | None]:
    """Run a writer for ``delay`` seconds, then SIGKILL it; return the operations it finished
    and the one it had begun, if any (which may or may not have been committed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write until killed
        os.close(r)
        try:
            writer(path, w, seed, version)
        finally:
            os._exit(1)
    os.close(w)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    done, pending = [], None
    for line in b"".join(chunks).decode().split("\n"):
        if line.startswith("begin "):
            pending = json.loads(line[6:])
        elif line == "end":
            done.append(pending)
            pending = None
    return done, pending


def version_of(data, key: BlockKey, key_id: int) -> int:
    header, k, v = decode_record(data)
    assert header.key == key
    version = int(k[0, 0, 0].item())
    expected = block(key_id, version)
    assert torch.equal(k, expected[0]) and torch.equal(v, expected[1]), f"{key} version {version} differs"
    return version


def observe(path) -> dict:
    """What a reader finds in the store, every record checked bit for bit."""
    state: dict = {}
    with open_store(path, readonly=True) as store:
        for i, key in enumerate(KEYS):
            state[("b", i)] = version_of(store.get(key), key, i) if key in store else None
        for c, name in enumerate(CONTEXTS):
            try:
                records = store.load_context(name)
            except BlockNotFoundError:
                state[("c", c)] = None
                continue
            versions = {version_of(data, BlockKey(0, 0, p), p) for p, data in enumerate(records)}
            assert len(versions) == 1, f"context {name} mixes versions {versions}: a save was not atomic"
            state[("c", c)] = (versions.pop(), len(records))
    return state


def test_sigkill_loses_only_uncommitted_writes(tmp_path):
    rng = random.Random(int(os.environ.get("TIERCACHE_CRASH_SEED", "1234")))
    empty = {("b", i): None for i in range(len(KEYS))} | {("c", c): None for c in range(len(CONTEXTS))}
    state = dict(empty)
    finished = unsure = 0
    for trial in range(KILLS):
        done, pending = run_and_kill(tmp_path, seed=trial, version=(trial + 1) * 10_000,
                                     delay=rng.uniform(0.05, 0.5))
        for op in done:
            state = apply(state, op)
        found = observe(tmp_path)
        if pending is not None and found != state:
            # The operation the kill interrupted is all there or not at all.
            state = apply(state, pending)
            unsure += 1
        assert found == state, f"after kill {trial}: " + ", ".join(
            f"{k}: expected {state[k]}, found {found[k]}" for k in state if found[k] != state[k])
        finished += len(done)
    print(f"{KILLS} kills, {finished} operations finished, {unsure} kills landed inside an operation")
    assert finished > 5 * KILLS, f"the writer finished only {finished} operations; the test exercised little"
    with open_store(tmp_path) as store:  # a writer recovers the same state, and can write again
        store.put_many([(KEYS[0], record(KEYS[0], 0, 1))])
    assert observe(tmp_path) == apply(state, ["put", [0], 1])
