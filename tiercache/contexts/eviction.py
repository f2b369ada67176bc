"""Saved-context eviction: which contexts a ``DiskStore`` used as a context cache gives up when a
write does not fit.

The store refuses a write beyond its budget (``CapacityError``, nothing stored) and evicts
nothing itself. ``LruEviction`` runs a write and, while the store refuses it, deletes the least
recently used saved context (never one the write protects, never a block) and tries again; when
no context is left to evict, the store's ``CapacityError`` stands (the evictions made for the
attempt stay made). Saves and loads make a context the most recently used; contexts the order
has not seen (saved by an earlier process, or found by the store's scan) count as newer than
every context it knows, in the order the store saved them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TypeVar

from ..errors import CapacityError
from ..io.store import DiskStore

T = TypeVar("T")


class LruEviction:
    """The least-recently-used order of the saved contexts of ``store``, starting from ``recent``
    (names, least recently used first, e.g. as an earlier process left them)."""

    def __init__(self, store: DiskStore, recent: Iterable[str] = ()) -> None:
        self._store = store
        self._order: OrderedDict[str, None] = OrderedDict.fromkeys(recent)
        self._lock = threading.RLock()
        #: Saved contexts evicted to make room, since this object was made.
        self.evictions = 0

    def names(self) -> list[str]:
        """The contexts the store holds, least recently used first."""
        with self._lock:
            held = self._store.contexts()
            for name in set(self._order).difference(held):  # deleted or evicted meanwhile
                del self._order[name]
            for name in held:
                self._order.setdefault(name, None)
            return list(self._order)

    def used(self, name: str) -> None:
        """Make context ``name`` the most recently used."""
        with self._lock:
            self._order[name] = None
            self._order.move_to_end(name)

    def fit(self, write: Callable[[], T], protect: frozenset[str] = frozenset()) -> T:
        """``write()``'s result, evicting least recently used contexts not in ``protect`` while
        the store refuses it for want of room; the store's ``CapacityError`` once none is left."""
        with self._lock:
            victims = None
            while True:
                try:
                    return write()
                except CapacityError:
                    if victims is None:  # in the order as it stands before the first eviction
                        victims = iter([name for name in self.names() if name not in protect])
                    victim = next(victims, None)
                    if victim is None:
                        raise
                    self._store.delete_context(victim)
                    self.evictions += 1
