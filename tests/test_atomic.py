"""Atomic writes: the destination holds either the old content or the complete new content."""

from __future__ import annotations

import json
import os
import stat

import pytest

from zoocompiler.core.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_bytes_creates_file_with_exact_content_and_no_temp(tmp_path):
    data = bytes(range(256)) * 100
    out = write_bytes_atomic(tmp_path / "a.bin", data)
    assert out == tmp_path / "a.bin"
    assert out.read_bytes() == data
    assert _leftovers(tmp_path) == []


def test_write_replaces_existing_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    write_text_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_missing_parent_directories_are_created(tmp_path):
    target = tmp_path / "x" / "y" / "z.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]}, sort_keys=True)
    text = target.read_text()
    assert text.endswith("\n")
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"')


def test_failure_inside_body_keeps_old_content_and_removes_temp(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"original")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target and not tmp.exists()
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"original"
    assert _leftovers(tmp_path) == []


def test_failure_without_existing_file_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_body_that_writes_nothing_raises_and_keeps_old(tmp_path):
    target = tmp_path / "f"
    target.write_text("keep")
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            pass
    assert target.read_text() == "keep"


def test_failing_rename_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "r.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_new_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = write_bytes_atomic(tmp_path / "p.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_temp_names_are_unique_per_call(tmp_path):
    seen = set()
    for _ in range(20):
        with atomic_path(tmp_path / "same") as tmp:
            seen.add(tmp.name)
            tmp.write_bytes(b"1")
    assert len(seen) == 20
    assert (tmp_path / "same").read_bytes() == b"1"
