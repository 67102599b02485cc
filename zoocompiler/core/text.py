"""Short human-readable text: the first line of an exception, compact counts."""

from __future__ import annotations

import re


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``str(err)`` with whitespace collapsed (the type name if empty).

    Longer than ``limit`` characters → cut to ``limit`` with a trailing ``...``.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = re.sub(r"\s+", " ", lines[0]) if lines else type(err).__name__
    if limit is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return text


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain_text(err: BaseException | str, limit: int = 8000) -> str:
    """``str(err)`` in full as plain text: ANSI colour/cursor codes removed, trailing spaces and blank runs trimmed;
    longer than ``limit`` characters → cut with a trailing ``...`` (the type name if empty)."""
    text = _ANSI.sub("", str(err))
    lines = [line.rstrip() for line in text.strip().splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human(n: float | int | None) -> str:
    """Compact count: 11689512 → '11.69M'; ``None`` → '-'."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"
