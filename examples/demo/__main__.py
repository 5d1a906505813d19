"""``python -m demo`` with ``examples/`` on the path (``make install-check`` runs it so, against an installed
mplug_fast)."""

import sys

from .cli import main

sys.exit(main())
