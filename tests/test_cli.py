"""The ``zoocompile`` command line: help, JSON output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_help_documents_every_option, assert_one_line_error

from zoocompiler import cli
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.cut_points import cut_point_table
from zoocompiler.sources import load_model

TESTS_DIR = Path(__file__).parent
TINY = "python:models_for_tests:tiny_cnn"  # tests/ is on sys.path (conftest.py)
COMMANDS = [["inspect"], ["export"], ["zoo"], ["zoo", "list"], ["zoo", "build"]]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_documents_every_option(command):
    assert_help_documents_every_option(command)


def test_top_level_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("inspect", "export", "zoo", "--debug", "exit codes"):
        assert word in out
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, "zoocompile 0.1.0")


def test_missing_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "required: COMMAND" in err


# ----------------------------------------------------------------------------- inspect


def test_inspect_json_matches_the_python_api(capsys):
    code, out, err = run(capsys, "inspect", TINY + ",num_classes=4", "--json")
    assert code == 0, err
    data = json.loads(out)
    model = load_model(TINY + ",num_classes=4")
    gm = trace(model, torch.randn(1, 3, 16, 16))
    summary = data["summary"]
    assert summary["input_shape"] == [1, 3, 16, 16]
    assert summary["params"] == sum(p.numel() for p in model.parameters()) == 8 * 27 + 8 + 16 + 8 * 72 + 8 + 16 + 36
    assert summary["nodes"] == len(gm.graph.nodes)
    assert summary["cut_points"] == len(graph_info(gm).cut_points) == len(data["cut_points"])
    assert [row["node"] for row in data["cut_points"]] == graph_info(gm).cut_points
    table = cut_point_table(gm)
    assert [row["cum_macs"] for row in data["cut_points"]] == [row.cum_macs for row in table]
    assert data["cut_points"][-1]["cum_params"] == summary["params"]
    assert data["cut_points"][-1]["cum_macs"] == summary["macs"] == 16 * 16 * 8 * 27 + 16 * 16 * 8 * 72 + 8 * 4
    groups = graph_info(gm).unit_groups
    assert summary["groups"] == len(groups) == len(data["unit_groups"])
    assert summary["prunable_groups"] + summary["pinned_groups"] == summary["groups"]
    assert [g["size"] for g in data["unit_groups"]] == [g.size for g in groups]


def test_inspect_resnet18_small_input(capsys):
    code, out, err = run(
        capsys, "inspect", "torchvision:resnet18", "--input-shape", "3,32,32", "--batch", "2", "--json"
    )
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["input_shape"] == [2, 3, 32, 32]
    assert summary["params"] == 11_689_512
    assert summary["tracer"] == "fx"


def test_inspect_tables(capsys):
    code, out, err = run(capsys, "inspect", TINY)
    assert code == 0, err
    for title in (TINY, "cut points", "unit groups", "cum MACs", "prunable"):
        assert title in out
    gm = trace(load_model(TINY), torch.randn(1, 3, 16, 16))
    for name in graph_info(gm).cut_points:
        assert name in out


def test_inspect_needs_exactly_one_model(capsys):
    code, out, err = run(capsys, "inspect")
    assert (code, out) == (2, "")
    assert_one_line_error(err, "inspect needs a model")
    code, _, err = run(capsys, "inspect", TINY, "--zoo", "demo")
    assert code == 2
    assert_one_line_error(err, "both a model SPEC and --zoo")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["inspect", "timm:resnet1800"], "unknown timm model 'resnet1800' — did you mean timm:resnet18"),
        (["inspect", "resnet18"], "did you mean torchvision:resnet18 or timm:resnet18?"),
        (["inspect", TINY, "--input-shape", "3,32"], "bad --input-shape '3,32'"),
        (["inspect", TINY, "--input-shape", "3,a,4"], "bad --input-shape '3,a,4'"),
        (["inspect", TINY, "--batch", "0"], "bad --batch 0"),
        (["inspect", TINY, "--input-shape", "1,16,16"], "model rejects input of shape (1, 1, 16, 16)"),
        (["export", TINY, "--out", "never.onnx", "--input-shape", "3,32"], "bad --input-shape '3,32'"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, fragment):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 2
    assert out == ""
    assert_one_line_error(err, fragment)


def test_corrupted_checkpoint(capsys, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x80\x02not really a pickle")
    code, _, err = run(capsys, "inspect", TINY, "--checkpoint", str(path))
    assert code == 2
    assert_one_line_error(err, "file is corrupted or not a checkpoint")


def test_checkpoint_and_pickle_flags(capsys, tmp_path):
    from models_for_tests import TrainingConfig

    model = load_model(TINY)
    path = tmp_path / "with_config.pt"
    torch.save({"state_dict": model.state_dict(), "config": TrainingConfig()}, path)
    code, _, err = run(capsys, "inspect", TINY, "--checkpoint", str(path))
    assert code == 2
    assert_one_line_error(err, "pass --allow-pickle (allow_pickle=True) if you trust the file")
    code, out, err = run(capsys, "inspect", TINY, "--checkpoint", str(path), "--allow-pickle", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["params"] == sum(p.numel() for p in model.parameters())


def test_debug_shows_traceback(capsys):
    code, _, err = run(capsys, "--debug", "inspect", "timm:resnet1800")
    assert code == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: unknown timm model")


def test_internal_errors_exit_1_with_one_line(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("zoocompiler.cli.inspect.cmd_inspect", broken)
    code, out, err = run(capsys, "inspect", TINY)
    assert (code, out) == (1, "")
    assert err == "error: internal error: RuntimeError: boom second line (rerun with --debug)\n"
    code, _, err = run(capsys, "--debug", "inspect", TINY)
    assert code == 1
    assert "Traceback" in err


# ----------------------------------------------------------------------------- export and zoo


def test_export_json(capsys, tmp_path):
    out_path = tmp_path / "tiny.onnx"
    code, out, err = run(capsys, "export", TINY, "--out", str(out_path), "--runs", "3", "--threads", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert out_path.is_file()
    assert data["input_shape"] == [1, 3, 16, 16]
    assert Path(data["export"]["path"]) == out_path
    assert data["export"]["max_abs_diff"] <= 1e-4
    assert data["latency"]["threads"] == 1
    assert data["latency"]["median_ms"] > 0


def test_export_without_timing(capsys, tmp_path):
    out_path = tmp_path / "tiny.onnx"
    code, out, err = run(capsys, "export", TINY, "--out", str(out_path), "--runs", "0")
    assert code == 0, err
    assert out_path.is_file()
    assert "parity" in out and "median" not in out


def test_export_fp16(capsys, tmp_path):
    out_path = tmp_path / "tiny16.onnx"
    code, out, err = run(capsys, "export", TINY, "--out", str(out_path), "--fp16", "--runs", "0", "--json")
    assert code == 0, err
    data = json.loads(out)
    deploy = data["deploy"]
    assert deploy["precision"] == "fp16" and Path(deploy["path"]) == out_path
    fp16 = deploy["precisions"]["fp16"]
    assert fp16["max_abs_diff"] <= fp16["tolerance"] and fp16["rel_tolerance"] == 1e-2
    assert data["export"]["max_abs_diff"] <= data["export"]["tolerance"]  # the fp32 export it derives from
    assert data["latency"] is None


def test_zoo_list_json(capsys):
    from zoocompiler.zoo import list_entries

    code, out, err = run(capsys, "zoo", "list", "--json")
    assert code == 0, err
    models = json.loads(out)["models"]
    entries = list_entries()
    assert [m["name"] for m in models] == [e.name for e in entries]
    assert [m["input_shape"] for m in models] == [list(e.input_shape) for e in entries]


def _tiny_entries(tmp_path) -> list:
    from zoocompiler.zoo import ZooEntry

    return [
        ZooEntry("tiny_a", TINY, tuple(range(10)), "digits", (3, 16, 16), 0.95, 1000, tmp_path / "a.safetensors"),
        ZooEntry("tiny_b", TINY, (0, 1, 2), "digits", (3, 16, 16), None, None, tmp_path / "b.safetensors"),
    ]


def test_inspect_zoo_summarises_every_model(capsys, monkeypatch, tmp_path):
    import zoocompiler.zoo as zoo

    entries = _tiny_entries(tmp_path)
    monkeypatch.setattr(zoo, "list_entries", lambda collection=None: entries)
    monkeypatch.setattr(zoo, "load_zoo_model", lambda name: load_model(TINY))
    code, out, err = run(capsys, "inspect", "--zoo", "demo", "--json")
    assert code == 0, err
    data = json.loads(out)
    gm = trace(load_model(TINY), torch.randn(1, 3, 16, 16))
    assert [m["name"] for m in data["models"]] == ["tiny_a", "tiny_b"]
    for row in data["models"]:
        assert row["params"] == sum(p.numel() for p in load_model(TINY).parameters())
        assert row["cut_points"] == len(graph_info(gm).cut_points)
        assert row["prunable_groups"] == sum(g.prunable for g in graph_info(gm).unit_groups)
    assert data["models"][1]["classes"] == [0, 1, 2]
    code, out, err = run(capsys, "inspect", "--zoo", "demo")
    assert code == 0, err
    assert "tiny_a" in out and "0.950" in out and "0,1,2" in out
    code, _, err = run(capsys, "inspect", "--zoo", "mine")
    assert code == 2
    assert_one_line_error(err, "unknown zoo 'mine'")


def test_zoo_build_json_keeps_stdout_pure(capsys, monkeypatch, tmp_path):
    import zoocompiler.zoo as zoo

    calls = []

    def fake_build(force=False, progress=True):
        calls.append((force, progress))
        print("training tiny_a ...")  # libraries may print: with --json this must not reach stdout
        return _tiny_entries(tmp_path)

    monkeypatch.setattr(zoo, "build_zoo", fake_build)
    code, out, err = run(capsys, "zoo", "build", "--force", "--json")
    assert code == 0, err
    assert calls == [(True, True)]
    assert [m["name"] for m in json.loads(out)["models"]] == ["tiny_a", "tiny_b"]
    assert "training tiny_a" in err


# ----------------------------------------------------------------------------- console script


def _console_script() -> Path:
    script = Path(sys.executable).parent / "zoocompile"
    if not script.exists():
        pytest.skip("console script not installed: run `make install` (pip install -e '.[dev]')")
    return script


def test_console_script_end_to_end():
    script = _console_script()
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    ok = subprocess.run([script, "inspect", TINY, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["summary"]["input_shape"] == [1, 3, 16, 16]
    bad = subprocess.run([script, "inspect", "timm:resnet1800"], capture_output=True, text=True, env=env, timeout=300)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert_one_line_error(bad.stderr, "did you mean timm:resnet18")
