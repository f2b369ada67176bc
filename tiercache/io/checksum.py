"""crc32 (the zlib polynomial, as records carry it), as fast as this machine allows.

ISA-L's crc32 (package ``isal``) computes the same value as ``zlib.crc32`` about six times faster
(measured here: 18 GB/s against 3 GB/s per core); on a 2-core machine that is the difference
between verifying every read at disk speed or not. Without ``isal``, ``zlib.crc32``.
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32
except ImportError:  # optional accelerator
    crc32 = zlib.crc32

__all__ = ["crc32"]
