"""``zoocompile prune`` and ``zoocompile fuse``: files written, numbers consistent, replay, one-line errors."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers.cli import assert_nothing_written, assert_one_line_error, run_cli
from rich.console import Console

from zoocompiler import cli
from zoocompiler.cli import rewrite as cli_rewrite
from zoocompiler.cli.common import EXAMPLE_SEED
from zoocompiler.core.text import human
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import plans, run_analysis, trace
from zoocompiler.passes.rewrite.prune import prune
from zoocompiler.sources import load_model

SPEC = "torchvision:resnet18"
SHAPE = "3,32,32"
TINY = "python:models_for_tests:tiny_cnn"


def ort_output(path: str | Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def example(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A resnet18 checkpoint: every run below prunes the same weights (``--checkpoint``)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(load_model(SPEC).state_dict(), path)
    return path


def resnet18(weights: Path) -> torch.nn.Module:
    return load_model(SPEC, checkpoint=weights).eval()


@pytest.fixture(scope="module")
def traced(weights) -> torch.fx.GraphModule:
    """The graph the CLI traces (same weights, same seeded example input); rewrites leave it untouched."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(EXAMPLE_SEED))
    return trace(resnet18(weights), x)


def run_resnet18(command: str, weights: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(command, SPEC, "--input-shape", SHAPE, "--checkpoint", str(weights), *argv)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, weights) -> tuple[Path, dict]:
    """One ``prune --ratio 0.5 --json`` run on resnet18 at 3×32×32: (output dir, parsed stdout)."""
    out_dir = tmp_path_factory.mktemp("prune") / "r18_half"
    code, out, err = run_resnet18("prune", weights, "--ratio", "0.5", "--out", str(out_dir), "--json")
    assert code == 0, err
    return out_dir, json.loads(out)


# ----------------------------------------------------------------------------- prune


def test_prune_writes_plan_model_and_report(pruned):
    out_dir, data = pruned
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "plan.json", "report.json"]
    assert json.loads((out_dir / "report.json").read_text()) == data
    assert data["files"] == {name: str(out_dir / name) for name in ("plan.json", "model.onnx", "report.json")}
    plan = plans.Plan.load(out_dir / "plan.json")
    assert plan.keep and plan.strategy == "union"
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_prune_report_numbers_are_consistent(pruned, traced):
    out_dir, data = pruned
    p = data["prune"]
    assert p["params_after"] < p["params_before"] == sum(t.numel() for t in load_model(SPEC).parameters())
    assert p["macs_after"] < p["macs_before"]
    assert data["masked_max_abs_diff"] <= 1e-5
    assert data["export"]["max_abs_diff"] <= data["export"]["tolerance"]
    assert data["plan"] == {
        "source": "computed",
        "ratio": 0.5,
        "importance": "l1",
        "strategy": "union",
        "round_to": None,
        "round_to_reason": "target any (no rounding, implied by --precision fp32)",
        "seed": 0,
        "scope": "group",
    }
    # The plan on disk, replayed through the Python API (on a graph analysed in the plan's mode), gives the
    # module the report describes ...
    plan = plans.Plan.load(out_dir / "plan.json")
    assert plan.meta["layernorm_streams"] == "auto"  # zoocompile prune's default
    result = prune(run_analysis(copy.deepcopy(traced), layernorm_streams="auto"), plan)
    assert sum(t.numel() for t in result.module.parameters()) == p["params_after"]
    # ... and the ONNX file computes that module.
    x = example()
    with torch.no_grad():
        expected = result.module(x).numpy()
    np.testing.assert_allclose(ort_output(out_dir / "model.onnx", x), expected, atol=1e-4, rtol=0)


def test_prune_plan_replay_gives_the_same_onnx_output(pruned, weights, tmp_path):
    out_dir, data = pruned
    again = tmp_path / "again"
    code, out, err = run_resnet18("prune", weights, "--plan", str(out_dir / "plan.json"), "--out", str(again), "--json")
    assert code == 0, err
    replay = json.loads(out)
    assert replay["plan"]["source"] == str(out_dir / "plan.json")
    assert plans.Plan.load(again / "plan.json").keep == plans.Plan.load(out_dir / "plan.json").keep
    assert replay["prune"]["params_after"] == data["prune"]["params_after"]
    x = example()
    np.testing.assert_array_equal(ort_output(again / "model.onnx", x), ort_output(out_dir / "model.onnx", x))


def test_prune_table_summarises_the_run(pruned):
    _, data = pruned
    console = Console(record=True, width=200)
    cli_rewrite.render_prune(console, data)
    text = console.export_text()
    assert f"{human(data['prune']['params_before'])} → {human(data['prune']['params_after'])}" in text
    assert "ratio 0.5, l1 importance, union" in text
    assert "ONNX parity" in text


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--ratio", "1.5"], "bad --ratio 1.5"),
        (["--ratio", "0"], "bad --ratio 0.0"),
        ([], "prune needs --ratio or --plan"),
        (["--ratio", "0.5", "--plan", "p.json"], "both --ratio and --plan"),
        (["--plan", "missing.json"], "plan file missing.json not found"),
        (["--plan", "p.json", "--importance", "l2"], "only apply when computing a plan"),
        (["--ratio", "0.5", "--round-to", "0"], "bad --round-to 0"),
    ],
)
def test_prune_bad_options_exit_2_before_loading(tmp_path, extra, fragment):
    out_dir = tmp_path / "out"
    code, out, err = run_cli("prune", SPEC, "--input-shape", SHAPE, "--out", str(out_dir), *extra)
    assert (code, out) == (2, "")
    assert_one_line_error(err, fragment)
    assert_nothing_written(out_dir)


def test_prune_keeps_an_existing_dir_unless_forced(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep me")
    code, _, err = run_cli("prune", TINY, "--ratio", "0.5", "--out", str(out_dir))
    assert code == 2
    assert_one_line_error(err, "already exists")
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]

    code, out, err = run_cli("prune", TINY, "--ratio", "0.5", "--out", str(out_dir), "--force", "--json")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "plan.json", "report.json"]
    assert json.loads(out)["prune"]["params_after"] < json.loads(out)["prune"]["params_before"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old dir and the staging dir are gone


def test_prune_plan_for_another_model_is_rejected(pruned, tmp_path):
    out_dir, _ = pruned
    target = tmp_path / "out"
    code, out, err = run_cli("prune", TINY, "--plan", str(out_dir / "plan.json"), "--out", str(target))
    assert (code, out) == (2, "")
    assert_one_line_error(err, "plan was made for another model")
    assert_nothing_written(target)


def _edited_plan(source: Path, target: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return target


def test_prune_plan_pruning_a_pinned_group_is_rejected(pruned, weights, traced, tmp_path):
    out_dir, _ = pruned
    keys = plans.group_keys(traced)
    pinned = next(keys[g.gid] for g in graph_info(traced).unit_groups if g.pinned)
    plan_path = _edited_plan(out_dir / "plan.json", tmp_path / "plan.json", lambda d: d["keep"].update({pinned: [0]}))
    target = tmp_path / "out"
    code, _, err = run_resnet18("prune", weights, "--plan", str(plan_path), "--out", str(target))
    assert code == 2
    assert_one_line_error(err, f"group '{pinned}' is pinned")
    assert_nothing_written(target)


def test_prune_plan_with_out_of_range_index_is_rejected(pruned, weights, tmp_path):
    out_dir, _ = pruned
    key = next(iter(json.loads((out_dir / "plan.json").read_text())["keep"]))

    def edit(data):
        data["keep"][key] = [*data["keep"][key], 10**6]

    plan_path = _edited_plan(out_dir / "plan.json", tmp_path / "plan.json", edit)
    target = tmp_path / "out"
    code, _, err = run_resnet18("prune", weights, "--plan", str(plan_path), "--out", str(target))
    assert code == 2
    assert_one_line_error(err, f"group '{key}': keep index 1000000 is out of range")
    assert_nothing_written(target)


def test_prune_failure_while_writing_leaves_nothing(monkeypatch, tmp_path):
    from zoocompiler.core.errors import ExportError
    from zoocompiler.exports import deploy

    def failing_export(*args, **kwargs):
        raise ExportError("exporter exploded", "try again")

    monkeypatch.setattr(deploy, "export_onnx_bytes", failing_export)
    out_dir = tmp_path / "out"
    code, _, err = run_cli("prune", TINY, "--ratio", "0.5", "--out", str(out_dir))
    assert code == 2
    assert_one_line_error(err, "exporter exploded — try again")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- fuse


def test_fuse_writes_an_equal_model_with_fewer_nodes(weights, tmp_path):
    path = tmp_path / "fused.onnx"
    code, out, err = run_resnet18("fuse", weights, "--out", str(path), "--json")
    assert code == 0, err
    data = json.loads(out)
    f = data["fuse"]
    assert f["batchnorms_folded"] == 20  # every BatchNorm of resnet18
    assert f["nodes_after"] == f["nodes_before"] - 20
    assert f["params_after"] < f["params_before"]
    assert data["fused_max_abs_diff"] <= 1e-4
    x = example()
    with torch.no_grad():
        expected = resnet18(weights)(x).numpy()
    np.testing.assert_allclose(ort_output(path, x), expected, atol=1e-4, rtol=0)

    console = Console(record=True, width=200)
    cli_rewrite.render_fuse(console, data)
    text = console.export_text()
    assert f"{f['nodes_before']} → {f['nodes_after']}" in text
    assert "20 BatchNorm" in text


def test_fuse_bad_input_shape_is_one_line(tmp_path):
    path = tmp_path / "fused.onnx"
    code, _, err = run_cli("fuse", SPEC, "--input-shape", "3,32", "--out", str(path))
    assert code == 2
    assert_one_line_error(err, "bad --input-shape '3,32'")
    assert not path.exists()


def test_prune_options_reach_the_plan(tmp_path):
    out_dir = tmp_path / "out"
    argv = ["--ratio", "0.6", "--importance", "l2", "--strategy", "pad", "--round-to", "4", "--out", str(out_dir)]
    code, out, err = run_cli("prune", TINY, *argv, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["plan"] == {
        "source": "computed",
        "ratio": 0.6,
        "importance": "l2",
        "strategy": "pad",
        "round_to": 4,
        "round_to_reason": "--round-to",
        "seed": 0,
        "scope": "producer",
    }
    plan = plans.Plan.load(out_dir / "plan.json")
    assert plan.strategy == "pad"
    assert plan.keep and all(len(kept) == 4 for kept in plan.keep.values())  # 8 channels, 60 % off, rounded to 4


@pytest.mark.parametrize("command", ["prune", "fuse"])
def test_help_documents_every_option(command):
    parser = next(
        action.choices[command]
        for action in cli.build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    assert out.startswith(f"usage: zoocompile {command}")
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help text"
        for flag in action.option_strings:
            assert flag in out
