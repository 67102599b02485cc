"""``python -m zoocompiler`` runs the ``zoocompile`` CLI."""

from .cli import main

raise SystemExit(main())
