"""``tiercache inspect PATH``: what a store directory or a Redis context tier holds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .options import compression, say

#: The subdirectory of a demo's store that holds the tiers' disk while the demo runs (removed at
#: its end: those blocks die with the session; what stays is the saved stream).
TIERS_DIR = "tiers"


def register(commands) -> None:
    """Add the ``inspect`` command to ``commands`` (argparse subparsers)."""
    inspect = commands.add_parser("inspect", help="show what a store directory or Redis context tier holds",
                                  description=run.__doc__)
    inspect.add_argument("path", help="a stream session, context store or disk store directory, or a Redis "
                                      "address (redis://host:port/db)")
    inspect.add_argument("--model", metavar="PATH_OR_DIR", default=None,
                         help="also say whether each saved context fits this checkpoint (its config is read)")
    inspect.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Show what a store holds: a directory (a stream session: stream.json + saved/; a context
    store: contexts-meta.json; or a bare disk store) or a Redis server (redis://host:port/db):
    contexts, blocks, bytes, fingerprints, codecs, and for Redis the shared hit counters. With
    --model, also whether each saved context fits that checkpoint and was stored by it (its
    config and weights files are read, not loaded)."""
    import json

    from ..errors import StoreError
    from ..contexts.backends import SIDECAR_NAME
    from ..io.redis_store import REDIS_SCHEMES

    model = _geometry(args.model) if args.model else None
    if args.path.startswith(REDIS_SCHEMES):
        _inspect_redis(args.path, model)
        return 0
    path = Path(args.path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    stream = path / "stream.json"
    if stream.exists():
        doc = json.loads(stream.read_text(encoding="utf-8"))
        say(f"stream session: model {doc.get('model_id')}, {doc.get('tokens')} tokens saved as context "
            f"{doc.get('context')!r}, disk codec {doc.get('config', {}).get('disk_codec')}")
        say(f"  fingerprint {_describe(doc.get('fingerprint'))}")
        if model is not None:
            say(f"  reopens with {model.id}: {_same_model(doc.get('fingerprint'), model)}")
    meta = path / SIDECAR_NAME
    if meta.exists():
        contexts = json.loads(meta.read_text(encoding="utf-8")).get("contexts", {})
        say(f"context store: {len(contexts)} documents measured at encode")
        for key, info in contexts.items():
            raw, stored = info["raw_bytes"], info["stored_bytes"]
            say(f"  {key[:16]}  {info['tokens']} tokens, prefill {info['prefill_seconds']:.2f} s, "
                f"{raw / 2**20:.1f} MiB raw -> {stored / 2**20:.1f} MiB {info['codec']} "
                f"({compression(raw, stored)}), fingerprint {_describe(info.get('fingerprint'))}")
    stores = store_dirs(path)
    if not stores:
        raise StoreError(f"{path} holds no tiercache disk store")
    for p in stores:
        _inspect_store(p, model)
    return 0


@dataclass(frozen=True)
class _Geometry:
    """What a saved context must match to load into a model: its id and KV shape; and what says
    it was stored by that model: its config's digest and its weights files' (None: no
    safetensors files)."""

    id: str
    layers: int
    kv_heads: int
    head_dim: int
    config: str
    weights: str | None


def _geometry(path: str) -> _Geometry:
    """The KV geometry and fingerprint parts of the checkpoint in directory ``path``, from its
    config and weights files (hashed once, then cached), without loading it."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from ..errors import ConfigError
    from ..fingerprint import config_digest, files_digest, model_id
    from ..spec import config_spec

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {path}: no transformers config could be read: {exc}") from exc
    files = sorted(Path(path).glob("*.safetensors"))
    # The id stores and streams record: the one a model loaded from ``path`` gets.
    spec = config_spec(config)
    return _Geometry(model_id(SimpleNamespace(config=config)), spec.layers, spec.kv_heads, spec.head_dim,
                     config_digest(config),
                     "files:" + files_digest(files) if files else None)


def _describe(fingerprint: dict | None) -> str:
    """A stored fingerprint (``Fingerprint.to_json()``) in one line."""
    from ..errors import FingerprintError
    from ..fingerprint import Fingerprint

    if not fingerprint:
        return "none (stored before fingerprints: refused when loaded)"
    try:
        return Fingerprint.from_json(fingerprint).describe()
    except FingerprintError as exc:
        return f"unreadable ({exc})"


def _same_model(fingerprint: dict | None, model: _Geometry) -> str:
    """Whether a stored fingerprint's model is the checkpoint ``model`` (dtype aside: it is
    chosen when loading)."""
    if not fingerprint:
        return "no: it was stored without a fingerprint"
    saved = fingerprint.get("model", {})
    if saved.get("config") != model.config:
        return f"no: it was stored by a model of another config ({saved.get('name')!r})"
    if model.weights is None or not str(saved.get("weights", "")).startswith("files:"):
        return (f"config matches; the weights were hashed from {'memory' if model.weights else 'files'} "
                "on one side only: load the model to compare them")
    if saved["weights"] != model.weights:
        return f"no: it was stored by other weights ({saved.get('name')!r}, same config)"
    return f"yes (stored as {saved.get('dtype')})"


def _fits(have: tuple[int, int, int], model: _Geometry) -> str:
    """Whether KV of ``have`` = (layers, KV heads, head dim) loads into ``model``."""
    need = (model.layers, model.kv_heads, model.head_dim)
    why = "no: it holds {} layers x {} KV heads x {} dims, the model has {} x {} x {}"
    return "yes" if have == need else why.format(*have, *need)


def _inspect_store(path: Path, model: _Geometry | None) -> None:
    from ..errors import FingerprintError
    from ..io.frames import ContextPart
    from ..io.record import read_header
    from ..io.store import DiskStore

    with DiskStore(path, 0, readonly=True) as store:
        parts: dict[str, list[int]] = {}
        blocks = 0
        for key in store.keys():
            if isinstance(key, ContextPart):
                parts.setdefault(key.context, []).append(store.entry(key).frame_len)
            else:
                blocks += 1
        segments = sorted(path.glob("seg-*"))
        say(f"disk store {path}: {len(parts)} contexts, {blocks} blocks, {store.used_bytes / 2**20:.2f} MiB "
            f"live in {len(segments)} segments ({store.disk_bytes / 2**20:.2f} MiB on disk)")
        for name in store.contexts():
            stored = sum(parts[name])
            size = f"{len(parts[name])} records, {stored / 2**20:.2f} MiB"
            try:
                header, _ = read_header(store.get(ContextPart(name, 0)), f"context {name!r} record 0")
                last, _ = read_header(store.get(ContextPart(name, len(parts[name]) - 1)), f"context {name!r}")
            except FingerprintError:
                say(f"  context {name}: {size}; no fingerprint (an older tiercache's): refused when loaded")
                continue
            lay = header.layout
            layers = last.key.layer + 1
            # Records hold block_tokens tokens of one layer each, the last of each layer fewer.
            tokens = (len(parts[name]) // layers - 1) * lay.block_tokens + last.tokens
            raw = layers * tokens * 2 * lay.kv_heads * lay.head_dim * lay.dtype.itemsize
            say(f"  context {name}: {tokens} tokens, {size} for {raw / 2**20:.2f} MiB of raw KV "
                f"({compression(raw, stored)})")
            say(f"    codec {header.codec} {header.params}, {layers} layers x {lay.kv_heads} KV heads x "
                f"{lay.head_dim} dims, {lay.dtype}, fingerprint {(header.fingerprint or '-')[:16]}")
            if model is not None:
                say(f"    loads into {model.id}: {_fits((layers, lay.kv_heads, lay.head_dim), model)}")
        for seg in segments:
            say(f"  segment {seg.name}: {seg.stat().st_size / 2**20:.2f} MiB")


def _inspect_redis(url: str, model: _Geometry | None) -> None:
    """What a Redis context tier holds: server memory, the shared counters, contexts by
    fingerprint, uncommitted parts and backing-tier blocks."""
    from collections import Counter

    from ..errors import CorruptBlockError
    from ..io.redis_store import RedisStore

    with RedisStore(url) as store:
        mem, stats, hits = store.memory(), store.stats(), store.context_hits()
        names = store.contexts()
        manifests, metas = {}, {}
        for name in names:
            try:
                manifests[name] = store.manifest(name)
            except CorruptBlockError as exc:
                say(f"  context {name[:16]}: {exc}")
            metas[name] = store.context_meta(name) or {}
        live = {n: m for n, m in manifests.items() if m is not None}
        total = sum(m["bytes"] for m in live.values())
        say(f"redis {url} (redis {mem['redis_version']}, prefix {store.prefix}): {len(live)} contexts, "
            f"{total / 2**20:.2f} MiB of records; server memory {mem['used_memory'] / 2**20:.1f} MiB "
            f"used of {(mem['maxmemory'] or 0) / 2**20:.0f} MiB maxmemory (0: none), "
            f"policy {mem['maxmemory_policy']}, {mem['evicted_keys']} keys evicted")
        say(f"counters: {stats['loads']} loads: {stats['hits']} hits, {stats['misses']} misses, "
            f"{stats['refused']} refused (damaged or foreign records); {stats['saves']} saves; "
            f"{stats['bytes_read'] / 2**20:.1f} MiB read, {stats['bytes_written'] / 2**20:.1f} MiB written")
        blocks = store.block_owners()
        say(f"uncommitted parts (a save at work, or killed: they expire): {store.pending_parts()}; "
            f"backing-tier blocks: {sum(blocks.values())} of {len(blocks)} tier instances")
        by_fp = Counter(m["fingerprint"] for m in live.values())
        for digest, count in by_fp.most_common():
            described = next((metas[n].get("fingerprint") for n, m in live.items()
                              if m["fingerprint"] == digest and metas[n].get("fingerprint")), None)
            named = _describe(described) if described else (digest or "-")[:16]
            say(f"fingerprint {named}: {count} contexts")
        for name, m in sorted(live.items()):
            meta = metas[name]
            tokens = f"{meta['tokens']:>7} tokens" if "tokens" in meta else " " * 14
            raw = meta.get("raw_bytes")
            raw = f" ({compression(raw, m['bytes'])} of {raw / 2**20:.2f} MiB raw)" if raw else ""
            say(f"  {name[:16]}  {len(m['parts']):>5} records {m['bytes'] / 2**20:>8.2f} MiB  {tokens}")
            say(f"    fingerprint {(m['fingerprint'] or '-')[:16]}  {hits.get(name, 0)} hits  "
                f"codec {meta.get('codec', '?')}{raw}")
            if model is not None and meta.get("fingerprint"):
                fp = meta["fingerprint"]
                have = (fp["layers"], fp["kv_heads"], fp["head_dim"])
                say(f"    loads into {model.id}: {_fits(have, model)}; "
                    f"stored by it: {_same_model(fp, model)}")


def holds_store(path: Path) -> bool:
    """Whether ``path`` holds a tiercache disk store or saved stream."""
    return bool(store_dirs(path)) or (path / "stream.json").exists()


def store_dirs(path: Path) -> list[Path]:
    """The disk stores in ``path``: itself, a saved stream's ``saved/``, and the tiers' disk of a
    demo that is running or was killed (``TIERS_DIR``)."""
    return [p for p in (path, path / "saved", path / TIERS_DIR)
            if (p / "manifest.json").exists() or any(p.glob("seg-*"))]
