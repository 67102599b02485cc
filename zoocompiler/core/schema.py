"""The one reader and checker for the JSON files the tool reads back (plans, records, manifests, caches).

A schema is plain data:

- a type or tuple of types: ``isinstance`` (``bool`` never counts as ``int``/``float``; use :data:`NUMBER`
  for "int or float");
- a ``dict``: an object with these keys (a key ending in ``?`` is optional; other keys are allowed);
- :class:`ListOf` / :class:`MapOf`: a list / a ``{str: ...}`` object of items, with a minimum length;
- :class:`OneOf`: one of the given literal values;
- :class:`Where`: a schema plus a predicate and the words for what it expects.

:func:`check` raises the given ``ZooError`` class with one line naming the file, the JSON path of the
first bad field (``config.lb``, ``rates[2].rate``; ``(top level)`` for the document) and what was
expected; :func:`load_json` reads a file (UTF-8, valid JSON) and checks it; :func:`parse_json` does the
same for bytes or text already read. Hand-written (~170 lines) rather than ``jsonschema``, which is not a
dependency; the messages are the CLI's one-line errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ZooError

NUMBER = (int, float)
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_len: int = 0


@dataclass(frozen=True)
class MapOf:
    value: Any
    min_len: int = 0


@dataclass(frozen=True)
class OneOf:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Where:
    schema: Any
    test: Callable[[Any], bool]
    expected: str


FINITE = Where(NUMBER, lambda v: math.isfinite(v), "a finite number")
NON_NEGATIVE = Where(NUMBER, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


class _Bad(Exception):
    def __init__(self, where: str, expected: str, found: Any):
        self.where, self.expected, self.found = where, expected, found


def _describe(schema: Any) -> str:
    if isinstance(schema, dict):
        return "an object"
    if isinstance(schema, ListOf):
        return "a non-empty list" if schema.min_len else "a list"
    if isinstance(schema, MapOf):
        return "a non-empty object" if schema.min_len else "an object"
    if isinstance(schema, OneOf):
        return " or ".join(json.dumps(v) for v in schema.values)
    if isinstance(schema, Where):
        return schema.expected
    types = schema if isinstance(schema, tuple) else (schema,)
    return "a number" if set(types) == set(NUMBER) else " or ".join(_NAMES.get(t, t.__name__) for t in types)


def _found(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _NAMES[type(value)]
    return text if len(text) <= 40 else text[:37] + "..."


def _walk(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, Where):
        try:
            _walk(value, schema.schema, where)
        except _Bad as bad:  # a wrong type at this very field: say what the field needs
            raise _Bad(where, schema.expected, value) if bad.where == where else bad from None
        if not schema.test(value):
            raise _Bad(where, schema.expected, value)
    elif isinstance(schema, OneOf):
        if value not in schema.values or isinstance(value, bool) != any(isinstance(v, bool) for v in schema.values):
            raise _Bad(where, _describe(schema), value)
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise _Bad(where, "an object", value)
        for key, sub in schema.items():
            name, optional = (key[:-1], True) if key.endswith("?") else (key, False)
            if name in value:
                _walk(value[name], sub, f"{where}.{name}" if where else name)
            elif not optional:
                raise _Bad(f"{where}.{name}" if where else name, _describe(sub), _Missing)
    elif isinstance(schema, (ListOf, MapOf)):
        is_list = isinstance(schema, ListOf)
        if not isinstance(value, list if is_list else dict) or len(value) < schema.min_len:
            raise _Bad(where, _describe(schema), value)
        items = enumerate(value) if is_list else value.items()
        for k, item in items:
            _walk(item, schema.item if is_list else schema.value, f"{where}[{json.dumps(k) if not is_list else k}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _Bad(where, _describe(schema), value)


_Missing = object()


def _name(what: str, source: str | Path) -> str:
    return f"{what} {source}" if what else str(source)


def check(doc: Any, schema: Any, source: str | Path, *, what: str = "", error: type[ZooError] = ZooError,
          fix: str | None = None) -> Any:
    """Return ``doc`` if it matches ``schema``, else raise ``error``: ``<what> <source> is malformed: <json path>
    must be <expected>, found <value>`` (one line)."""
    try:
        _walk(doc, schema, "")
    except _Bad as bad:
        where = bad.where or "(top level)"
        found = "missing" if bad.found is _Missing else f"found {_found(bad.found)}"
        raise error(f"{_name(what, source)} is malformed: {where} must be {bad.expected}, {found}", fix) from None
    return doc


def load_json(path: str | Path, schema: Any = None, *, what: str = "", error: type[ZooError] = ZooError,
              fix: str | None = None) -> Any:
    """Read ``path`` as UTF-8 JSON and :func:`check` it (``schema=None``: any JSON); a missing, unreadable,
    directory, non-UTF-8 or invalid-JSON file → ``error`` naming ``<what> <path>``."""
    path = Path(path)
    name = _name(what, path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise error(f"cannot read {name}: it is a directory, not a JSON file", fix) from None
    except FileNotFoundError:
        raise error(f"cannot read {name}: it does not exist", fix) from None
    except OSError as err:
        raise error(f"cannot read {name} ({err.strerror or err})", fix) from None
    return parse_json(data, path, schema, what=what, error=error, fix=fix)


def parse_json(data: bytes | str, source: str | Path, schema: Any = None, *, what: str = "",
               error: type[ZooError] = ZooError, fix: str | None = None) -> Any:
    """:func:`load_json` for bytes or text already read from ``source``."""
    name = _name(what, source)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise error(f"{name} is not UTF-8 text (bad byte at offset {err.start})", fix) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{name} is not valid JSON ({err.msg} at line {err.lineno})", fix) from None
    except RecursionError:
        raise error(f"{name} is nested too deeply to be read as JSON", fix) from None
    return doc if schema is None else check(doc, schema, source, what=what, error=error, fix=fix)
