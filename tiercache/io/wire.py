"""Little-endian arrays in and out of a byte payload, with bounds checks that fail closed."""

from __future__ import annotations

import numpy as np

from ..errors import CorruptBlockError


class Writer:
    """Collects numpy arrays (written little-endian, back to back) into one payload."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def put(self, array: np.ndarray, dtype: str) -> None:
        """Append ``array`` converted to numpy ``dtype`` (e.g. ``"<u4"``)."""
        self._parts.append(np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes())

    def put_count(self, n: int) -> None:
        """Append a u32 count."""
        self.put(np.array([n]), "<u4")

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads back what a ``Writer`` wrote; every read past the end raises ``CorruptBlockError``."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self._data = memoryview(data)
        self._at = 0
        self._what = what

    def take(self, count: int, dtype: str) -> np.ndarray:
        """The next ``count`` elements of numpy ``dtype``."""
        dt = np.dtype(dtype)
        end = self._at + count * dt.itemsize
        if count < 0 or end > len(self._data):
            raise CorruptBlockError(
                f"{self._what}: truncated, needs {count} x {dt} at byte {self._at} of {len(self._data)}"
            )
        out = np.frombuffer(self._data[self._at : end], dtype=dt)
        self._at = end
        return out

    def take_count(self, limit: int, name: str) -> int:
        """A u32 count, which must be at most ``limit``."""
        n = int(self.take(1, "<u4")[0])
        if n > limit:
            raise CorruptBlockError(f"{self._what}: {name} count {n} exceeds its limit {limit}")
        return n

    def finish(self) -> None:
        """Raise unless every byte was read."""
        if self._at != len(self._data):
            raise CorruptBlockError(f"{self._what}: {len(self._data) - self._at} trailing bytes")
