"""The remote tier (Redis) as the manager's backing tier, against a real redis-server: sealed
blocks written through, read back bit-exact on a miss, demotion writing nothing twice, blocks
removed when freed and at close, an evicted or damaged block a clear error, the disk tier kept
first when both exist, and a model answering the same with it as without."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch

from tiercache import BlockNotFoundError, ConfigError, CorruptBlockError, TierConfig
from tiercache.tiers.manager import TierManager

from test_manager import LAYERS, LAYOUT, block, pids


def make(redis_url: str, host_blocks: int, disk_path=None) -> TierManager:
    cfg = TierConfig(device_budget_bytes=2 * LAYERS * LAYOUT.nbytes,
                     host_budget_bytes=host_blocks * LAYOUT.nbytes, block_tokens=LAYOUT.block_tokens,
                     dtype=LAYOUT.dtype, device="cpu",
                     remote_url=redis_url, remote_budget_bytes=1 << 20,
                     disk_path=disk_path, disk_budget_bytes=(1 << 20) if disk_path else 0)
    m = TierManager(cfg, LAYOUT, LAYERS)
    m.reserve(64)
    return m


def block_keys(client, m) -> list[bytes]:
    return sorted(client.scan_iter(match=f"tiercache:blk:{m.remote.owner}:*"))


def test_sealed_blocks_are_written_through_and_read_back_on_a_miss(redis_url):
    client = redis.Redis.from_url(redis_url)
    m = make(redis_url, host_blocks=3)
    data = block(1, 6)
    m.seal(0, np.arange(6), data)  # the host keeps 3; 0, 1 and 2 are held remotely only
    assert len(block_keys(client, m)) == 6, "every sealed block written through"
    s = m.stats()
    assert s.moved_bytes["device->remote"] > 0
    assert "host->remote" not in s.moved_bytes, "demotion wrote nothing"
    assert m.block_counts() == {"device": 0, "host": 3, "disk": 0, "remote": 6}
    slots = m.resident(0, pids(5, 1))
    assert torch.equal(m.layer_slab(0)[slots], data[[5, 1]])
    s = m.stats()
    assert s.hits["remote"] == 1 and s.disk_waits == 1 and s.lookups == sum(s.hits.values())
    assert torch.equal(m.read(0, np.arange(6)), data)
    m.free(np.array([0, 5]))
    assert len(block_keys(client, m)) == 4
    assert m.used_bytes(m.remote.name) == sum(len(client.get(k)) for k in block_keys(client, m))
    m.close()
    assert block_keys(client, m) == [], "close removes the tier's blocks"
    m.close()  # idempotent


def test_the_disk_tier_comes_first_and_the_remote_one_holds_copies(redis_url, tmp_path):
    m = make(redis_url, host_blocks=2, disk_path=tmp_path)
    data = block(2, 5)
    m.seal(1, np.arange(5), data)
    assert m.block_counts() == {"device": 0, "host": 2, "disk": 3, "remote": 5}
    m.resident(1, pids(0))
    assert m.stats().hits["disk"] == 1 and m.stats().hits["remote"] == 0
    assert torch.equal(m.read(1, np.arange(5)), data)
    m.close()


def test_an_evicted_or_damaged_block_is_a_clear_error(redis_url):
    client = redis.Redis.from_url(redis_url)
    m = make(redis_url, host_blocks=2)
    m.seal(0, np.arange(4), block(3, 4))
    owner = m.remote.owner
    client.delete(f"tiercache:blk:{owner}:0:0:0")
    with pytest.raises(BlockNotFoundError, match=r"block\(seq=0, layer=0, index=0\) is gone from the server"):
        m.resident(0, pids(0))
    value = bytearray(client.get(f"tiercache:blk:{owner}:0:0:1"))
    value[-9] ^= 1
    client.set(f"tiercache:blk:{owner}:0:0:1", bytes(value))
    with pytest.raises(CorruptBlockError, match="checksum"):
        m.read(0, np.array([1]))
    # A record of another block under this key: refused, not served as this one.
    client.set(f"tiercache:blk:{owner}:0:0:1", client.get(f"tiercache:blk:{owner}:0:0:2"))
    with pytest.raises(CorruptBlockError, match="expected block"):
        m.read(0, np.array([1]))
    m.close()


def test_remote_settings_are_checked():
    with pytest.raises(ConfigError, match="needs both remote_url and remote_budget_bytes"):
        TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0, remote_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="not a Redis address"):
        TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0, remote_url="http://x",
                   remote_budget_bytes=1)
    with pytest.raises(ConfigError, match="remote_codec 'nope' is unknown"):
        TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0, remote_url="redis://127.0.0.1:1/0",
                   remote_budget_bytes=1, remote_codec="nope")


@pytest.mark.model
def test_a_model_answers_the_same_with_a_remote_tier(smollm2, redis_url, tmp_path):
    from tiercache.hf.cache import TieredCache
    from tiercache.corpus import text_tokens
    from tiercache.generation import greedy_answer

    model, tok = smollm2
    ids = text_tokens(tok, 400, offset_tokens=3000)
    kv_bytes = 2 * 30 * 3 * 64 * 4 * 32  # one 32-token block of every layer, fp32
    answers = []
    for below in ({"disk_path": tmp_path, "disk_budget_bytes": 64 << 20},
                  {"remote_url": redis_url, "remote_budget_bytes": 64 << 20}):
        config = TierConfig(device_budget_bytes=6 * kv_bytes, host_budget_bytes=4 * kv_bytes, block_tokens=32,
                            dtype=torch.float32, device="cpu", **below)
        remote = "remote_url" in below
        cache = TieredCache(model, config)
        with torch.no_grad():
            model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        question = tok("\nIn short, this text is about", add_special_tokens=False)["input_ids"]
        answers.append(greedy_answer(model, tok, cache, question, 6, stop=None))
        stats = cache.manager.stats()
        assert stats.disk_waits > 0, "blocks came back from below host memory"
        if remote:
            assert stats.hits["remote"] > 0 and stats.moved_bytes["device->remote"] > 0
        cache.close()
    assert answers[0] == answers[1]
