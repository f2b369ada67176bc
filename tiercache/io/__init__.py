"""Storage: codecs, record format and the disk store."""

# Importing the codec modules registers them in ``codec.CODECS``.
from . import cachegen, lossless, quant  # noqa: F401
