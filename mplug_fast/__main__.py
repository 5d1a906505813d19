"""``python -m mplug_fast`` = ``mplug-fast``."""

from mplug_fast.cli import main

raise SystemExit(main())
