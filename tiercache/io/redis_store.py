"""``RedisStore``: records in a Redis server, the tier many processes and machines share.

It is a ``ContextBackend`` (saved contexts, for ``ContextStore("redis://host:port/db", ...)``)
and holds the blocks of ``tiercache.tiers.remote.RemoteTier`` (a backing tier of the manager). It
speaks to Redis through the ``redis`` client (with the ``hiredis`` reply parser: 1.25-1.7x
faster than the pure-Python one on a context's records, see benchmarks/RESULTS.md).

Keys, under ``prefix`` (default ``"tiercache"``):

- ``{prefix}:ctx:{name}``: a context's manifest (JSON): its parts' sha256 digests and lengths,
  the fingerprint digest its records name, its bytes;
- ``{prefix}:part:{name}:{digest}``: one record of a context, content-addressed: ``digest`` is
  the sha256 of the record's bytes, checked on every read, so a record swapped for another
  (valid, checksummed) one is refused;
- ``{prefix}:meta:{name}``: what encoding measured (JSON; may be lost without harm);
- ``{prefix}:blk:{owner}:{seq}:{layer}:{index}``: a block of one backing tier instance
  (``owner``), private to it, expiring unless read or written again (``RemoteTier``);
- ``{prefix}:stats`` and ``{prefix}:hits``: counters (loads, hits, misses, refused records,
  saves, bytes) and loads served per context, for ``tiercache inspect``.

**Commit protocol (lock-free).** A save writes its parts first, each with an expiry
(``PENDING_SECONDS``), then commits with one Lua script, which Redis runs atomically: if every
part still exists it removes their expiry and sets the manifest; else nothing is committed. A
reader reads the manifest, then every part in one pipelined round trip. So a reader sees a
context whole or not at all; a writer killed before the commit leaves parts that expire.

**Eviction and restarts.** Under a ``maxmemory`` policy Redis may evict any key: a manifest
without all of its parts, or no manifest, is a clean miss (``BlockNotFoundError``) and the
caller recomputes. Connections lost (a restart) are retried with backoff for about
``reconnect_seconds``; then ``StoreError`` says the server cannot be reached. Nothing is served
that fails its digest, checksum or fingerprint: such a record raises ``CorruptBlockError`` (or
``FingerprintError``) and is counted as refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..errors import (
    BlockNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlockError,
    FingerprintError,
    StoreError,
)
from .frames import ContextPart, StoreKey, check_context_key
from .record import read_header

#: Address schemes of a Redis server (``redis://host:port/db``, TLS, a unix socket).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: Seconds the parts of an uncommitted save live (a writer killed mid-save leaves them behind).
PENDING_SECONDS = 3600
#: Hex digits of a part's content digest (sha256; 128 bits).
_PART_DIGEST = 32
_MANIFEST_FORMAT = "tiercache-context"
_MANIFEST_VERSION = 1
#: KEYS = [manifest, part...], ARGV = [manifest JSON]: commit only if every part is still there.
_COMMIT = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return i - 1 end
end
for i = 2, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('SET', KEYS[1], ARGV[1])
return 0
"""
#: Counters kept in ``{prefix}:stats``.
COUNTERS = ("loads", "hits", "misses", "refused", "saves", "bytes_read", "bytes_written")


def part_digest(record: bytes | memoryview) -> str:
    """The content digest a part is stored and checked under."""
    return hashlib.sha256(record).hexdigest()[:_PART_DIGEST]


class RedisStore:
    """Records in the Redis server at ``url`` (``redis://host:port/db``, ``rediss://...``,
    ``unix:///path/redis.sock?db=N``), under ``prefix``.

    ``io_threads``: threads that encode and decode records. ``reconnect_seconds``: how long a
    lost connection is retried before ``StoreError``. ``timeout_seconds``: the longest one
    reply may take (a pipelined read of a large context is one reply per record).
    """

    def __init__(self, url: str, *, prefix: str = "tiercache", io_threads: int = 8,
                 reconnect_seconds: float = 5.0, timeout_seconds: float = 60.0) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        backoff = ExponentialBackoff(cap=0.5, base=0.02)
        retries, waited = 0, 0.0
        while waited < reconnect_seconds:  # as many retries as the backoff spreads over that time
            retries += 1
            waited += backoff.compute(retries)
        try:
            self.client = redis.Redis.from_url(
                url, socket_timeout=timeout_seconds, socket_connect_timeout=min(2.0, reconnect_seconds),
                retry=Retry(backoff, retries), retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                health_check_interval=30)
        except ValueError as exc:
            raise ConfigError(f"not a Redis address: {url!r}: {exc}") from exc
        self._errors = (redis.RedisError,)
        self._oom = redis.exceptions.OutOfMemoryError
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="tiercache-redis")
        self._lock = threading.Lock()
        self._closed = False
        #: Round trips to the server and records read, by this object (for benchmarks).
        self.round_trips = 0
        self.records_read = 0
        self._commit = self.client.register_script(_COMMIT)
        self._call(self.client.ping)  # a wrong address is reported now, not at the first save

    # ------------------------------------------------------------------ plumbing

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._pool

    def key(self, *parts: object) -> str:
        """``prefix:part:part...``."""
        return ":".join([self.prefix, *map(str, parts)])

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One round trip, with Redis' errors turned into tiercache's."""
        if self._closed:
            raise StoreError(f"redis store {self.url} is closed")
        with self._lock:
            self.round_trips += 1
        try:
            return fn(*args)
        except self._oom as exc:
            raise CapacityError(f"redis at {self.url} is full (maxmemory) and its eviction policy frees "
                                f"nothing for this write: {exc}; raise maxmemory, or set maxmemory-policy "
                                "allkeys-lru for a cache of contexts") from exc
        except self._errors as exc:
            raise StoreError(f"redis at {self.url}: {type(exc).__name__}: {exc}") from exc

    def _pipeline(self, fill: Callable[[Any], None], transaction: bool = False) -> list:
        """Commands ``fill`` queues on a pipeline, sent in one round trip; their replies."""
        def run() -> list:
            pipe = self.client.pipeline(transaction=transaction)
            fill(pipe)
            return pipe.execute()

        return self._call(run)

    def count(self, **counters: int) -> None:
        """Add to the shared counters (one round trip)."""
        def fill(pipe) -> None:
            for name, n in counters.items():
                pipe.hincrby(self.key("stats"), name, n)

        self._pipeline(fill)

    # ------------------------------------------------------------------ contexts

    def save_context(self, name: str, records: Sequence[bytes | memoryview]) -> int:
        """Store context ``name`` as ``records`` (parts first, the manifest last); return its bytes.
        ``StoreError`` if the parts keep vanishing before the commit (a restarting server)."""
        check_context_key(name)
        if not records:
            raise StoreError(f"context {name!r}: nothing to save")
        header, _ = read_header(records[0], f"context {name!r} record 0")
        digests = list(self._pool.map(part_digest, records))
        keys = [self.key("part", name, d) for d in digests]
        manifest = json.dumps({"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION,
                               "parts": [[d, len(r)] for d, r in zip(digests, records)],
                               "fingerprint": header.fingerprint, "bytes": sum(map(len, records)),
                               "saved": time.time()}, separators=(",", ":"))
        for _ in range(2):  # once more if a restart lost the parts between the two round trips
            old = self._pipeline(lambda pipe: self._put_parts(pipe, name, keys, records))[0]
            missing = self._call(self._commit, [self.key("ctx", name), *keys], [manifest])
            if not missing:
                break
        else:
            raise StoreError(f"redis at {self.url}: context {name!r} not saved: part {missing - 1} vanished "
                             "before the commit twice (is the server restarting or evicting?)")
        nbytes = sum(map(len, records))
        self._after_save(name, old, set(keys), nbytes)
        return nbytes

    def _put_parts(self, pipe, name: str, keys: list[str], records: Sequence[bytes | memoryview]) -> None:
        pipe.get(self.key("ctx", name))
        for key, record in zip(keys, records):
            pipe.set(key, bytes(record) if isinstance(record, memoryview) else record, ex=PENDING_SECONDS)

    def _after_save(self, name: str, old: bytes | None, kept: set[str], nbytes: int) -> None:
        """Count the save and drop the parts of the context it replaced (a reader holding the old
        manifest then misses, cleanly)."""
        stale = []
        if old is not None:
            try:
                stale = [k for k in self._part_keys(name, self._parse_manifest(name, old)) if k not in kept]
            except CorruptBlockError:
                pass  # an unreadable old manifest names nothing to clean up

        def fill(pipe) -> None:
            if stale:
                pipe.delete(*stale)
            pipe.hincrby(self.key("stats"), "saves", 1)
            pipe.hincrby(self.key("stats"), "bytes_written", nbytes)

        self._pipeline(fill)

    def load_context(self, name: str, verify: bool = True,
                     then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Any]:
        """The records of context ``name``, read in one pipelined round trip after its manifest;
        each checked against its digest (and checksum, with ``verify``), then passed through
        ``then`` on the executor. A miss or a refusal is counted in the shared counters."""
        raw = self._call(self.client.get, self.key("ctx", name))
        if raw is None:
            self.count(loads=1, misses=1)
            raise BlockNotFoundError(f"redis at {self.url} holds no context {name!r}")
        try:
            manifest = self._parse_manifest(name, raw)
        except CorruptBlockError:
            self.count(loads=1, refused=1)
            raise
        keys = self._part_keys(name, manifest)
        values = self._pipeline(lambda pipe: [pipe.get(k) for k in keys])
        with self._lock:
            self.records_read += len(keys)
        gone = [i for i, v in enumerate(values) if v is None]
        if gone:
            self.count(loads=1, misses=1)
            raise BlockNotFoundError(f"redis at {self.url}: context {name!r} lost {len(gone)} of its "
                                     f"{len(keys)} parts (first: part {gone[0]}; evicted by maxmemory?): "
                                     "a miss")

        def check(i: int) -> Any:
            where = f"redis {self.url} context {name!r} part {i}"
            digest, length = manifest["parts"][i]
            record = memoryview(values[i])
            if len(record) != length or part_digest(record) != digest:
                raise CorruptBlockError(f"{where}: {len(record)} bytes whose sha256 is not the {length} "
                                        "bytes the manifest names: refused")
            if verify:
                read_header(record, where)
            return then(ContextPart(name, i), record, where) if then is not None else record

        try:
            out = list(self._pool.map(check, range(len(keys))))
        except (CorruptBlockError, FingerprintError):
            self.count(loads=1, refused=1)
            raise

        def fill(pipe) -> None:
            pipe.hincrby(self.key("stats"), "loads", 1)
            pipe.hincrby(self.key("stats"), "hits", 1)
            pipe.hincrby(self.key("stats"), "bytes_read", sum(map(len, values)))
            pipe.hincrby(self.key("hits"), name, 1)

        self._pipeline(fill)
        return out

    def manifest(self, name: str) -> dict | None:
        """The manifest of context ``name`` (None if absent); ``CorruptBlockError`` if unreadable."""
        raw = self._call(self.client.get, self.key("ctx", name))
        return None if raw is None else self._parse_manifest(name, raw)

    def _parse_manifest(self, name: str, raw: bytes) -> dict:
        where = f"redis {self.url} context {name!r} manifest"
        try:
            doc = json.loads(raw)
            ok = (doc["format"] == _MANIFEST_FORMAT and doc["version"] == _MANIFEST_VERSION and doc["parts"]
                  and all(isinstance(d, str) and len(d) == _PART_DIGEST and isinstance(n, int) and n > 0
                          for d, n in doc["parts"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptBlockError(f"{where} is not readable: {exc!r}: refused") from None
        if not ok:
            raise CorruptBlockError(f"{where} is not a version-{_MANIFEST_VERSION} {_MANIFEST_FORMAT} "
                                    "manifest: refused")
        return doc

    def _part_keys(self, name: str, manifest: dict) -> list[str]:
        return [self.key("part", name, d) for d, _ in manifest["parts"]]

    def has_context(self, name: str) -> bool:
        return bool(self._call(self.client.exists, self.key("ctx", name)))

    def contexts(self) -> list[str]:
        """Names of the committed contexts (sorted)."""
        head = len(self.key("ctx", ""))
        return sorted(k.decode()[head:] for k in self._scan(self.key("ctx", "*")))

    def _scan(self, pattern: str) -> list[bytes]:
        return self._call(lambda: list(self.client.scan_iter(match=pattern, count=1000)))

    def delete_context(self, name: str) -> None:
        """Remove context ``name``: its manifest first (readers miss from then on), then its parts."""
        raw = self._call(self.client.get, self.key("ctx", name))
        if raw is None:
            raise BlockNotFoundError(f"redis at {self.url} holds no context {name!r}")
        try:
            parts = self._part_keys(name, self._parse_manifest(name, raw))
        except CorruptBlockError:
            parts = []
        self._call(self.client.delete, self.key("ctx", name), self.key("meta", name))
        if parts:
            self._call(self.client.delete, *parts)
        self._call(self.client.hdel, self.key("hits"), name)

    def context_meta(self, name: str) -> dict | None:
        raw = self._call(self.client.get, self.key("meta", name))
        try:
            return None if raw is None else dict(json.loads(raw))
        except (ValueError, TypeError):
            return None  # a description only

    def put_context_meta(self, name: str, meta: dict) -> None:
        self._call(self.client.set, self.key("meta", name), json.dumps(meta, separators=(",", ":")))

    def stats(self) -> dict[str, int]:
        """The shared counters (``COUNTERS``), over every process that used this server and prefix."""
        raw = self._call(self.client.hgetall, self.key("stats"))
        return {name: int(raw.get(name.encode(), 0)) for name in COUNTERS}

    def context_hits(self) -> dict[str, int]:
        """Loads served per context name."""
        return {k.decode(): int(v) for k, v in self._call(self.client.hgetall, self.key("hits")).items()}

    def pending_parts(self) -> int:
        """Parts of saves not (yet) committed: written by a writer still at work, or killed."""
        keys = self._scan(self.key("part", "*"))
        ttls = self._pipeline(lambda pipe: [pipe.ttl(k) for k in keys]) if keys else []
        return sum(1 for t in ttls if t >= 0)

    def block_owners(self) -> dict[str, int]:
        """Blocks held per backing-tier instance (``RemoteTier.owner``)."""
        head = len(self.key("blk", ""))
        owners: dict[str, int] = {}
        for key in self._scan(self.key("blk", "*")):
            owner = key.decode()[head:].split(":", 1)[0]
            owners[owner] = owners.get(owner, 0) + 1
        return owners

    def memory(self) -> dict[str, Any]:
        """The server's memory settings and usage (INFO memory and stats)."""
        info = self._call(self.client.info)
        return {k: info.get(k) for k in ("used_memory", "maxmemory", "maxmemory_policy", "evicted_keys",
                                         "redis_version")}

    # ------------------------------------------------------------------ blocks of a backing tier

    def new_owner(self) -> str:
        """A fresh name for the blocks of one backing tier instance (host, pid and random bits)."""
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def put_records(self, keys: Sequence[str], records: Sequence[bytes], ttl_seconds: int) -> None:
        """Store ``records`` under ``keys`` (full key names), each expiring after ``ttl_seconds``,
        in one round trip."""
        def fill(pipe) -> None:
            for key, record in zip(keys, records):
                pipe.set(key, record, ex=ttl_seconds)

        self._pipeline(fill)

    def get_records(self, keys: Sequence[str], ttl_seconds: int) -> list[bytes | None]:
        """The records under ``keys`` (None where absent), their expiry renewed to
        ``ttl_seconds``, in one round trip."""
        values = self._pipeline(lambda pipe: [pipe.getex(k, ex=ttl_seconds) for k in keys])
        with self._lock:
            self.records_read += len(keys)
        return values

    def delete_records(self, keys: Sequence[str]) -> None:
        if keys:
            self._call(self.client.delete, *keys)

    # ------------------------------------------------------------------ life

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish decoding in flight and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> "RedisStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["COUNTERS", "PENDING_SECONDS", "RedisStore", "part_digest"]
