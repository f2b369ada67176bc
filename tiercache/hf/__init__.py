"""transformers integration: ``TieredCache`` (the ``Cache`` generate uses), the ``"tiercache"``
attention function and which model families it can take over."""
