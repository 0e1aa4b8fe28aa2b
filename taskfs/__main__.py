"""``python -m taskfs``: the same as the ``taskfs`` command."""

import sys

from taskfs.cli import main

sys.exit(main())
