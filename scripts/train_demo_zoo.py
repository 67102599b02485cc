"""Retrain the demo zoo from scratch (seeded) and rewrite ``zoocompiler/zoo_weights``.

Usage: ``python scripts/train_demo_zoo.py [--names resnet_s vgg_s ...] [--out-dir DIR] [--keep] [--jobs N]``.
Calls ``zoocompiler.zoo.build_zoo(force=True)`` and prints the accuracy table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train into this checkout's package
from zoocompiler import zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="+", help="zoo models to train (default: all)")
    parser.add_argument("--out-dir", type=Path, help="where to write weights + manifest (default: the package)")
    parser.add_argument("--keep", action="store_true", help="skip models whose weights are already valid")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="models trained in parallel (default: cores)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    entries = zoo.build_zoo(args.names, force=not args.keep, progress=True, out_dir=args.out_dir, jobs=args.jobs)
    folder = entries[0].weights_file.parent
    records = zoo.read_manifest(folder)
    table = Table(title=f"demo zoo ({folder})")
    for column in ("model", "architecture", "classes", "params", "MACs", "test acc", "train s"):
        table.add_column(column, justify="left" if column in ("model", "architecture", "classes") else "right")
    for e in entries:
        r = records.get(e.name, {})
        classes = "all 10" if len(e.classes) == 10 else ",".join(map(str, e.classes))
        table.add_row(
            e.name,
            type(zoo.build_model(e.name)).__name__,
            classes,
            f"{r.get('params', 0):,}",
            f"{r.get('macs', 0) / 1e6:.2f}M",
            f"{100 * r.get('test_accuracy', 0):.1f}%",
            f"{r.get('train_seconds', 0):.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
