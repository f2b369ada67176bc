"""Is loading a stored context from the shared Redis tier faster than recomputing it, and how
does it compare with the local disk tier?

A real-prose 8K-token SmolLM2-135M-Instruct context (30 layers x 3 KV heads x 64 dims, fp32) is
prefilled once, as ``ContextStore.encode`` does it (``batch.prefill``: full attention in
512-token chunks into a ``TieredCache``), and once with plain transformers (one forward into a
``DynamicCache``: the cheapest recompute there is). Its KV is saved with each codec into a
``redis-server`` on loopback (started here on a free port, or ``--redis URL``) and into a disk
``ContextStore`` directory. Then, in the same run, best of ``--repeats``:

- **redis**: ``ContextStore("redis://...").load(key)``: manifest, then every record in one
  pipelined round trip, digests and checksums verified, decoded, imported into a fresh
  ``TieredCache`` (what a batch worker does before answering);
- **disk warm / cold**: the same from the disk store, its segment files in the page cache, and
  dropped from it first;
- the ratios: recompute time / Redis load time (target: >= 5x, against the faster recompute),
  also in CPU seconds (this process's threads plus the Redis server's: the work, which a
  shared machine's load does not stretch as it stretches wall time), Redis load time / disk
  load time; and records per round trip (from ``RedisStore``'s counters: the manifest, every
  record of the context in one reply, the counters);
- one pipelined read of the first codec's records with redis-py's two reply parsers, hiredis
  (what tiercache installs) and pure Python.

Prints a table and writes benchmarks/results/bench_remote.json. Torch runs on ``--threads``
(default 1) intra-op threads; set OMP_NUM_THREADS=1 too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_disk import drop_cache  # noqa: E402
from common import parse_args, print_table, write_results  # noqa: E402

from tiercache.contexts.store import ContextStore, prefill  # noqa: E402
from tiercache.corpus import text_tokens  # noqa: E402
from tiercache.contexts.kv import CHUNK_TOKENS, content_key, save_kv_context  # noqa: E402
from tiercache.models import DEFAULT_MODEL_ID, load_default_model  # noqa: E402

MIB = 1 << 20


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own on a free loopback port (no persistence)."""
    import socket

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server), or pass --redis URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def timed(fn, server=None) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds (this process's threads, plus the Redis server's when it is
    ours) and the result of ``fn()``."""
    server_cpu = (lambda: sum(server.cpu_times()[:2])) if server is not None else (lambda: 0.0)
    wall, cpu, srv = time.perf_counter(), time.process_time(), server_cpu()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu + server_cpu() - srv, out


def best(fn, repeats: int, before=None, server=None) -> tuple[float, float]:
    """Wall and CPU seconds of the fastest of ``repeats`` calls of ``fn`` (each returns a cache,
    closed here); ``before`` runs ahead of each, untimed."""
    runs = []
    for _ in range(repeats):
        if before is not None:
            before()
        wall, cpu, cache = timed(fn, server)
        cache.close()
        runs.append((wall, cpu))
    return min(runs)


def parser_speed(url: str, keys: list[str], repeats: int) -> list[dict]:
    """One pipelined read of ``keys`` with redis-py's reply parsers: hiredis (C, what tiercache
    uses) and the pure-Python RESP2 parser; best of ``repeats``."""
    import redis
    from redis.connection import _HiredisParser, _RESP2Parser

    rows = []
    for name, parser in (("hiredis", _HiredisParser), ("pure Python", _RESP2Parser)):
        client = redis.Redis.from_url(url, parser_class=parser)
        times, nbytes = [], 0
        for _ in range(repeats):
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            start = time.perf_counter()
            values = pipe.execute()
            times.append(time.perf_counter() - start)
            nbytes = sum(map(len, values))
        client.close()
        rows.append({"parser": name, "records": len(keys), "MiB": round(nbytes / MIB, 1),
                     "seconds": min(times), "MB_per_s": nbytes / 1e6 / min(times)})
    rows[1]["hiredis_speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="context length in tokens (default 8192)")
    parser.add_argument("--codecs", default="cachegen,zstd,raw",
                        help="codecs to store with (default cachegen,zstd,raw)")
    parser.add_argument("--repeats", type=int, default=3, help="loads per store (best of; default 3)")
    parser.add_argument("--redis", default=None,
                        help="a Redis server to use (default: start one on loopback)")
    args = parse_args(parser)
    work = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    server = None
    try:
        url = args.redis
        server_proc = None
        if url is None:
            server, url = start_redis(work)
            server_proc = psutil.Process(server.pid)
        model, tok = load_default_model()
        ids = text_tokens(tok, args.tokens)
        with torch.no_grad():
            model(torch.tensor([ids[:128]]), use_cache=True)  # warm-up
            plain_s, plain_cpu, _ = timed(lambda: model(torch.tensor([ids]), use_cache=True))
        rows, parsers = [], []
        kv = None
        for codec in args.codecs.split(","):
            redis_store = ContextStore(url, model, tok, codec=codec, max_tokens=args.tokens)
            disk_store = ContextStore(work / f"disk-{codec}", model, tok, codec=codec, max_tokens=args.tokens)
            config = redis_store._config(len(ids))
            if kv is None:
                tiered_s, tiered_cpu, cache = timed(lambda: prefill(model, config, ids))
                kv = cache.export_kv()
                cache.close()
            key = content_key(redis_store.fingerprint.digest, ids)
            start = time.perf_counter()
            stored = save_kv_context(redis_store.backend, key, kv, redis_store.codec, redis_store.fingerprint,
                                     CHUNK_TOKENS)
            save_s = time.perf_counter() - start
            save_kv_context(disk_store.backend, key, kv, disk_store.codec, disk_store.fingerprint,
                            CHUNK_TOKENS)
            backend = redis_store.backend
            trips, records = backend.round_trips, backend.records_read
            redis_s, redis_cpu = best(lambda: redis_store.load(key), args.repeats, server=server_proc)
            per_trip = (backend.records_read - records) / (backend.round_trips - trips)
            data_trip = (backend.records_read - records) / args.repeats
            warm_s, warm_cpu = best(lambda: disk_store.load(key), args.repeats)
            cold_s, _ = best(lambda: disk_store.load(key), args.repeats,
                             lambda: drop_cache(list((work / f"disk-{codec}").glob("seg-*"))))
            if not parsers:
                manifest = backend.manifest(key)
                parsers = parser_speed(url, [backend.key("part", key, d) for d, _ in manifest["parts"]],
                                       args.repeats)
            loaded = redis_store.load(key)
            err = (loaded.export_kv() - kv).abs().max().item()
            loaded.close()
            recompute, recompute_cpu = min((plain_s, plain_cpu), (tiered_s, tiered_cpu))
            rows.append({
                "codec": codec, "tokens": len(ids), "raw_MiB": round(kv.numel() * kv.element_size() / MIB, 1),
                "stored_MiB": round(stored / MIB, 1), "records": data_trip, "save_s": save_s,
                "redis_load_s": redis_s, "disk_warm_s": warm_s, "disk_cold_s": cold_s,
                "prefill_plain_s": plain_s, "prefill_tiered_s": tiered_s, "prefill_plain_cpu_s": plain_cpu,
                "prefill_tiered_cpu_s": tiered_cpu, "redis_load_cpu_s": redis_cpu,
                "disk_warm_cpu_s": warm_cpu, "recompute_over_redis": recompute / redis_s,
                "recompute_over_redis_cpu": recompute_cpu / redis_cpu,
                "redis_over_disk_warm": redis_s / warm_s,
                "redis_over_disk_cold": redis_s / cold_s, "records_per_round_trip": round(per_trip, 1),
                "max_abs_err": err,
            })
            redis_store.backend.delete_context(key)
            redis_store.close()
            disk_store.close()
        print(f"\nA stored {len(ids)}-token {DEFAULT_MODEL_ID} context: load into a TieredCache from Redis "
              f"(loopback) and from a disk store vs recomputing its prefill, best of {args.repeats}, one run "
              f"(recompute = the faster prefill: plain transformers {plain_s:.1f} s / {plain_cpu:.1f} CPU s, "
              f"tiercache's {rows[0]['prefill_tiered_s']:.1f} s / "
              f"{rows[0]['prefill_tiered_cpu_s']:.1f} CPU s)")
        print_table(rows, ["codec", "stored_MiB", "records", "redis_load_s", "disk_warm_s", "disk_cold_s",
                           "recompute_over_redis", "recompute_over_redis_cpu", "redis_over_disk_warm",
                           "redis_over_disk_cold", "records_per_round_trip", "max_abs_err"])
        print(f"\nOne pipelined read of the {rows[0]['codec']} context's {parsers[0]['records']} records, by "
              f"reply parser (best of {args.repeats})")
        print_table(parsers)
        write_results("bench_remote", rows, parsers=parsers,
                      redis=url if args.redis else "loopback, started by the benchmark",
                      model=DEFAULT_MODEL_ID, load_average=os.getloadavg())
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
