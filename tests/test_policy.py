import pytest

from tiercache import BlockKey, CapacityError, ConfigError
from tiercache.policy import LRUPolicy, ScorePolicy, make_policy

K = [BlockKey(0, 0, i) for i in range(6)]


def test_lru_order_touch_and_exclusion():
    p = LRUPolicy()
    for k in K[:4]:
        p.insert(k)
    p.touch(K[0])
    assert p.victims(2) == [K[1], K[2]]
    assert p.victims(2, exclude={K[1]}) == [K[2], K[3]]
    p.remove(K[2])
    with pytest.raises(CapacityError, match="need 4 evictable blocks, only 3"):
        p.victims(4)


def test_score_policy_prefers_unselected_and_decays():
    p = ScorePolicy(decay=0.5)
    for k in K[:3]:
        p.insert(k)
    p.record_selection([K[0]])
    assert p.victims(1) == [K[1]]  # never selected, oldest
    assert p.score(K[0]) == 1.0
    for _ in range(3):
        p.record_selection([K[1], K[2]])
    # K[0]'s old popularity has decayed below the blocks selected since.
    assert p.score(K[0]) == pytest.approx(0.125)
    assert p.victims(1) == [K[0]]
    p.remove(K[0])
    assert p.score(K[0]) == 0.0


def test_make_policy_rejects_unknown_names_and_bad_decay():
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ConfigError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
    with pytest.raises(ConfigError, match="decay"):
        ScorePolicy(decay=0.0)
