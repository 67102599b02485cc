"""Rules for the test suite itself, checked on the source of every test file (ast, nothing is run):
test modules share code through tests/helpers/ only, seeds never come from ``hash()`` (salted per
process), and no test asserts on the wall clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
FILES = sorted([*TESTS_DIR.glob("*.py"), *(TESTS_DIR / "helpers").glob("*.py")])
CLOCKS = {"time", "perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time", "time_ns"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(TESTS_DIR).as_posix())
def test_no_test_module_imports_another(path):
    imported = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    bad = sorted(m for m in imported if m.split(".")[0].startswith("test_") or m == "tests" or m.startswith("tests."))
    assert not bad, f"{path.name} imports test modules {bad}: move the shared code to tests/helpers/"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(TESTS_DIR).as_posix())
def test_no_hash_seeds_and_no_wall_clock(path):
    problems = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "hash":
            problems.append(f"line {node.lineno}: hash() is salted per process (use zlib.crc32)")
        if isinstance(f, ast.Attribute) and f.attr in CLOCKS and isinstance(f.value, ast.Name) and f.value.id == "time":
            problems.append(f"line {node.lineno}: time.{f.attr}() (assert a deterministic property instead)")
    assert not problems, f"{path.name}: {problems}"
