"""The exception hierarchy (and one warning). Every error tiercache raises on bad input is a
``TiercacheError``.

Messages say what was wrong and where (which block, file, offset or setting), so a user can act
on them without reading the source.
"""

from __future__ import annotations


class TiercacheError(Exception):
    """Base class of every error raised by tiercache."""


class ConfigError(TiercacheError, ValueError):
    """A configuration value is invalid (unknown codec, budget below one block, bad path, ...)."""


class ShapeError(TiercacheError, ValueError):
    """A tensor handed to tiercache has the wrong shape, dtype or device."""


class CapacityError(TiercacheError):
    """A tier (or every tier) is full and the request cannot be placed without losing data."""


class BlockNotFoundError(TiercacheError, KeyError):
    """A block key is not held by any tier."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "block not found"


class CorruptBlockError(TiercacheError):
    """A stored record failed validation (bad magic, version, checksum, truncation, ...).

    Raised instead of ever returning decoded garbage.
    """


class FingerprintError(TiercacheError):
    """Stored KV belongs to another model or setting (weights, config, dtype, layout, codec,
    record format), or was stored without a model fingerprint, so it cannot be checked: refused,
    never served. The message names what differs."""


class StoreError(TiercacheError):
    """A persistent store cannot be opened or written (missing directory, lock held, disk full)."""


class StoreWarning(UserWarning):
    """A persistent store found damage it worked around (an ignored manifest, damaged frames)."""


class UnsupportedModelError(TiercacheError):
    """A model whose attention tiercache cannot take over."""
