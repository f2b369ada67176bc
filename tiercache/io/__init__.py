"""Storage: codecs, record format and the disk store (codecs load on first use: ``io.codec``)."""
