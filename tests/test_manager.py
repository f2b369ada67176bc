"""TierManager and Residency: placement by physical block id, write-through, eviction, pinning,
disk demotion and waits, statistics, lazily taken host memory, and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tiercache import BlockLayout, CapacityError, ConfigError, TierConfig, TierName
from tiercache.tiers.manager import TierManager
from tiercache.opcount import OpCounter
from tiercache.tiers.host import HostSlab
from tiercache.tiers.residency import PINNED

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
LAYERS = 2


def make(device_slots: int, host_blocks: int, disk_path=None, disk_blocks: int = 0) -> TierManager:
    cfg = TierConfig(device_budget_bytes=device_slots * LAYERS * LAYOUT.nbytes,
                     host_budget_bytes=host_blocks * LAYOUT.nbytes, block_tokens=LAYOUT.block_tokens,
                     dtype=LAYOUT.dtype, device="cpu", disk_path=disk_path,
                     disk_budget_bytes=disk_blocks * 8192)  # records take whole 4 KiB pages
    m = TierManager(cfg, LAYOUT, LAYERS)
    m.reserve(64)
    return m


def block(seed: int, n: int = 1) -> torch.Tensor:
    """``n`` random blocks in the device slab's layout ``(n, block_tokens, 2, kv_heads, head_dim)``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, LAYOUT.block_tokens, 2, LAYOUT.kv_heads, LAYOUT.head_dim)
    return torch.randn(shape, generator=g).to(LAYOUT.dtype)


def pids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_sealed_blocks_come_back_bit_exact_and_lru_decides_what_stays():
    m = make(device_slots=3, host_blocks=8)
    data = block(1, 6)
    m.seal(0, np.arange(6), data)
    slots = m.resident(0, pids(0, 1, 2))
    assert torch.equal(m.layer_slab(0)[slots], data[:3])
    m.resident(0, pids(2))
    m.resident(0, pids(0))  # 1 is now the least recently used
    slots = m.resident(0, pids(3))
    assert torch.equal(m.layer_slab(0)[slots], data[3:4])
    on_device = set(m.residency.slot_pid[0, : m.slots].tolist())
    assert on_device == {0, 2, 3}
    s = m.stats()
    assert s.lookups == 6 == sum(s.hits.values())
    assert s.hits == {"device": 2, "host": 4, "disk": 0, "remote": 0}
    assert s.moved_bytes["host->device"] == 4 * LAYOUT.nbytes
    assert s.moved_bytes["device->host"] == 6 * LAYOUT.nbytes
    assert s.peak_bytes["device"] == 3 * LAYOUT.nbytes


def test_pinned_blocks_never_leave_and_open_blocks_are_written_in_place():
    m = make(device_slots=3, host_blocks=8)
    open_slots = m.open(1, pids(7))
    m.layer_slab(1)[open_slots] = block(9)
    assert m.residency.pinned[1] == 1 and m.residency.free_slots(1) == 2
    m.seal(1, np.arange(4), block(2, 4))
    for round_ in range(3):  # every sealed block passes through the two free slots
        for pid in range(4):
            m.resident(1, pids(pid))
    assert int(m.residency.device_slot[1, 7]) == int(open_slots)
    assert int(m.residency.clock[1, open_slots]) == PINNED
    assert torch.equal(m.layer_slab(1)[open_slots], block(9))
    with pytest.raises(CapacityError, match="3 more blocks to pin .* 2 slots free of 3 .1 pinned."):
        m.open(1, pids(8, 9, 10))
    m.unpin(1, open_slots)
    assert m.residency.pinned[1] == 0


def test_a_step_reading_every_slot_copies_misses_without_evicting_its_own_blocks():
    m = make(device_slots=4, host_blocks=8)
    data = block(3, 6)
    m.seal(0, np.arange(6), data)
    m.resident(0, pids(0, 1))
    slots = m.resident(0, pids(1, 2, 3, 0))  # two hits, two misses: all four slots busy
    assert len(set(slots.tolist())) == 4
    assert torch.equal(m.layer_slab(0)[slots], data[[1, 2, 3, 0]])


def test_resident_needs_no_host_sync_and_few_ops():
    m = make(device_slots=8, host_blocks=16)
    m.seal(0, np.arange(12), block(4, 12))
    m.resident(0, pids(0, 1, 2))
    with OpCounter() as counter:
        m.resident(0, pids(2, 5, 9))
    assert counter.syncs == 0, counter.sync_ops
    assert counter.ops <= 32, counter.by_op


def test_host_full_moves_the_oldest_blocks_to_disk_and_a_step_waits_for_them(tmp_path):
    m = make(device_slots=2, host_blocks=3, disk_path=tmp_path, disk_blocks=16)
    data = block(5, 5)
    m.seal(0, np.arange(3), data[:3])
    m.seal(0, np.arange(3, 5), data[3:])  # the host holds 3: blocks 0 and 1 go to disk
    s = m.stats()
    assert s.demotions == 2 and s.moved_bytes["host->disk"] > 0
    assert m.block_counts() == {"device": 0, "host": 3, "disk": 2, "remote": 0}
    with OpCounter() as counter:
        slots = m.resident(0, pids(4, 0))
    assert counter.syncs > 0  # a block held only on disk: the step checks and waits
    assert torch.equal(m.layer_slab(0)[slots], data[[4, 0]])
    s = m.stats()
    assert s.disk_waits == 1 and s.hits["disk"] == 1 and s.wait_seconds > 0
    # Loading block 0 took a host row from the oldest block, 2, which went to disk. Sealing 5-7
    # moves 3, 4 and 0 there; 0 kept its disk copy, so only 3 and 4 are written.
    per_block = s.moved_bytes["host->disk"] // 3
    data = torch.cat([data, block(6, 3)])
    m.seal(0, np.arange(5, 8), data[5:])
    assert m.stats().moved_bytes["host->disk"] == 5 * per_block
    assert m.stats().demotions == 6
    for pid, expected in enumerate(data):
        assert torch.equal(m.read(0, np.array([pid]))[0], expected)
    m.close()


def test_without_a_disk_a_full_host_is_a_clear_error():
    m = make(device_slots=2, host_blocks=2)
    m.seal(0, np.arange(2), block(7, 2))
    with pytest.raises(CapacityError, match="host tier is full .* no disk tier"):
        m.seal(0, np.arange(2, 3), block(8))
    assert torch.equal(m.read(0, np.arange(2)), block(7, 2))  # nothing stored was lost


def test_free_releases_every_tier_and_pinned_slots(tmp_path):
    m = make(device_slots=3, host_blocks=2, disk_path=tmp_path, disk_blocks=8)
    m.seal(0, np.arange(4), block(9, 4))
    m.open(1, pids(4))
    m.free(np.arange(5))
    assert m.block_counts() == {"device": 0, "host": 0, "disk": 0, "remote": 0}
    assert m.residency.pinned[1] == 0 and m.used_bytes(TierName.HOST) == 0
    m.close()


class ManagerMachine(RuleBasedStateMachine):
    """Random seal / resident / open / free sequences over two layers, small device and host and
    a disk, checked against a dict of what each (layer, pid) holds."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.m = make(device_slots=3, host_blocks=4, disk_path=self.dir.name, disk_blocks=64)
        self.truth: dict[tuple[int, int], torch.Tensor] = {}
        self.opened: dict[tuple[int, int], int] = {}  # pinned open blocks -> slot
        self.seed = 0

    layers = st.integers(0, LAYERS - 1)

    @rule(layer=layers, pid=st.integers(0, 7))
    def seal(self, layer, pid):
        if (layer, pid) in self.opened:
            return
        self.seed += 1
        kv = block(self.seed)
        self.m.seal(layer, np.array([pid]), kv)
        self.truth[(layer, pid)] = kv[0]

    @precondition(lambda self: self.truth)
    @rule(data=st.data(), layer=layers)
    def read_a_step(self, data, layer):
        mine = sorted(p for (l, p) in self.truth if l == layer and (l, p) not in self.opened)
        if not mine:
            return
        chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=self.m.residency.free_slots(layer),
                                    unique=True))
        slots = self.m.resident(layer, torch.tensor(chosen))
        for slot, pid in zip(slots.tolist(), chosen):
            assert torch.equal(self.m.layer_slab(layer)[slot], self.truth[(layer, pid)])

    @rule(layer=layers, pid=st.integers(8, 11))
    def open_block(self, layer, pid):
        if (layer, pid) in self.opened or self.m.residency.free_slots(layer) <= 1:
            return
        slot = self.m.open(layer, pids(pid))
        self.seed += 1
        kv = block(self.seed)
        self.m.layer_slab(layer)[slot] = kv
        self.opened[(layer, pid)] = int(slot)
        self.truth[(layer, pid)] = kv[0]

    @precondition(lambda self: self.truth)
    @rule(data=st.data())
    def free(self, data):
        pid = data.draw(st.sampled_from(sorted({p for _, p in self.truth})))
        self.m.free(np.array([pid]))
        for key in [k for k in self.truth if k[1] == pid]:
            del self.truth[key]
            self.opened.pop(key, None)

    @invariant()
    def budgets_hold_and_pins_stay(self):
        m = self.m
        assert m.used_bytes(TierName.DEVICE) <= m.capacity_bytes(TierName.DEVICE)
        assert m.used_bytes(TierName.HOST) <= m.capacity_bytes(TierName.HOST)
        for (layer, pid), slot in self.opened.items():
            assert int(m.residency.device_slot[layer, pid]) == slot
        for layer in range(LAYERS):
            assert m.residency.pinned[layer] == sum(1 for (l, _) in self.opened if l == layer)

    def teardown(self):
        for (layer, pid), kv in self.truth.items():
            assert torch.equal(self.m.read(layer, np.array([pid]))[0], kv)
        self.m.close()
        self.dir.cleanup()


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


def test_host_memory_is_taken_as_it_is_used():
    import psutil

    budget = min(8 << 30, psutil.virtual_memory().available // 2)
    start = time.perf_counter()
    slab = HostSlab((1 << 20,), torch.uint8, rows=budget >> 20)
    built = time.perf_counter() - start
    assert slab.committed_bytes == 0
    rows = slab.alloc(3)
    assert rows.tolist() == [0, 1, 2] and slab.committed_bytes == 3 << 20
    slab.free(rows[1:2])
    assert slab.alloc(1).tolist() == [1]  # freed rows are reused before new memory
    assert slab.committed_bytes == 3 << 20
    # Building does not touch the budget: far under a second even for gigabytes.
    assert built < 1.0, built


def test_a_host_budget_over_the_available_memory_is_refused():
    import psutil

    too_much = psutil.virtual_memory().total * 2
    with pytest.raises(ConfigError, match=r"host_budget_bytes=\d+ .* available memory, \d+ bytes"):
        TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=too_much)


def test_layout_and_config_must_agree():
    cfg = TierConfig(device_budget_bytes=64 * LAYOUT.nbytes, host_budget_bytes=LAYOUT.nbytes, block_tokens=8,
                     dtype=LAYOUT.dtype, device="cpu")
    with pytest.raises(ConfigError, match="layout has blocks of 4 tokens, the config 8"):
        TierManager(cfg, LAYOUT, LAYERS)
    small = TierConfig(device_budget_bytes=LAYOUT.nbytes, host_budget_bytes=LAYOUT.nbytes,
                       block_tokens=LAYOUT.block_tokens, dtype=LAYOUT.dtype, device="cpu")
    with pytest.raises(ConfigError, match="less than one block per layer"):
        TierManager(small, LAYOUT, LAYERS)


def test_close_closes_the_disk_tier_and_releases_the_store(tmp_path):
    m = make(device_slots=2, host_blocks=1, disk_path=tmp_path, disk_blocks=8)
    m.seal(0, np.arange(3), block(11, 3))
    assert m.block_counts()["disk"] == 2
    m.close()
    assert m.disk.store._closed
    m.close()  # idempotent
    again = make(device_slots=2, host_blocks=1, disk_path=tmp_path, disk_blocks=8)  # the writer lock is free
    again.close()
