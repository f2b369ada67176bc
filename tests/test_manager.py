"""TierManager: placement, movement, budgets, pinning, statistics, prefetch and bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tiercache import (
    BlockKey,
    BlockLayout,
    BlockNotFoundError,
    CapacityError,
    PinnedBlockError,
    ShapeError,
    TierConfig,
    TierName,
)
from tiercache.manager import TierManager

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)


def make(device_blocks: int, host_blocks: int, policy: str = "lru") -> TierManager:
    cfg = TierConfig(device_budget_bytes=device_blocks * LAYOUT.nbytes, host_budget_bytes=host_blocks * LAYOUT.nbytes,
                     block_tokens=LAYOUT.block_tokens, dtype=LAYOUT.dtype, policy=policy, device="cpu")
    return TierManager(cfg, LAYOUT)


def block(seed: int, tokens: int = LAYOUT.block_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn((2, LAYOUT.kv_heads, tokens, LAYOUT.head_dim), generator=g).to(LAYOUT.dtype)
    return kv[0], kv[1]


def tiers(m: TierManager) -> dict[BlockKey, str]:
    return {k: m.meta(k).tier.value for k in m.keys()}


def test_put_get_roundtrip_through_host():
    m = make(2, 4)
    data = {BlockKey(0, 0, i): block(i) for i in range(5)}
    for key, (k, v) in data.items():
        m.put(key, k, v)
    assert sorted(tiers(m).values()) == ["device"] * 2 + ["host"] * 3
    keys = list(data)[::-1][:2] + [BlockKey(0, 0, 0)]
    with pytest.raises(CapacityError, match="device tier is full: 1 more blocks needed, only 0"):
        m.get(keys)  # three blocks do not fit on a device of two slots
    K, V = m.get(keys[1:])
    for i, key in enumerate(keys[1:]):
        assert torch.equal(K[i], data[key][0]) and torch.equal(V[i], data[key][1])


def test_partial_block_tokens_survive_demotion():
    m = make(1, 2)
    k, v = block(7, tokens=3)
    m.put(BlockKey(1, 2, 0), k, v)
    m.put(BlockKey(1, 2, 1), *block(8))
    assert m.meta(BlockKey(1, 2, 0)).tier is TierName.HOST
    K, V = m.get([BlockKey(1, 2, 0)])
    assert m.tokens([BlockKey(1, 2, 0)]) == [3]
    assert torch.equal(K[0, :, :3], k) and torch.equal(V[0, :, :3], v)


def test_pinned_blocks_never_leave_the_device():
    m = make(2, 8)
    m.put(BlockKey(0, 0, 0), *block(0), pinned=True)
    for i in range(1, 6):
        m.put(BlockKey(0, 0, i), *block(i))
    assert m.meta(BlockKey(0, 0, 0)).tier is TierName.DEVICE
    with pytest.raises(PinnedBlockError, match="pinned"):
        m.demote([BlockKey(0, 0, 0)])
    m.put(BlockKey(0, 0, 1), *block(1), pinned=True)
    with pytest.raises(CapacityError, match="pinned or in use"):
        m.put(BlockKey(0, 0, 9), *block(9))
    m.unpin([BlockKey(0, 0, 1)])
    m.put(BlockKey(0, 0, 9), *block(9))
    assert m.meta(BlockKey(0, 0, 1)).tier is TierName.HOST


def test_full_tiers_raise_and_keep_every_block():
    m = make(2, 2)
    data = {BlockKey(0, 0, i): block(i) for i in range(4)}
    for key, (k, v) in data.items():
        m.put(key, k, v)
    with pytest.raises(CapacityError, match="no tier below"):
        m.put(BlockKey(0, 0, 4), *block(4))
    assert BlockKey(0, 0, 4) not in m
    for key, (k, v) in data.items():  # swapping host and device blocks still works when both are full
        K, V = m.get([key])
        assert torch.equal(K[0], k) and torch.equal(V[0], v)


def test_drop_frees_every_tier():
    m = make(2, 4)
    for i in range(5):
        m.put(BlockKey(3, 0, i), *block(i))
    m.put(BlockKey(4, 0, 0), *block(99))
    assert m.drop(3) == 5
    assert m.keys() == [BlockKey(4, 0, 0)]
    assert m.used_bytes(TierName.HOST) == 0
    assert m.used_bytes(TierName.DEVICE) == LAYOUT.nbytes
    with pytest.raises(BlockNotFoundError, match=r"block\(seq=3, layer=0, index=1\) is not stored"):
        m.get([BlockKey(3, 0, 1)])


def test_overwrite_replaces_content_in_any_tier():
    m = make(1, 3)
    m.put(BlockKey(0, 0, 0), *block(1))
    m.put(BlockKey(0, 0, 1), *block(2))  # pushes block 0 to the host
    m.put(BlockKey(0, 0, 0), *block(3))
    K, V = m.get([BlockKey(0, 0, 0)])
    assert torch.equal(K[0], block(3)[0])
    assert len(m) == 2 and m.used_bytes(TierName.HOST) == LAYOUT.nbytes


def test_bad_input_names_the_block_and_stores_nothing():
    m = make(2, 2)
    m.put(BlockKey(0, 0, 0), *block(0))
    with pytest.raises(ShapeError, match=r"put block\(seq=0, layer=0, index=1\): keys have shape"):
        m.put(BlockKey(0, 0, 1), torch.zeros(3, 4, 8, dtype=torch.float16), torch.zeros(3, 4, 8, dtype=torch.float16))
    with pytest.raises(ShapeError, match="dtype torch.float32"):
        m.put(BlockKey(0, 0, 0), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    assert m.keys() == [BlockKey(0, 0, 0)]
    assert torch.equal(m.get([BlockKey(0, 0, 0)])[0][0], block(0)[0])


def test_score_policy_keeps_selected_blocks_hot():
    m = make(3, 8, policy="score")
    hot = BlockKey(0, 0, 0)
    m.put(hot, *block(0))
    for step in range(1, 8):
        m.put(BlockKey(0, 0, step), *block(step))
        m.record_selection([hot])
        assert m.meta(hot).tier is TierName.DEVICE, f"hot block evicted at step {step}"
    lru = make(3, 8, policy="lru")
    lru.put(hot, *block(0))
    for step in range(1, 8):
        lru.put(BlockKey(0, 0, step), *block(step))
    assert lru.meta(hot).tier is TierName.HOST


def test_explicit_demote_and_evict():
    m = make(3, 3)
    for i in range(3):
        m.put(BlockKey(0, 0, i), *block(i))
    m.demote([BlockKey(0, 0, 2)])
    assert m.meta(BlockKey(0, 0, 2)).tier is TierName.HOST
    assert m.evict(1) == [BlockKey(0, 0, 0)]  # least recently used
    with pytest.raises(CapacityError, match="lowest tier"):
        m.demote([BlockKey(0, 0, 2)])


def test_statistics_add_up():
    m = make(2, 6)
    for i in range(6):
        m.put(BlockKey(0, 0, i), *block(i))
    m.get([BlockKey(0, 0, 5), BlockKey(0, 0, 0)])
    m.get([BlockKey(0, 0, 1)])
    s = m.stats()
    assert s.lookups == 3 == sum(s.hits.values())
    assert s.hits == {"device": 1, "host": 2, "disk": 0} and s.device_misses == 2
    assert s.promotions == 2 and s.moved_bytes["host->device"] == 2 * LAYOUT.nbytes
    assert s.moved_bytes["device->host"] == s.demotions * LAYOUT.nbytes
    assert s.peak_bytes["device"] == 2 * LAYOUT.nbytes


class TierMachine(RuleBasedStateMachine):
    """Random put/get/prefetch/demote/evict/drop/pin sequences on small budgets, checked against a
    plain dict of what was written."""

    def __init__(self) -> None:
        super().__init__()
        self.m = make(3, 4, policy="score")
        self.model: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pinned: set[BlockKey] = set()
        self.seed = 0

    keys = st.builds(BlockKey, st.integers(0, 2), st.integers(0, 1), st.integers(0, 3))

    @rule(key=keys, tokens=st.integers(1, LAYOUT.block_tokens), pin=st.booleans())
    def put(self, key, tokens, pin):
        self.seed += 1
        k, v = block(self.seed, tokens)
        try:
            self.m.put(key, k, v, pinned=pin)
        except CapacityError:
            return
        self.model[key] = (k, v)
        self.pinned.discard(key)
        if pin:
            self.pinned.add(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data):
        keys = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=3))
        try:
            K, V = self.m.get(keys)
        except CapacityError:
            return
        for i, key in enumerate(keys):
            k, v = self.model[key]
            t = k.shape[1]
            assert torch.equal(K[i, :, :t], k) and torch.equal(V[i, :, :t], v)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def prefetch(self, data):
        keys = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=3))
        self.m.prefetch(keys).result()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def demote(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        try:
            self.m.demote([key])
        except PinnedBlockError:
            assert key in self.pinned
        except CapacityError:
            # Only a block in the lowest tier, or one the full host cannot take, stays put.
            assert self.m.meta(key).tier is TierName.HOST or self.m.lower[0].free_blocks() == 0

    @rule()
    def evict(self):
        try:
            self.m.evict(1)
        except CapacityError:
            pass

    @rule(seq=st.integers(0, 2))
    def drop(self, seq):
        expected = {k for k in self.model if k.seq == seq}
        assert self.m.drop(seq) == len(expected)
        for k in expected:
            del self.model[k]
            self.pinned.discard(k)

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data):
        key = data.draw(st.sampled_from(sorted(self.pinned)))
        self.m.unpin([key])
        self.pinned.discard(key)

    @invariant()
    def budgets_hold_and_nothing_is_lost(self):
        m = self.m
        assert m.used_bytes(TierName.DEVICE) <= m.config.device_budget_bytes
        assert m.used_bytes(TierName.HOST) <= m.config.host_budget_bytes
        assert set(m.keys()) == set(self.model)
        for key in self.pinned:
            assert m.meta(key).tier is TierName.DEVICE
        s = m.stats()
        assert s.lookups == sum(s.hits.values())
        assert s.peak_bytes["device"] <= m.config.device_budget_bytes

    def teardown(self):
        # Every block, wherever it ended up, reads back bit-exact.
        self.m.unpin(self.pinned)
        for key, (k, v) in self.model.items():
            K, V = self.m.get([key])
            t = k.shape[1]
            assert torch.equal(K[0, :, :t], k) and torch.equal(V[0, :, :t], v)
        self.m.close()


TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_prefetch_runs_concurrently_with_reads_and_writes():
    m = make(8, 64)
    n = 48
    truth = {}
    for i in range(n):
        key = BlockKey(0, 0, i)
        truth[key] = block(i)
        m.put(key, *truth[key])
    lock = threading.Lock()  # guards `truth` between the writer and the checker
    errors: list[str] = []
    stop = threading.Event()

    def prefetcher():
        g = torch.Generator().manual_seed(1)
        while not stop.is_set():
            idx = torch.randint(0, n, (4,), generator=g).tolist()
            m.prefetch([BlockKey(0, 0, i) for i in idx]).result()

    t = threading.Thread(target=prefetcher)
    t.start()
    try:
        g = torch.Generator().manual_seed(2)
        for step in range(400):
            i = int(torch.randint(0, n, (1,), generator=g))
            key = BlockKey(0, 0, i)
            if step % 3 == 0:
                with lock:
                    truth[key] = block(1000 + step)
                    m.put(key, *truth[key])
            else:
                with lock:
                    K, V = m.get([key])
                    k, v = truth[key]
                if not (torch.equal(K[0], k) and torch.equal(V[0], v)):
                    errors.append(f"step {step}: {key} torn or stale")
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:5]
    s = m.stats()
    assert s.prefetched > 0 and s.prefetch_requested >= s.prefetched
    for key, (k, v) in truth.items():
        K, V = m.get([key])
        assert torch.equal(K[0], k) and torch.equal(V[0], v)
    m.close()


def test_append_fills_an_open_block_in_place():
    m = make(2, 2)
    key = BlockKey(0, 0, 0)
    k, v = block(5)
    m.put(key, k[:, :1], v[:, :1], pinned=True)
    assert m.append(key, k[:, 1:3], v[:, 1:3]) == 3
    assert m.append(key, k[:, 3:], v[:, 3:]) == 4
    K, V = m.get([key])
    assert torch.equal(K[0], k) and torch.equal(V[0], v)
    with pytest.raises(ShapeError, match="exceed"):
        m.append(key, k[:, :1], v[:, :1])
    m.unpin([key])
    m.demote([key])
    with pytest.raises(PinnedBlockError, match="host tier"):
        m.append(key, k[:, :1], v[:, :1])


def test_close_closes_the_tiers_it_built_and_releases_the_disk_store(tmp_path):
    """close() closes the disk tier it built (its writer lock is released, so a second manager
    can open the same directory), is idempotent, and leaves tiers passed in to their owner."""
    cfg = TierConfig(device_budget_bytes=LAYOUT.nbytes, host_budget_bytes=LAYOUT.nbytes,
                     disk_budget_bytes=64 * LAYOUT.nbytes, disk_path=tmp_path, block_tokens=LAYOUT.block_tokens,
                     dtype=LAYOUT.dtype, device="cpu")
    m = TierManager(cfg, LAYOUT)
    for i in range(3):
        m.put(BlockKey(0, 0, i), *block(i))
    assert tiers(m)[BlockKey(0, 0, 0)] == "disk"
    disk = m.lower[-1]
    m.close()
    assert disk.store._closed
    m.close()  # idempotent
    with TierManager(cfg, LAYOUT) as again:  # the writer lock was released
        again.put(BlockKey(0, 0, 0), *block(0))
    # A tier the caller passed in stays open: the caller owns it.
    host = make(1, 1).lower[0]
    closed = []
    host.close = lambda: closed.append(True)
    TierManager(cfg.__class__(device_budget_bytes=LAYOUT.nbytes, host_budget_bytes=LAYOUT.nbytes,
                              block_tokens=LAYOUT.block_tokens, dtype=LAYOUT.dtype, device="cpu"),
                LAYOUT, lower_tiers=[host]).close()
    assert closed == []
