"""The ``zstd`` codec: lossless zstd compression of a block's raw bytes.

With ``shuffle=True`` the bytes are first split into planes (every element's first byte, then every
element's second byte, ...): the high byte of fp16/bf16 (sign, exponent) is far more predictable
than the low one, and zstd sees that only when the planes are apart.
The zstd frame carries its content size and checksum, so a tampered payload fails to decode.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from ..blocks import BlockLayout
from ..errors import ConfigError, CorruptBlockError, ShapeError
from .codec import Codec, check_payload, register_codec


@register_codec("zstd")
class ZstdCodec(Codec):
    """zstd at ``level`` (1..22) over the raw bytes of keys then values, byte-plane shuffled if
    ``shuffle``."""

    name = "zstd"
    lossless = True

    def __init__(self, level: int = 3, shuffle: bool = True) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
            raise ConfigError(f"zstd codec: level must be an int in 1..22, got {level!r}")
        if not isinstance(shuffle, bool):
            raise ConfigError(f"zstd codec: shuffle must be a bool, got {shuffle!r}")
        self.level = level
        self.shuffle = shuffle

    def params(self) -> dict[str, int | float | str]:
        return {"level": self.level, "shuffle": self.shuffle}

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape != v.shape or k.dtype != v.dtype or not k.dtype.is_floating_point:
            raise ShapeError(
                f"zstd codec: keys {tuple(k.shape)} {k.dtype} and values "
                f"{tuple(v.shape)} {v.dtype} must match and be floating point"
            )
        raw = torch.stack([k, v]).cpu().contiguous().view(torch.uint8).numpy()
        if self.shuffle:
            raw = raw.reshape(-1, k.dtype.itemsize).T
        frame = zstandard.ZstdCompressor(
            level=self.level, write_checksum=True, write_content_size=True
        ).compress(np.ascontiguousarray(raw).tobytes())
        return torch.frombuffer(bytearray(frame), dtype=torch.uint8).to(k.device)

    def decode(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_payload("zstd", payload)
        size = 2 * layout.kv_heads * tokens * layout.head_dim * layout.dtype.itemsize
        frame = payload.cpu().numpy().tobytes()
        try:
            # decompress allocates the size the frame declares: a damaged size field must be
            # refused here, not exhaust memory (max_output_size bounds only undeclared sizes).
            declared = zstandard.frame_content_size(frame)
            if declared > size:
                raise CorruptBlockError(f"zstd payload declares {declared} bytes, expected {size}")
            raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptBlockError(f"zstd payload does not decompress: {exc}") from exc
        if len(raw) != size:
            raise CorruptBlockError(f"zstd payload holds {len(raw)} bytes, expected {size}")
        data = np.frombuffer(raw, dtype=np.uint8)
        if self.shuffle:
            data = np.ascontiguousarray(data.reshape(layout.dtype.itemsize, -1).T)
        kv = (
            torch.from_numpy(data.copy()).view(layout.dtype).view(2, layout.kv_heads, tokens, layout.head_dim)
        )
        return kv[0].to(device), kv[1].to(device)
