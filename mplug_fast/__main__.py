"""``python -m mplug_fast`` runs the ``mplug-fast`` command line."""

from mplug_fast.cli import main

raise SystemExit(main())
