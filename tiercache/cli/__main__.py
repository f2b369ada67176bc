"""``python -m tiercache.cli``: the ``tiercache`` command."""

import sys

from . import main

sys.exit(main())
