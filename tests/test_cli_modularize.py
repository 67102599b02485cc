"""``zoocompile modularize train | extract | reuse``: end to end on a tiny conv+dense net (1 epoch of digits),
JSON output, tables, and one-line errors that write nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
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
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError
from zoocompiler.data import load_dataset
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
MODULE, WHOLE = "module.onnx", "whole.onnx"
PARITY = 1e-5
FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
FP32_IO = (FP32, FP32)


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
    """The options reach the report (their effect on residual nets is tested in test_mask_generators.py); an
    explicit --round-to wins over --target's default; --precision fp16 writes both files in half precision."""
    out = tmp_path / "union8"
    data = run_json("modularize", "reuse", trained[0], "--classes", "2,5", "--residual", "union", "--round-to", "8",
                    "--precision", "fp16", "--target", "cpu", TRUST, *FAST_TIMING, "--out", out)
    assert (data["residual"], data["round_to"], data["round_to_reason"]) == ("union", 8, "--round-to")
    assert data["precision"] == "fp16" and data["deploy"]["precision"] == "fp16"
    for name, row in ((MODULE, data["module"]), (WHOLE, data["whole"])):
        assert row["onnx_max_abs_diff"] <= 1e-4  # the fp32 export's parity, as before
        assert FP16 in _initializer_types(out / name) and FP32_IO == _io_types(out / name)
        written = row["onnx_precision"]
        assert written["precision"] == "fp16" and written["file_bytes"] == (out / name).stat().st_size
        assert written["max_abs_diff"] <= written["tolerance"]  # parity vs the fp32 PyTorch model, fp16 bound
        assert abs(written["accuracy_change"]) <= 0.05  # fp16 barely moves the accuracy
    fp32 = data["deploy"]["precisions"]["fp32"]  # the module has the table: the change is against ONNX fp32
    module = data["module"]["onnx_precision"]
    assert module["accuracy_change"] == pytest.approx(module["accuracy"] - fp32["accuracy"])
    whole = data["whole"]["onnx_precision"]  # no table: against the PyTorch fp32 model's accuracy
    assert whole["accuracy_change"] == pytest.approx(whole["accuracy"] - data["whole"]["accuracy"])
    assert all(n % 8 == 0 or n in (16, 32) for n in _conv_out_channels(out / MODULE))


# ----------------------------------------------------------------------------- precision (issue 17)


def _initializer_types(path: Path) -> set[int]:
    """The element types of the model's floating-point initializers (weights)."""
    floats = (FP16, FP32)
    return {i.data_type for i in onnx.load(path).graph.initializer if i.data_type in floats}


def _io_types(path: Path) -> tuple[int, int]:
    graph = onnx.load(path).graph
    return graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def _conv_out_channels(path: Path) -> list[int]:
    """The output channels of every Conv (its weight's first dimension; int8: the weight before DequantizeLinear)."""
    graph = onnx.load(path).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    counts = []
    for node in graph.node:
        if node.op_type == "Conv":
            weight = node.input[1]
            while weight not in shapes and weight in producer:  # Cast / DequantizeLinear in front of it
                weight = producer[weight].input[0]
            counts.append(shapes[weight][0])
    return counts


def _assert_latency_table(deploy: dict, batch: int) -> None:
    """Every precision timed on the CPU at batches 1 and ``batch``; the CUDA rows say "not available" (no GPU)."""
    cpu = {(r["precision"], r["batch"]): r for r in deploy["latency"] if r["provider"] == "CPUExecutionProvider"}
    assert set(cpu) == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, batch)}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in cpu.values())
    cuda = [r for r in deploy["latency"] if r["provider"] == "CUDAExecutionProvider"]
    assert len(cuda) == 6 and {r["status"] for r in cuda} == {"not available"}


def test_extract_default_is_fp32_with_one_timed_module(extracted):
    """Default: every class_<c>.onnx is fp32 as before, kept sets are not rounded (fp32 → target any), and the
    largest module gets the per-precision table (fp16 and int8 built from it, int8 calibrated on its class)."""
    out, data = extracted
    assert (data["precision"], data["round_to"]) == ("fp32", 1)
    assert data["round_to_reason"] == "target any (no rounding, implied by --precision fp32)"
    for row in data["per_class"]:
        assert _initializer_types(out / row["onnx"]) == {FP32} and "QuantizeLinear" not in _ops(out / row["onnx"])
        written = row["onnx_precision"]
        assert written["precision"] == "fp32" and written["file_bytes"] == (out / row["onnx"]).stat().st_size
        assert written["accuracy"] == pytest.approx(row["gated"]["recall"], abs=1e-6)  # ONNX recall = PyTorch
        assert written["accuracy_change"] == 0
    kernels = [row["kernels"] for row in data["per_class"]]
    assert data["deploy_class"] == kernels.index(max(kernels))
    deploy = data["deploy"]
    assert (deploy["path"], deploy["precision"]) == (f"class_{data['deploy_class']}.onnx", "fp32")
    assert list(deploy["precisions"]) == ["fp32", "fp16", "int8"]
    int8 = deploy["precisions"]["int8"]
    assert int8["accuracy_change"] == pytest.approx(int8["accuracy"] - deploy["precisions"]["fp32"]["accuracy"])
    own = int((load_dataset("digits", "train").y == data["deploy_class"]).sum())  # the timed class's training rows
    assert deploy["calibration"]["of_rows"] == own and deploy["calibration"]["rows"] == min(256, own)
    _assert_latency_table(deploy, 32)
    text = _render(cli_modularize.render_modularize_extract, data)
    assert "recall (fp32 ONNX)" in text and "ONNX Runtime latency" in text and "(the largest module)" in text
    assert "multiples of 1 (target any" in text


@pytest.fixture(scope="module")
def two_class_dir(tmp_path_factory) -> Path:
    """SPEC trained 1 epoch on a 2-class npz dataset (no standard model): extract has 2 modules to cut."""
    root = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 40)
    images = rng.integers(0, 256, size=(len(labels), 8, 8), dtype=np.uint8)
    np.savez(root / "two.npz", x=images, y=labels)
    out = root / "trained"
    run_json("modularize", "train", f"{SPEC},num_classes=2", "--data", f"npz:{root / 'two.npz'}", "--epochs", "1",
             "--batch-size", "32", "--no-standard", "--out", out)
    return out


def test_extract_fp16_rounds_to_8_and_writes_half_modules(two_class_dir, tmp_path):
    out = tmp_path / "fp16"
    data = run_json("modularize", "extract", two_class_dir, "--precision", "fp16", "--latency-runs", "0", TRUST,
                    "--out", out)
    assert (data["precision"], data["round_to"]) == ("fp16", 8)
    assert data["round_to_reason"] == "target gpu (fp16 tensor cores, implied by --precision fp16)"
    assert data["deploy"] is None and data["deploy_class"] is None  # --latency-runs 0: no module timed
    for row in data["per_class"]:
        path = out / row["onnx"]
        assert FP16 in _initializer_types(path) and _io_types(path) == FP32_IO  # fp32 I/O by default
        assert all(n % 8 == 0 for n in _conv_out_channels(path))  # rounded to multiples of 8
        written = row["onnx_precision"]
        assert written["precision"] == "fp16" and written["max_abs_diff"] <= written["tolerance"]
        assert written["accuracy_change"] == pytest.approx(written["accuracy"] - row["gated"]["recall"])
        assert row["onnx_max_abs_diff"] <= 1e-4  # the fp32 export it derives from
    text = _render(cli_modularize.render_modularize_extract, data)
    assert "recall (fp16 ONNX)" in text and "multiples of 8 (target gpu" in text and "ONNX Runtime latency" not in text


def test_reuse_int8_is_calibrated_qdq_with_the_accuracy_change(trained, tmp_path):
    out = tmp_path / "int8"
    data = run_json("modularize", "reuse", trained[0], "--classes", "1,3,7", "--precision", "int8", "--runs", "2",
                    "--latency-batch", "4", TRUST, "--out", out)
    assert (data["precision"], data["round_to"]) == ("int8", 16)
    assert data["round_to_reason"] == "target cpu (x86 NCHWc blocks, implied by --precision int8)"
    for name, row in ((MODULE, data["module"]), (WHOLE, data["whole"])):
        ops = _ops(out / name)
        assert ops.count("QuantizeLinear") >= 2 and "DequantizeLinear" in ops
        assert row["onnx_precision"]["precision"] == "int8" and row["onnx_precision"]["accuracy"] is not None
        assert row["latency_ms"] > 0  # the written (int8) file, timed
        assert all(n % 16 == 0 for n in _conv_out_channels(out / name))
    deploy = data["deploy"]
    assert (deploy["path"], deploy["precision"]) == (MODULE, "int8")
    precisions = deploy["precisions"]
    assert precisions["int8"]["accuracy_change"] == pytest.approx(
        precisions["int8"]["accuracy"] - precisions["fp32"]["accuracy"])
    assert precisions["fp32"]["accuracy"] == pytest.approx(data["module"]["accuracy"], abs=1e-6)
    sub_train = load_dataset("digits", "train", classes=[1, 3, 7])  # calibration: the sub-task's training split
    assert deploy["calibration"] == {"rows": 256, "seed": 0, "method": "minmax", "of_rows": len(sub_train)}
    _assert_latency_table(deploy, 4)
    assert {r["threads"] for r in deploy["latency"] if r["status"] == "ok"} == {1}
    text = _render(cli_modularize.render_modularize_reuse, data)
    assert "accuracy (int8 ONNX)" in text and "mixed module: int8 written to module.onnx" in text
    assert "int8 calibrated on 256 rows" in text and "multiples of 16 (target cpu" in text


def test_round_to_follows_the_target_unless_given():
    def rounding(**values) -> tuple[int, str]:
        deploy = DeployOptions(precision=values.pop("precision", "fp32"))
        config = ModularizeExtractConfig(deploy=deploy, **values)
        config.check()
        return config.rounding()

    assert rounding() == (1, "target any (no rounding, implied by --precision fp32)")
    assert rounding(precision="fp16")[0] == 8 and rounding(precision="int8")[0] == 16
    assert rounding(precision="fp16", target="cpu") == (16, "target cpu (x86 NCHWc blocks)")
    assert rounding(precision="int8", target="any") == (1, "target any (no rounding)")
    assert rounding(precision="fp16", round_to=4, target="cpu") == (4, "--round-to")
    assert rounding(round_to=1, precision="int8") == (1, "--round-to")
    for bad, message in (({"target": "tpu"}, "unknown --target 'tpu'"), ({"round_to": 0}, "bad --round-to 0")):
        with pytest.raises(ZooError, match=message):
            ModularizeReuseConfig(classes=[1], **bad).check()
    with pytest.raises(ZooError, match="bad --calibration-size 0"):
        ModularizeReuseConfig(classes=[1], deploy=DeployOptions(calibration_size=0)).check()


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
    "cuda without a GPU": (["--provider", "cuda"], "execution provider 'CUDAExecutionProvider'"),
    "io types": (["--io-types", "fp16"], "--io-types fp16 needs --precision fp16"),
    "calibration size": (["--precision", "int8", "--calibration-size", "0"], "bad --calibration-size 0"),
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
