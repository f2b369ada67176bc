"""The one-writer lock of a disk store directory.

``flock`` rather than ``fcntl``/``lockf`` record locks: a flock belongs to the open file, so two
stores in one process exclude each other too, and the kernel drops it when the holder dies (a
killed writer never leaves a stale lock). The holder writes its pid and host into the file so a
refused writer can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ..errors import StoreError

LOCK_NAME = "writer.lock"


class WriterLock:
    """An exclusive lock on ``directory/writer.lock``, held until ``release``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 256, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(self._fd)
            raise StoreError(
                f"disk store {directory} is already open for writing by {holder} (lock file {self.path}); "
                "open it with readonly=True to read it"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1
