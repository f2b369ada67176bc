"""Fuzzing the disk store with random damage: bit flips and overwrites (random bytes or zeros, up
to 512 bytes) anywhere in its segment files and manifest, one to three per trial, on stores left
with a current manifest, a stale one (the writer died between checkpoints) or none.

Each trial builds a store from a random history (puts, overwrites, deletes, saved contexts
replaced and deleted, compaction, periodic checkpoints) while keeping a model of what it must
hold, damages a copy, and reads every key and context back three times: through a reader, through
the writer that opens it next, and through a reader after that writer's checkpoint. Each read
must return exactly what was last committed, or raise ``CorruptBlockError`` naming the segment
file and offset when the record's own bytes were hit (counted as reported). Anything else is a
failure: an undamaged record lost, an older version or a deleted key served, a context mixing
two saves, a damaged record missing instead of reported.

``-m slow`` runs 1,200 trials; the default run 60. ``TIERCACHE_FUZZ_TRIALS`` overrides both.
``TIERCACHE_FUZZ_DAMAGES=n`` and ``TIERCACHE_FUZZ_BYTES=b`` damage harder (1 to ``n`` places per
trial, overwrites of up to ``b`` bytes): beyond ``commits.MIN_GAP`` bytes one overwrite can take
both copies of what a batch held, and the first seed where that ends in a served stale or deleted
version fails the test.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest

from test_disk import record
from tiercache import BlockKey, BlockNotFoundError, CorruptBlockError, StoreError
from tiercache.io.frames import ContextPart
from tiercache.io.store import DiskStore

KEYS = [BlockKey(1, layer, i) for layer in range(2) for i in range(12)]
CONTEXTS = ["ctx-a", "ctx-b"]
TRIALS = int(os.environ.get("TIERCACHE_FUZZ_TRIALS", "0"))
DAMAGES = int(os.environ.get("TIERCACHE_FUZZ_DAMAGES", "0"))
MAX_BYTES = int(os.environ.get("TIERCACHE_FUZZ_BYTES", "512"))


def block_record(key: BlockKey, version: int) -> bytes:
    return record(key, version * 1000 + KEYS.index(key))


def part_record(part: int, version: int) -> bytes:
    return record(BlockKey(0, 0, part), version * 1000 + 500 + part)


def build(path: Path, rng: random.Random) -> dict:
    """A store from a random history; returns the model of what it holds and how it was left."""
    store = DiskStore(path, 1 << 20, segment_bytes=rng.choice([48 << 10, 96 << 10]), sync=False,
                      checkpoint_every=rng.randint(2, 8))
    blocks: dict[BlockKey, int | None] = {k: None for k in KEYS}
    contexts: dict[str, tuple[int, int] | None] = {c: None for c in CONTEXTS}
    for version in range(1, rng.randint(12, 30)):
        x = rng.random()
        present = [k for k in KEYS if blocks[k] is not None]
        if x < 0.45 or not present:
            keys = rng.sample(KEYS, rng.randint(1, 6))
            store.put_many([(k, block_record(k, version)) for k in keys])
            blocks.update({k: version for k in keys})
        elif x < 0.65:
            keys = rng.sample(present, min(len(present), rng.randint(1, 3)))
            store.delete(keys)
            blocks.update({k: None for k in keys})
        elif x < 0.85:
            name, parts = rng.choice(CONTEXTS), rng.randint(1, 6)
            store.save_context(name, [part_record(p, version) for p in range(parts)])
            contexts[name] = (version, parts)
        elif x < 0.92 and any(contexts.values()):
            name = rng.choice([c for c in CONTEXTS if contexts[c]])
            store.delete_context(name)
            contexts[name] = None
        else:
            store.compact(0)
    mode = rng.choice(["current", "stale", "none"])
    if mode == "stale":
        store._writer_lock.release()  # the writer died between checkpoints
    else:
        store.close()
        if mode == "none":
            (path / "manifest.json").unlink()
    return {"blocks": blocks, "contexts": contexts, "mode": mode}


def extents(path: Path) -> dict[object, list[tuple[str, int, int]]]:
    """Where each live record's frame (header, key and record) lies: file name, start, end."""
    with DiskStore(path, 0, readonly=True) as r:
        out: dict[object, list] = {}
        for key in r.keys():
            e = r.entry(key)
            owner = key.context if isinstance(key, ContextPart) else key
            out.setdefault(owner, []).append((r.segment_path(e.segment).name, e.offset, e.offset + e.span))
        return out


def damage(path: Path, rng: random.Random) -> list[tuple[str, int, int]]:
    """Flip or overwrite bytes at random places; return the damaged (file, start, end) runs."""
    files = sorted(p for p in path.iterdir() if p.name.startswith("seg-") or p.name == "manifest.json")
    runs = []
    for _ in range(rng.randint(1, DAMAGES) if DAMAGES else rng.choice([1, 1, 2, 3])):
        manifests = [p for p in files if p.name == "manifest.json"]
        if manifests and rng.random() < 0.15:
            target = manifests[0]
        else:
            segs = [p for p in files if p.name.startswith("seg-")]
            target = rng.choices(segs, weights=[p.stat().st_size for p in segs])[0]
        size = target.stat().st_size
        start = rng.randrange(size)
        how = rng.random()
        if how < 0.5:
            data = None
            end = start + 1
        else:
            end = min(size, start + rng.randint(1, MAX_BYTES))
            data = bytes(end - start) if how < 0.7 else rng.randbytes(end - start)
        with open(target, "r+b") as f:
            f.seek(start)
            old = f.read(end - start)
            new = bytes([old[0] ^ (1 << rng.randrange(8))]) if data is None else data
            f.seek(start)
            f.write(new)
        if new != old:
            runs.append((target.name, start, end))
    return runs


def check(store: DiskStore, model: dict, hit: set, tally: Counter) -> None:
    """Read every key and context; count outcomes. ``hit``: keys and context names whose records
    were damaged."""
    for key in KEYS:
        version = model["blocks"][key]
        try:
            data = bytes(store.get(key))
        except CorruptBlockError as exc:
            assert "offset" in str(exc) and "seg-" in str(exc), exc
            if key in hit:
                tally["damaged record reported"] += 1
            elif "may hold a newer version" in str(exc):
                tally["refused: damage made a newer version unknowable"] += 1
            else:
                tally["LOST undamaged record" if version is not None else "deleted key refused"] += 1
            continue
        except BlockNotFoundError:
            missing = "UNREPORTED damage" if key in hit else "LOST undamaged record"
            tally["ok" if version is None else missing] += 1
            continue
        if version is None:
            tally["DELETED key served"] += 1
        else:
            tally["ok" if data == block_record(key, version) else "STALE version served"] += 1
    for name in CONTEXTS:
        saved = model["contexts"][name]
        try:
            parts = [bytes(r) for r in store.load_context(name)]
        except CorruptBlockError as exc:
            if name in hit:
                tally["damaged context reported"] += 1
            elif "may hold a newer version" in str(exc):
                tally["refused: damage made a newer version unknowable"] += 1
            else:
                tally["LOST undamaged context" if saved is not None else "deleted context refused"] += 1
            continue
        except BlockNotFoundError:
            missing = "UNREPORTED damage" if name in hit else "LOST undamaged context"
            tally["ok" if saved is None else missing] += 1
            continue
        if saved is None:
            tally["DELETED context served"] += 1
        elif parts == [part_record(p, saved[0]) for p in range(saved[1])]:
            tally["ok"] += 1
        else:
            tally["MIXED or STALE context served"] += 1


def trial(root: Path, seed: int, tally: Counter) -> None:
    rng = random.Random(seed)
    pristine = root / f"pristine-{seed}"
    model = build(pristine, rng)
    where = extents(pristine)
    copy = root / f"damaged-{seed}"
    shutil.copytree(pristine, copy)
    runs = damage(copy, rng)
    hit = {owner for owner, spans in where.items()
           if any(f == g and a < e and s < b for f, a, b in spans for g, s, e in runs)}
    tally[f"trials ({model['mode']} manifest)"] += 1
    tally["records damaged"] += len(hit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DiskStore(copy, 0, readonly=True) as r:
            check(r, model, hit, tally)
            if model["mode"] == "none":  # a full scan reads every frame: each damaged one is listed
                for owner in hit:
                    for f, a, b in where[owner]:
                        if any(f == g and a < e and s < b for g, s, e in runs):
                            listed = any(f in d and f"offset {a}" in d for d in r.damage)
                            tally["damaged record listed" if listed else "UNLISTED damaged record"] += 1
        try:
            w = DiskStore(copy, 1 << 20, sync=False)
        except StoreError as exc:  # only a clear refusal is acceptable, and it must be rare
            tally[f"writer refused: {str(exc)[:60]}"] += 1
            return
        check(w, model, hit, tally)
        w.close()
        with DiskStore(copy, 0, readonly=True) as r:
            check(r, model, hit, tally)
    shutil.rmtree(pristine)
    shutil.rmtree(copy)


def run_trials(root: Path, trials: int, first_seed: int) -> Counter:
    tally: Counter = Counter()
    for seed in range(first_seed, first_seed + trials):
        before = +tally
        trial(root, seed, tally)
        bad = {k: tally[k] - before[k] for k in tally if k.isupper() or k.split(" ")[0].isupper()}
        assert not any(bad.values()), f"seed {seed}: {bad}"
    return tally


def report(tally: Counter) -> None:
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(tally.items())))


def test_random_damage_never_serves_a_state_that_never_existed(tmp_path):
    tally = run_trials(tmp_path, TRIALS or 60, first_seed=0)
    report(tally)
    assert tally["damaged record reported"] > 0 and tally["ok"] > 0


@pytest.mark.slow
def test_random_damage_thousand_trials(tmp_path):
    tally = run_trials(tmp_path, TRIALS or 1200, first_seed=100_000)
    report(tally)
    assert sum(v for k, v in tally.items() if k.startswith("trials")) >= 1000
