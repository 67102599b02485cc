"""The output location is checked before any work: a directory where a file is expected, the working
directory as --out, a parent that is a file, a --cache-dir that is a file, bad timing options — each is a
one-line error with exit 2, nothing is loaded or written. A cache that cannot be written degrades to no
cache with a warning."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli

from zoocompiler.core.cache import DiskCache


def _err(*argv: object) -> tuple[int, str]:
    code, _, err = run_cli(*argv)
    return code, err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output location was checked")

    monkeypatch.setattr("zoocompiler.sources.load_model", refuse)


def test_export_to_an_existing_directory(tmp_path, no_model_loading):
    code, err = _err("export", "zoo:vgg_s", "--out", tmp_path)
    assert code == 2
    assert_one_line_error(err, "is a directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "value"), [("--threads", "-1"), ("--runs", "-1")])
def test_export_rejects_bad_timing_options_before_writing(tmp_path, no_model_loading, option, value):
    out = tmp_path / "m.onnx"
    code, err = _err("export", "zoo:vgg_s", "--out", out, option, value)
    assert code == 2
    assert_one_line_error(err, f"bad {option} {value}")
    assert list(tmp_path.iterdir()) == []


def test_out_below_a_file(tmp_path, no_model_loading):
    (tmp_path / "file").write_text("x")
    code, err = _err("export", "zoo:vgg_s", "--out", tmp_path / "file" / "m.onnx")
    assert code == 2
    assert_one_line_error(err, "is a file, not a directory")
    code, err = _err("slice", "train", "zoo:vgg_s", "--data", "digits", "--out", tmp_path / "file" / "run")
    assert code == 2
    assert_one_line_error(err, "is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("out", [".", ".."])
def test_the_working_directory_is_never_an_output(tmp_path, monkeypatch, no_model_loading, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    code, err = _err("slice", "train", "zoo:vgg_s", "--data", "digits", "--out", out, "--force")
    assert code == 2
    assert_one_line_error(err, "is the working directory or contains it")
    assert (work / "mine.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")

    def refuse(*args, **kwargs):
        raise AssertionError("the zoo was analysed before --cache-dir was checked")

    monkeypatch.setattr("zoocompiler.pipelines.assemble.pipeline.analyse_zoo", refuse)
    code, err = _err("assemble", "--budget", "flops=3M", "--cache-dir", tmp_path / "cache",
                     "--out", tmp_path / "asm")  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "--cache-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_an_unwritable_cache_table_is_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    store = DiskCache(tmp_path / "file" / "latency")
    with caplog.at_level(logging.WARNING, logger="zoocompiler.core.cache"):
        store.write_map("blocks.json", {"k": 1.0})
    assert any("continuing without it" in r.getMessage() for r in caplog.records)
    assert store.read_map("blocks.json") == {}


def test_an_unwritable_similarity_cache_is_skipped_with_a_warning(tmp_path, caplog):
    from zoocompiler.passes.analysis import trace
    from zoocompiler.pipelines.zoo.similarity import zoo_similarity
    from zoocompiler.zoo import load_zoo_model

    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    graphs = {name: trace(load_zoo_model(name), x) for name in ("resnet_s", "vgg_s")}
    probe = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="zoocompiler.pipelines.zoo.similarity"):
        cached = zoo_similarity(graphs, probe, cache_dir=tmp_path / "file" / "sim", data_key="p")
    uncached = zoo_similarity(graphs, probe, cache_dir=None, data_key="p")
    assert any("continuing without it" in r.getMessage() for r in caplog.records)
    assert (cached.matrix == uncached.matrix).all()
