"""``zoocompile modularize train | extract | reuse``: end to end on a tiny conv+dense net (1 epoch of digits),
JSON output, tables, and one-line errors that write nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import (
    assert_help_documents_every_option,
    assert_nothing_written,
    assert_one_line_error,
    rendered,
    run_cli,
    run_json,
    strict_json,
)

from zoocompiler import cli
from zoocompiler.cli import modularize as cli_modularize
from zoocompiler.pipelines.modularize.config import (
    ModularizeExtractConfig,
    ModularizeReuseConfig,
    ModularizeTrainConfig,
)
from zoocompiler.pipelines.modularize.train import read_record

SPEC = "python:models_for_tests:sliceable_mlp_cnn"  # conv 16, conv 32, dense 32: 80 kernels, 1×8×8 input
NO_GROUP = "python:models_for_tests:classifier_only"  # Flatten → Linear(64, 10): nothing to gate
TRAIN_ARGS = ("--data", "digits", "--epochs", "1")
TRUST = "--trust-code"  # the trained directory names a python: spec
FAST_TIMING = ("--runs", "3")
TRAIN_FILES = ["modular.safetensors", "modularize.json", "standard.safetensors", "training.png"]
REUSE_FILES = ["module.onnx", "report.json", "whole.onnx"]
PARITY = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """One directory trained by ``modularize train`` (modular + standard, 1 epoch of digits), shared by the file."""
    out = tmp_path_factory.mktemp("mwt") / "trained"
    return out, run_json("modularize", "train", SPEC, *TRAIN_ARGS, "--out", out)


@pytest.fixture(scope="module")
def extracted(trained, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("modules") / "modules"
    return out, run_json("modularize", "extract", trained[0], TRUST, "--out", out)


@pytest.fixture(scope="module")
def reused(trained, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """``reuse --classes 1,3,7`` with the sliced head and with a new head fine-tuned for 1 epoch."""
    root = tmp_path_factory.mktemp("reuse")
    heads = {"slice": (), "new": ("--finetune-epochs", "1")}
    return {
        head: (
            root / head,
            run_json("modularize", "reuse", trained[0], "--classes", "1,3,7", "--head", head, *extra, TRUST,
                     *FAST_TIMING, "--out", root / head),
        )
        for head, extra in heads.items()
    }  # fmt: skip


# ----------------------------------------------------------------------------- train


def test_train_writes_the_directory(trained):
    out, data = trained
    assert sorted(p.name for p in out.iterdir()) == TRAIN_FILES
    assert data["files"] == {name: str(out / name) for name in TRAIN_FILES}
    assert data["out"] == str(out)
    record = read_record(out)
    strict = strict_json(record)  # NaN → null, as --json prints
    assert {k: v for k, v in data.items() if k not in ("out", "files")} == strict
    cfg = record["config"]
    assert (cfg["spec"], cfg["data"], cfg["epochs"], cfg["standard"]) == (SPEC, "digits", 1, True)
    assert (cfg["alpha"], cfg["beta"]) == (0.5, 1.5)
    assert record["kernels"] == 16 + 32 + 32 == sum(p["units"] for p in record["points"])
    assert record["num_classes"] == 10 and record["input_shape"] == [1, 8, 8]
    for run in ("modular", "standard"):
        assert len(record[run]["history"]) == 1
        assert 0.0 <= record[run]["accuracy"] <= 1.0
        assert 0.0 <= record[run]["kernel_rate"] <= 1.0


def test_defaults_are_the_config_defaults():
    configs = {
        ("train", SPEC, "--out", "O"): ModularizeTrainConfig,
        ("extract", "DIR", "--out", "O"): ModularizeExtractConfig,
        ("reuse", "DIR", "--classes", "1", "--out", "O"): ModularizeReuseConfig,
    }
    for argv, config in configs.items():
        fields = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        parsed = vars(cli.build_parser().parse_args(["modularize", *argv]))
        defaults = {k: v for k, v in parsed.items() if k in fields and k != "spec"}
        assert len(defaults) >= 3, argv
        assert defaults == {k: fields[k] for k in defaults}, argv
    args = cli.build_parser().parse_args(["modularize", "train", SPEC, "--out", "O"])
    assert cli_modularize.train_config(args) == ModularizeTrainConfig(spec=SPEC)
    args = cli.build_parser().parse_args(["modularize", "train", SPEC, "--no-standard", "--out", "O"])
    assert cli_modularize.train_config(args).standard is False
    args = cli.build_parser().parse_args(["modularize", "reuse", "D", "--classes", "7,1", "--out", "O"])
    assert cli_modularize.reuse_config(args) == ModularizeReuseConfig(classes=[7, 1])


def test_train_table(trained):
    text = _render(cli_modularize.render_modularize_train, trained[1])
    assert f"modularize train {SPEC} on digits (alpha 0.5, beta 1.5)" in text
    assert "mask generators │ 3 (80 kernels)" in text
    assert "modular " in text and "standard " in text and "s/epoch" in text
    assert "modularize.json" in text


# ----------------------------------------------------------------------------- extract


def test_extract_writes_one_onnx_module_per_class(extracted):
    out, data = extracted
    names = [f"class_{c}.onnx" for c in range(10)] + ["modules.json", "overlap.png", "report.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert data["files"] == {name: str(out / name) for name in sorted(names)}
    report = json.loads((out / "report.json").read_text())
    strict = strict_json(report)
    assert {k: v for k, v in data.items() if k not in ("out", "files")} == strict
    assert (data["semantics"], data["threshold"], data["model"]["kernels"]) == ("gated", 0.9, 80)
    assert [row["class"] for row in data["per_class"]] == list(range(10))
    for row in data["per_class"]:
        assert row["gated"]["parity"] <= PARITY  # the gated module equals the masked modular model
        assert row["onnx"] == f"class_{row['class']}.onnx" and row["onnx_max_abs_diff"] <= 1e-4
        assert 1 <= row["kernels"] <= 80
    assert data["standard_modules"] is not None and 0 < data["modules"]["krr"] <= 1
    modules = json.loads((out / "modules.json").read_text())
    assert [m["class"] for m in modules["modules"]] == list(range(10))
    assert [sum(map(len, m["keep"])) for m in modules["modules"]] == [r["kernels"] for r in data["per_class"]]


def test_extract_table(extracted):
    text = _render(cli_modularize.render_modularize_extract, extracted[1])
    assert f"modularize extract {SPEC} on digits (τ 0.9)" in text
    assert "the modular model (MwT)" in text and "the standard model" in text
    assert "one module per class (gated semantics)" in text and "parity (gated)" in text
    assert "class_9.onnx" in text


# ----------------------------------------------------------------------------- reuse


@pytest.mark.parametrize("head", ["slice", "new"])
def test_reuse_writes_module_and_whole(reused, head):
    out, data = reused[head]
    assert sorted(p.name for p in out.iterdir()) == REUSE_FILES
    assert data["files"] == {name: str(out / name) for name in REUSE_FILES}
    assert (data["classes"], data["head"], data["whole_model"]) == ([1, 3, 7], head, "standard")
    assert data["finetune_epochs"] == (1 if head == "new" else 0)
    for row in (data["module"], data["whole"]):
        assert row["onnx_max_abs_diff"] <= 1e-4 and row["latency_ms"] > 0 and 0 <= row["accuracy"] <= 1
    assert 1 <= data["kernels"] <= 80 and data["krr"] == pytest.approx(data["kernels"] / 80)
    assert data["mac_ratio"] == pytest.approx(data["module"]["macs"] / data["whole"]["macs"])
    text = _render(cli_modularize.render_modularize_reuse, data)
    assert f"modularize reuse {SPEC}: classes 1,3,7 (τ 0.9)" in text
    assert "mixed module (gated)" in text and "whole model (standard)" in text and f"{head}:" in text


def test_reuse_passes_residual_and_round_to_through(trained, tmp_path):
    """The options reach the report (their effect on residual nets is tested in test_mask_generators.py)."""
    out = tmp_path / "union8"
    data = run_json("modularize", "reuse", trained[0], "--classes", "2,5", "--residual", "union", "--round-to", "8",
                    TRUST, *FAST_TIMING, "--out", out)
    assert (data["residual"], data["round_to"]) == ("union", 8)
    assert data["module"]["onnx_max_abs_diff"] <= 1e-4


# ----------------------------------------------------------------------------- errors


def _assert_user_error(argv, fragment: str, out: Path) -> None:
    """Exit 2, one line on stderr naming the cause, nothing on stdout (--json: no progress lines), nothing written."""
    code, stdout, err = run_cli(*argv, "--json")
    assert (code, stdout) == (2, ""), err
    assert_one_line_error(err, fragment)
    assert_nothing_written(out)


TRAIN_ERRORS = {
    "alpha": (["--alpha", "-1"], "alpha must be a finite number >= 0, got -1.0"),
    "beta": (["--beta", "-0.5"], "beta must be a finite number >= 0, got -0.5"),
    "epochs": (["--epochs", "0"], "epochs and learning rate must be positive"),
    "seed": (["--seed", "-1"], "bad --seed -1"),
}


@pytest.mark.parametrize("case", list(TRAIN_ERRORS))
def test_train_user_errors_write_nothing(case, tmp_path):
    argv, fragment = TRAIN_ERRORS[case]
    _assert_user_error(["modularize", "train", SPEC, *TRAIN_ARGS, *argv, "--out", tmp_path / "out"], fragment,
                       tmp_path / "out")  # fmt: skip


def test_train_refuses_a_model_with_no_prunable_group(tmp_path):
    argv = ["modularize", "train", NO_GROUP, *TRAIN_ARGS, "--out", tmp_path / "out"]
    _assert_user_error(argv, "no prunable conv/linear group to modularize", tmp_path / "out")


def test_train_existing_out_needs_force(trained):
    code, _, err = run_cli("modularize", "train", SPEC, *TRAIN_ARGS, "--out", trained[0])
    assert code == 2
    assert_one_line_error(err, "already exists")
    assert sorted(p.name for p in trained[0].iterdir()) == TRAIN_FILES


REUSE_ERRORS = {
    "class out of range": (["--classes", "1,12"], "class 12 is out of range (the model has classes 0..9)"),
    "class repeated": (["--classes", "1,1"], "class 1 is listed twice"),
    "class not an integer": (["--classes", "1,x"], "bad class list '1,x'"),
    "negative class": (["--classes=-1"], "class -1 is out of range"),
    "head": (["--classes", "1", "--head", "bogus"], "unknown head 'bogus'"),
    "finetune epochs": (["--classes", "1", "--head", "new", "--finetune-epochs", "0"], "fine-tuning epochs"),
    "runs": (["--classes", "1", "--runs", "0"], "bad --runs 0"),
}
EXTRACT_ERRORS = {
    "threshold zero": (["--threshold", "0"], "threshold 0.0 is outside (0, 1]"),
    "threshold above one": (["--threshold", "1.5"], "threshold 1.5 is outside (0, 1]"),
    "semantics": (["--semantics", "bogus"], "unknown module semantics 'bogus'"),
    "residual": (["--residual", "bogus"], "unknown residual layout 'bogus'"),
    "round to": (["--round-to", "0"], "bad --round-to 0"),
    "python spec untrusted": ([], "may not import and run code — pass --trust-code"),
}


@pytest.mark.parametrize("case", list(REUSE_ERRORS))
def test_reuse_user_errors_write_nothing(case, trained, tmp_path):
    argv, fragment = REUSE_ERRORS[case]
    out = tmp_path / "out"
    _assert_user_error(["modularize", "reuse", trained[0], *argv, TRUST, "--out", out], fragment, out)


@pytest.mark.parametrize("command", ["extract", "reuse"])
@pytest.mark.parametrize("case", list(EXTRACT_ERRORS))
def test_module_option_errors_write_nothing(case, command, trained, tmp_path):
    argv, fragment = EXTRACT_ERRORS[case]
    trust = [] if case == "python spec untrusted" else [TRUST]
    classes = ["--classes", "1"] if command == "reuse" else []
    out = tmp_path / "out"
    _assert_user_error(["modularize", command, trained[0], *classes, *argv, *trust, "--out", out], fragment, out)


def _slice_like(directory: Path, record: str) -> Path:
    """A ``slice train``-style directory holding a ``modularize.json`` that is not a modularize record."""
    directory.mkdir()
    (directory / "slice.json").write_text(json.dumps({"format": "zoocompiler.sliceable/1"}))
    (directory / "sliceable.safetensors").write_bytes(b"not weights")
    (directory / "modularize.json").write_text(record)
    return directory


NOT_TRAINED = {
    "empty dir": (lambda d: d.mkdir() or d, "is not a directory written by `zoocompile modularize train`"),
    "missing dir": (lambda d: d, "is not a directory written by `zoocompile modularize train`"),
    "junk record": (lambda d: _slice_like(d, "{junk"), "modularize.json is not valid JSON"),
    "slice record": (lambda d: _slice_like(d, json.dumps({"format": "zoocompiler.sliceable/1"})), "format"),
}


@pytest.mark.parametrize("command", ["extract", "reuse"])
@pytest.mark.parametrize("case", list(NOT_TRAINED))
def test_refuses_what_modularize_train_did_not_write(case, command, tmp_path):
    make, fragment = NOT_TRAINED[case]
    directory = make(tmp_path / "dir")
    classes = ["--classes", "1"] if command == "reuse" else []
    out = tmp_path / "out"
    _assert_user_error(["modularize", command, directory, *classes, TRUST, "--out", out], fragment, out)


@pytest.mark.parametrize("command", ["extract", "reuse"])
def test_out_never_replaces_the_trained_directory(command, trained):
    classes = ["--classes", "1"] if command == "reuse" else []
    for out in (trained[0], trained[0].parent):
        code, _, err = run_cli("modularize", command, trained[0], *classes, TRUST, "--out", out, "--force")
        assert code == 2
        assert_one_line_error(err, "would replace the trained directory")
    assert sorted(p.name for p in trained[0].iterdir()) == TRAIN_FILES


def test_existing_out_needs_force(trained, extracted):
    code, _, err = run_cli("modularize", "extract", trained[0], TRUST, "--out", extracted[0])
    assert code == 2
    assert_one_line_error(err, "already exists")
    assert (extracted[0] / "report.json").is_file()


def test_class_without_training_samples(tmp_path):
    """An npz dataset whose labels skip class 5 (10 classes by the largest label): training works, but class 5
    has no module, so ``extract`` and a ``reuse`` of class 5 are one-line errors that write nothing."""
    rng = np.random.default_rng(0)
    labels = np.array([c for c in range(10) if c != 5] * 12)
    images = rng.integers(0, 256, size=(len(labels), 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "no5.npz", x=images, y=labels)
    directory = tmp_path / "trained"
    code, _, err = run_cli("modularize", "train", SPEC, "--data", f"npz:{tmp_path / 'no5.npz'}", "--epochs", "1",
                           "--batch-size", "32", "--no-standard", "--out", directory, "--json")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "out"
    _assert_user_error(["modularize", "extract", directory, TRUST, "--out", out], "class 5 has no training sample", out)
    _assert_user_error(
        ["modularize", "reuse", directory, "--classes", "4,5", TRUST, "--out", out], "classes [5] not in dataset", out
    )


# ----------------------------------------------------------------------------- help


def _render(render, data: dict) -> str:
    return " ".join(rendered(render, data).split())  # whitespace runs as one space: a title wider than its table wraps


COMMANDS = [["modularize"], ["modularize", "train"], ["modularize", "extract"], ["modularize", "reuse"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_documents_every_option(command):
    assert_help_documents_every_option(command)
