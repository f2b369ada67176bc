"""The ``Codec`` interface: how a tier encodes a block's keys and values into bytes.

A codec turns a block's keys and values, each ``(kv_heads, tokens, head_dim)``, into a 1-D
``uint8`` tensor (its *payload*) and back. Codecs know nothing about where bytes live: pools hold
payloads in slots, the disk store wraps them in self-describing records (``tiercache.io.record``).

Codecs register themselves by name in ``CODECS``; ``make_codec(name, **params)`` builds one.
``CODECS`` knows every built-in name up front and imports a codec's module on first use, so
importing the registry (as configuration does, to check names) does not compile the entropy
coder's numba kernels.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping

import torch

from ..blocks import BlockLayout
from ..errors import ConfigError, CorruptBlockError



class CodecRegistry(Mapping[str, Callable[..., "Codec"]]):
    """Codec classes by name. Names map to the module defining the codec, which is imported
    when its class is first looked up (membership and listing import nothing)."""

    def __init__(self, modules: dict[str, str]) -> None:
        self._modules = dict(modules)
        self._classes: dict[str, Callable[..., Codec]] = {}

    def register(self, name: str, cls: type["Codec"]) -> None:
        self._modules.setdefault(name, cls.__module__)
        self._classes[name] = cls

    def __getitem__(self, name: str) -> Callable[..., "Codec"]:
        if name not in self._classes:
            importlib.import_module(self._modules[name])  # its decorator registers the class
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


#: Every codec, built-in ones by the module that defines them.
CODECS = CodecRegistry({"raw": __name__, "quant": f"{__package__}.quant",
                        "cachegen": f"{__package__}.cachegen", "zstd": f"{__package__}.lossless"})


def register_codec(name: str) -> Callable[[type["Codec"]], type["Codec"]]:
    """Class decorator adding a codec class to ``CODECS`` under ``name``."""

    def add(cls: type["Codec"]) -> type["Codec"]:
        CODECS.register(name, cls)
        return cls

    return add


def make_codec(name: str, **params: object) -> "Codec":
    """Build the codec registered as ``name`` with its parameters; ``ConfigError`` if unknown."""
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; known codecs: {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as exc:
        raise ConfigError(f"codec {name!r}: bad parameters {params}: {exc}") from exc


def check_payload(codec: str, payload: torch.Tensor) -> None:
    """``CorruptBlockError`` unless ``payload`` is a 1-D uint8 tensor, as every codec emits."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise CorruptBlockError(f"{codec} payload must be 1-D uint8, got {tuple(payload.shape)} {payload.dtype}")


class Codec(ABC):
    """Encodes one block's keys and values to a payload of bytes and back."""

    #: Registered name, stored in records so a reader knows how to decode.
    name: str = ""
    #: True when ``decode(encode(k, v))`` is bit-exact.
    lossless: bool = False

    def params(self) -> dict[str, int | float | str]:
        """Parameters needed to decode, stored in record headers (JSON-serialisable)."""
        return {}

    def fixed_nbytes(self, layout: BlockLayout, tokens: int) -> int | None:
        """Payload size in bytes for a block of ``tokens`` tokens, or None if it depends on the data.

        Tiers with fixed-size slots (the host pool) accept only codecs that return a size here.
        """
        return None

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Encode keys and values ``(kv_heads, tokens, head_dim)`` to a 1-D uint8 payload."""

    def encode_at(self, k: torch.Tensor, v: torch.Tensor, position: int, end: int | None = None) -> torch.Tensor:
        """``encode`` for a block whose first token is at sequence position ``position`` (tokens),
        in a sequence of ``end`` tokens when that length is final (a saved context), else None.

        Codecs that spend more bits on some positions (``cachegen`` keeps attention-sink tokens
        raw and codes tokens far from ``end`` coarser) override it; decoding never needs the
        position. The default ignores both.
        """
        return self.encode(k, v)

    @abstractmethod
    def decode(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a payload to keys and values ``(kv_heads, tokens, head_dim)`` of ``layout.dtype``
        on ``device``. Raises ``CorruptBlockError`` if the payload cannot be what ``encode`` made."""

    def encode_many(self, kv: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """Encode ``n`` full blocks, ``kv`` of shape ``(n, 2, kv_heads, block_tokens, head_dim)``,
        into an ``(n, fixed_nbytes)`` uint8 tensor on ``kv``'s device. Fixed-size codecs only.

        Pools move blocks in batches through this; codecs override it to vectorise.
        """
        rows = [self.encode(b[0], b[1]) for b in kv]
        return torch.stack(rows) if rows else torch.empty(0, self.fixed_nbytes(layout, layout.block_tokens) or 0,
                                                           dtype=torch.uint8, device=kv.device)

    def decode_many(self, payloads: torch.Tensor, layout: BlockLayout, device: torch.device | str) -> torch.Tensor:
        """Inverse of ``encode_many``: ``(n, fixed_nbytes)`` uint8 to ``(n, 2, kv_heads,
        block_tokens, head_dim)`` of ``layout.dtype`` on ``device``."""
        out = torch.empty((payloads.shape[0], 2, *layout.shape), dtype=layout.dtype, device=device)
        for i, row in enumerate(payloads):
            out[i, 0], out[i, 1] = self.decode(row, layout, layout.block_tokens, device)
        return out


@register_codec("raw")
class RawCodec(Codec):
    """The exact bytes of keys then values."""

    name = "raw"
    lossless = True

    def fixed_nbytes(self, layout: BlockLayout, tokens: int) -> int:
        return 2 * layout.kv_heads * tokens * layout.head_dim * layout.dtype.itemsize

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([k.contiguous().view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8)])

    def decode(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        expected = self.fixed_nbytes(layout, tokens)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise CorruptBlockError(
                f"raw payload has {payload.numel()} {payload.dtype} elements, expected {expected} uint8"
            )
        kv = payload.to(device).view(layout.dtype).view(2, layout.kv_heads, tokens, layout.head_dim)
        return kv[0], kv[1]

    def encode_many(self, kv: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        return kv.contiguous().view(kv.shape[0], -1).view(torch.uint8)

    def decode_many(self, payloads: torch.Tensor, layout: BlockLayout, device: torch.device | str) -> torch.Tensor:
        return payloads.to(device, non_blocking=True).view(layout.dtype).view(payloads.shape[0], 2, *layout.shape)
