"""``python -m zoocompiler.cli`` runs the ``zoocompile`` CLI (as ``python -m zoocompiler`` does)."""

from . import main

raise SystemExit(main())
