"""Shared fixtures. Model-backed fixtures load SmolLM2-135M-Instruct once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model, fp32 on the CPU."""
    from tiercache.models import load_default_model

    torch.manual_seed(0)
    return load_default_model()


@pytest.fixture(scope="session")
def fingerprint_for():
    """``fingerprint_for(kv, codec, chunk_tokens=256, weights="tensors:test")``: the storage
    fingerprint of a made-up model whose KV is ``kv`` ``(layers, 2, kv_heads, tokens, head_dim)``
    (for tests of the stores without a real model)."""
    from tiercache.blocks import BlockLayout
    from tiercache.fingerprint import ModelFingerprint, dtype_name, storage_fingerprint

    def make(kv, codec, chunk_tokens: int = 256, weights: str = "tensors:test"):
        layers, _, heads, _, head_dim = kv.shape
        model = ModelFingerprint("test-model", "config:test", weights, dtype_name(kv.dtype))
        return storage_fingerprint(model, layers, BlockLayout(heads, chunk_tokens, head_dim, kv.dtype), codec)

    return make


def redis_server_binary() -> str | None:
    """A ``redis-server``: on PATH, else beside this Python (``make test`` links one into
    .venv/bin); None if there is none."""
    import shutil
    import sys
    from pathlib import Path

    return shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))


class RedisServer:
    """A ``redis-server`` process of a test's own on a free loopback port (``redis_server_binary``),
    with ``options`` (e.g. ``["--maxmemory", "4mb"]``)."""

    def __init__(self, workdir, options: list[str] = ()) -> None:
        self.binary = redis_server_binary()
        if self.binary is None:
            pytest.fail("no redis-server: the Redis tests start their own. `make test` links one into "
                        ".venv/bin (.ci/link-redis-server), or apt-get install redis-server")
        self.workdir = workdir
        self.options = list(options)
        self.port = _free_port()
        self.proc = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        import subprocess
        import time

        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_file = self.workdir / "redis.log"
                    log = log_file.read_text()[-2000:] if log_file.exists() else ""
                    pytest.fail(f"redis-server did not start on port {self.port}: {log}")
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        """Shut the server down (SIGTERM: it saves its append-only file, if it keeps one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory):
    """The address (``redis://host:port``, no database) of a Redis server for tests that need no
    server of their own: $TIERCACHE_TEST_REDIS if set (a server you run), else one started here
    for the session."""
    import os

    if os.environ.get("TIERCACHE_TEST_REDIS"):
        yield os.environ["TIERCACHE_TEST_REDIS"].rstrip("/")
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield f"redis://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def redis_url(shared_redis):
    """An empty database of the shared server (``redis://host:port/db``)."""
    import redis

    url = f"{shared_redis}/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def redis_servers(tmp_path):
    """``start(*options)``: a Redis server of this test's own (for restarts and memory limits),
    stopped at the end."""
    servers = []

    def start(*options: str) -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis-{len(servers)}", list(options)).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
