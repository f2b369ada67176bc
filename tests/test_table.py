"""BlockTable: rows of physical block ids, token validity, sharing and freeing of pids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiercache.errors import ShapeError
from tiercache.decode.table import BlockTable


def make(rows: int = 2, block_tokens: int = 4) -> BlockTable:
    return BlockTable(rows, block_tokens, torch.device("cpu"), torch.float32)


def test_extend_gives_each_row_fresh_pids_and_marks_tokens_valid():
    t = make()
    first = t.extend(6)  # 2 blocks per row
    assert first.shape == (2, 2) and len(set(first.reshape(-1).tolist())) == 4
    assert torch.equal(t.pids[:, :2], torch.from_numpy(first))
    assert t.extend(7).shape == (2, 0)  # still 2 blocks
    valid = torch.tensor([[True, False, True], [True, True, True]])
    new = t.extend(10, valid)
    assert new.shape == (2, 1)
    assert t.valid(0, 10).tolist() == [[True] * 7 + [True, False, True], [True] * 10]
    assert t.bias.shape[1] % 4 == 0 and t.bias[:, 10:].isneginf().all()
    assert sorted(t.live_pids().tolist()) == sorted(np.concatenate([first, new], 1).reshape(-1).tolist())


def test_cut_releases_the_pids_past_the_cut_and_they_are_reused():
    t = make(rows=1)
    pids = t.extend(12)[0].tolist()  # 3 blocks
    gone = t.cut(5)                  # keeps blocks 0 and 1 (token 4 is in block 1)
    assert gone.tolist() == [pids[2]]
    assert t.tokens == 5 and t.blocks == 2 and t.valid(0, 8).tolist() == [[True] * 5 + [False] * 3]
    assert t.extend(12)[0].tolist() == [pids[2]]  # the freed pid comes back first
    with pytest.raises(ShapeError, match="cannot cut 12 tokens to 13"):
        t.cut(13)


def test_reorder_shares_blocks_and_frees_only_what_no_row_holds():
    t = make(rows=3)
    pids = t.extend(8)  # (3, 2)
    gone = t.reorder(np.array([0, 0, 2]))
    assert sorted(gone.tolist()) == sorted(pids[1].tolist())  # row 1 is gone
    assert torch.equal(t.pids[0, :2], t.pids[1, :2])
    assert t.refs(pids[0]).tolist() == [2, 2] and t.refs(pids[2]).tolist() == [1, 1]
    new = t.replace(1, 1)  # copy-on-write of row 1's last block
    assert t.refs(pids[0]).tolist() == [2, 1] and t.host_pids(1).tolist() == [pids[0, 1], new, pids[2, 1]]
    assert sorted(t.clear().tolist()) == sorted({*pids[0].tolist(), *pids[2].tolist(), new})
    assert t.live_pids().size == 0
    with pytest.raises(ShapeError, match="out of range"):
        t.reorder(np.array([5]))
