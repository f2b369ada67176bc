"""Storage: codecs, record format and the disk store."""
