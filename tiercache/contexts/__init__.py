"""Saved contexts: a whole prompt's KV cache kept under a content key, to be loaded in this or
another process instead of recomputing the prefill.

- ``kv``: content keys, and saving / loading a context's KV as records in any backend.
- ``backends``: where contexts live (a ``DiskStore`` directory, a Redis server).
- ``eviction``: which saved contexts a full disk store gives up (least recently used first).
- ``store``: ``ContextStore``, encoding documents and loading them into a ``TieredCache``.
"""
