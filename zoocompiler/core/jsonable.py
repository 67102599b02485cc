"""One JSON sanitiser for reports, records and ``--json`` output."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any


def jsonable(value: Any, *, finite: bool = False) -> Any:
    """``value`` as plain JSON data: dataclasses → dicts, tuples/sets → lists, paths → str,
    numpy/torch scalars → Python numbers, other objects → ``str``.

    ``finite=True`` also maps NaN and ±inf to ``None`` so that the result is standard JSON
    (``json.dumps(..., allow_nan=False)`` accepts it).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), finite=finite) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v, finite=finite) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and finite and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
