"""Class-id lists given on the command line (``--classes 1,3,7``)."""

from __future__ import annotations

from .errors import ZooError


def parse_classes(text: str) -> list[int]:
    """``"1,3,7"`` → ``[1, 3, 7]``; not integers, negative or repeated ids are a ``ZooError``."""
    items = [t.strip() for t in str(text).split(",")]
    try:
        classes = [int(t) for t in items]
    except ValueError:
        raise ZooError(f"bad class list {text!r}", "pass comma-separated class ids, e.g. --classes 1,3,7") from None
    return check_classes(classes)


def check_classes(classes: list[int], num_classes: int | None = None) -> list[int]:
    """``classes`` unchanged if they are distinct ids in ``[0, num_classes)`` (≥ 1 of them), else ``ZooError``."""
    if not classes:
        raise ZooError("no classes given", "pass at least one class id, e.g. --classes 1,3,7")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ZooError(f"class {repeated[0]} is listed twice", "list every class once, e.g. --classes 1,3,7")
    bad = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        limit = f"0..{num_classes - 1}" if num_classes is not None else "≥ 0"
        raise ZooError(f"class {bad[0]} is out of range (the model has classes {limit})",
                       f"pass class ids in {limit}")
    return classes
