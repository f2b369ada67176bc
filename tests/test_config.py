import os

import pytest
import torch

from tiercache import BlockKey, BlockLayout, ConfigError, RetrievalConfig, ShapeError, TierConfig

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)


def test_defaults_pick_cpu_without_cuda():
    cfg = TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=1 << 20)
    assert cfg.device == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def test_a_device_this_machine_lacks_is_a_config_error(monkeypatch):
    """Not torch's AssertionError at the first allocation: the setting, the reason, the way out."""
    base = {"device_budget_bytes": 1 << 20, "host_budget_bytes": 1 << 20}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available: .*use device='cpu'"):
        TierConfig(**base, device="cuda")
    with pytest.raises(ConfigError, match="'cuda:1' is not available"):
        TierConfig(**base, device=torch.device("cuda", 1))
    with pytest.raises(ConfigError, match="'gpu0' is not a torch device"):
        TierConfig(**base, device="gpu0")
    assert TierConfig(**base, device="cpu").device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="'cuda:2' does not exist: this machine has 2 cuda"):
        TierConfig(**base, device="cuda:2")
    assert TierConfig(**base, device="cuda:1").device == torch.device("cuda", 1)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"block_tokens": 0}, "block_tokens must be positive"),
        ({"block_tokens": -3}, "block_tokens must be positive"),
        ({"device_budget_bytes": 0}, "device_budget_bytes must be positive"),
        ({"host_budget_bytes": -1}, "host_budget_bytes"),
        ({"host_codec": "lzma9"}, "host_codec 'lzma9' is unknown"),
        ({"disk_codec": "nope"}, "disk_codec 'nope' is unknown"),
        ({"dtype": "int8"}, "dtype 'int8' not supported"),
        ({"disk_budget_bytes": 100}, "needs a disk_path"),
        ({"block_tokens": 2.5}, "block_tokens must be an int"),
    ],
)
def test_bad_values_name_the_setting(kwargs, words):
    base = {"device_budget_bytes": 1 << 20, "host_budget_bytes": 1 << 20}
    with pytest.raises(ConfigError, match=words):
        TierConfig(**{**base, **kwargs})


def test_budget_below_one_block_is_rejected_with_the_block_size():
    cfg = TierConfig(device_budget_bytes=LAYOUT.nbytes - 1, host_budget_bytes=0, block_tokens=4)
    with pytest.raises(ConfigError, match=f"smaller than one block: {LAYOUT.nbytes} bytes"):
        cfg.check_budgets(LAYOUT)


def test_unwritable_disk_path(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    # Root may write anywhere: make the permission check see what an ordinary user sees.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(ConfigError, match="not writable"):
        TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0, disk_budget_bytes=1 << 20,
                   disk_path=ro / "store")


def test_disk_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        TierConfig(device_budget_bytes=1 << 20, host_budget_bytes=0, disk_budget_bytes=1 << 20, disk_path=f)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"budget": 0.0}, "fraction"), ({"budget": 1.5}, "fraction"), ({"budget": 0}, "tokens must be >= 1"),
     ({"gqa_aggregate": "mean"}, "gqa_aggregate"), ({"sink_tokens": -1}, "sink_tokens")],
)
def test_retrieval_config_validation(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        RetrievalConfig(**kwargs)


def test_block_key_and_layout_validation():
    with pytest.raises(ShapeError, match="BlockKey.layer"):
        BlockKey(0, -1, 0)
    with pytest.raises(ShapeError, match="head_dim"):
        BlockLayout(2, 4, 0)
    assert LAYOUT.nbytes == 2 * 2 * 4 * 8 * 2
    with pytest.raises(ShapeError, match=r"shape \(2, 4, 7\)"):
        LAYOUT.check(torch.zeros(2, 4, 7, dtype=torch.float16), torch.zeros(2, 4, 7, dtype=torch.float16))
    with pytest.raises(ShapeError, match="dtype torch.float32"):
        LAYOUT.check(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ShapeError, match="5 tokens"):
        LAYOUT.check(torch.zeros(2, 5, 8, dtype=torch.float16), torch.zeros(2, 5, 8, dtype=torch.float16))


def test_every_name_the_package_exports_resolves():
    import tiercache

    for name in tiercache.__all__:  # the lazy ones import their module on first use
        assert getattr(tiercache, name) is not None, name
