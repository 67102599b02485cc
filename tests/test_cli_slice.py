"""``zoocompile slice train`` / ``slice export``: end to end on zoo:vgg_s, JSON output, one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.cli import (
    assert_help_documents_every_option,
    assert_one_line_error,
    rendered,
    run_cli,
    run_json,
    strict_json,
)
from torch import nn

from zoocompiler import cli
from zoocompiler.cli import slice as cli_slice
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.data import load_dataset
from zoocompiler.exports.elastic import ElasticModel, LatencyBudgetError
from zoocompiler.exports.onnx_export import DEFAULT_ATOL_FP16
from zoocompiler.pipelines.slice.train import SliceTrainConfig, load_trained, read_record

SPEC = "zoo:vgg_s"
GROUPS = 4  # valid rates 0.25, 0.5, 0.75, 1; lb 0.375 rounds up to 0.5
TRAIN_ARGS = ("--from-scratch", "--groups", str(GROUPS), "--epochs", "1", "--lb", "0.375")
FAST_TIMING = ("--runs", "3", "--latency-batch", "4")
ATOL = 1e-4


def linear_only() -> nn.Module:
    """A 1×28×28 → 10 classifier with no hidden units: every unit group is pinned (input or classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """One trained directory (1 epoch of mnist5k) shared by every test of this file."""
    out = tmp_path_factory.mktemp("slice") / "vgg_sliced"
    return out, run_json("slice", "train", SPEC, *TRAIN_ARGS, "--out", out)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, dict]:
    """``slice export --rates 0.5,1`` of the trained directory."""
    out = tmp_path_factory.mktemp("export") / "rates"
    return out, run_json("slice", "export", trained[0], "--rates", "0.5,1", *FAST_TIMING, "--out", out)


@pytest.fixture(scope="module")
def model(trained):
    return load_trained(trained[0])[0]


# ----------------------------------------------------------------------------- train


def test_train_writes_the_directory_and_reports_every_rate(trained, model):
    out, data = trained
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "slice.json", "sliceable.safetensors"]
    assert data["files"] == {name: str(out / name) for name in ("accuracy.png", "slice.json", "sliceable.safetensors")}
    assert data["out"] == str(out)
    record = read_record(out)
    assert {k: v for k, v in data.items() if k not in ("out", "files")} == strict_json(record)
    cfg = record["config"]
    assert (cfg["spec"], cfg["groups"], cfg["lb"], cfg["epochs"], cfg["from_scratch"]) == (SPEC, 4, 0.375, 1, True)
    assert cfg["scheduler_options"] == {}
    assert [r["rate"] for r in data["rates"]] == [0.25, 0.5, 0.75, 1.0]
    assert [r["trained"] for r in data["rates"]] == [False, True, True, True]
    for row in data["rates"]:
        sliced = model.slice(row["rate"])
        assert (row["params"], row["macs"]) == (sliced.params, sliced.macs)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert len(data["history"]) == 1


def test_train_defaults_are_slice_train_config_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(SliceTrainConfig)}
    parsed = vars(cli.build_parser().parse_args(["slice", "train", SPEC]))
    defaults = {k: v for k, v in parsed.items() if k in fields and k != "spec"}
    assert {"data", "lb", "groups", "scheduler", "rescale", "epochs", "lr", "batch_size", "seed"} <= defaults.keys()
    assert defaults == {k: fields[k] for k in defaults}


def test_train_passes_only_the_scheduler_options_given():
    args = cli.build_parser().parse_args(
        ["slice", "train", SPEC, "--scheduler", "progressive-dynamic", "--warmup", "0.2", "--std", "0.5"]
    )
    config = cli_slice.train_config(args)
    assert config.scheduler == "progressive-dynamic"
    assert config.scheduler_options == {"std": 0.5, "warmup": 0.2}
    default = cli_slice.train_config(cli.build_parser().parse_args(["slice", "train", SPEC]))
    assert default == SliceTrainConfig(spec=SPEC)
    argv = ["slice", "train", SPEC, "--scheduler", "sandwich", "--random-rates", "3", "--distill",
            "--execution", "masked"]
    sandwich = cli_slice.train_config(cli.build_parser().parse_args(argv))
    assert (sandwich.scheduler_options, sandwich.distill, sandwich.execution) == ({"random": 3}, True, "masked")


def test_train_table(trained):
    text = rendered(cli_slice.render_slice_train, trained[1])
    assert "slice train zoo:vgg_s on mnist5k (G=4, lb 0.375)" in text
    for rate, share in (("0.25", "7%"), ("0.5", "26%"), ("0.75", "57%"), ("1 ", "100%")):
        assert rate in text and share in text
    assert text.count(" yes ") == 3 and text.count(" no ") == 1
    assert "sliceable.safetensors" in text


# ----------------------------------------------------------------------------- export


def test_export_rates_match_the_sliced_models(trained, exported, model):
    out, data = exported
    names = ["manifest.json", "rate_0.5000.onnx", "rate_1.0000.onnx", "rates.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert data["files"] == {name: str(out / name) for name in names}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in data.items() if k not in ("out", "files")} == manifest
    assert (manifest["groups"], manifest["lb"], manifest["latency_batch"]) == (4, 0.375, 4)
    accuracy = {r["rate"]: r["accuracy"] for r in trained[1]["rates"]}
    assert [row["rate"] for row in manifest["rates"]] == [0.5, 1.0]
    for row in manifest["rates"]:
        sliced = model.slice(row["rate"])
        assert (row["params"], row["macs"]) == (sliced.params, sliced.macs)
        assert row["accuracy"] == accuracy[row["rate"]]  # same weights, same test split as slice train
        assert row["budget_macs"] is None
        assert row["latency_ms"] > 0 and row["per_sample_ms"] > 0 and row["max_abs_diff"] <= ATOL
        # default precision fp32: each file's own result agrees with the fp32 PyTorch r-subnet
        written = row["deploy"]
        assert (row["precision"], written["precision"], written["accuracy_change"]) == ("fp32", "fp32", 0.0)
        assert written["accuracy"] == pytest.approx(row["accuracy"], abs=0.002)
        assert written["file_bytes"] == (out / row["onnx"]).stat().st_size
    assert manifest["full_macs"] == model.macs_at(1.0)
    # one latency table, the largest rate's (--runs and --latency-batch serve it), every precision side by side
    assert (manifest["precision"], manifest["deploy"]["path"]) == ("fp32", "rate_1.0000.onnx")
    cells = {(r["precision"], r["batch"]) for r in manifest["deploy"]["latency"] if r["status"] == "ok"}
    assert cells == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 4)}


def test_export_onnx_equals_the_sliced_torch_module(exported, model):
    x = load_dataset("mnist5k", "test").x[:8]
    for rate in (0.5, 1.0):
        session = ort.InferenceSession(str(exported[0] / f"rate_{rate:.4f}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = model.slice(rate).module(x).numpy()
            model.set_rate(rate)
            masked = model.eval()(x).numpy()
        model.set_rate(1.0)
        assert got.shape == (8, 10)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(want, masked, atol=ATOL, rtol=0)  # slice(r) == the sliceable model at r


def test_elastic_model_serves_the_export(exported, model):
    out, data = exported
    elastic = ElasticModel.from_manifest(out)
    assert elastic.rates == [0.5, 1.0]
    t = {row["rate"]: row["per_sample_ms"] / 1e3 for row in data["rates"]}
    assert elastic.per_sample == pytest.approx(t, rel=1e-12)
    n = 16
    for budget in (2 * n * t[0.5] * (1 + 1e-6), 2 * n * t[1.0] * (1 + 1e-6), 4 * n * max(t.values())):
        expected = max(r for r in t if n * t[r] <= budget / 2)  # the largest r with n·t(r) <= T/2
        assert elastic.choose_rate(n, budget) == expected
    with pytest.raises(LatencyBudgetError):
        elastic.choose_rate(n, n * min(t.values()))  # n·t(r) = T > T/2 for every rate
    x = load_dataset("mnist5k", "test").x[:n]
    result = elastic.run(x.numpy(), rate=0.5)
    with torch.no_grad():
        np.testing.assert_allclose(result.outputs, model.slice(0.5).module(x).numpy(), atol=ATOL, rtol=0)


def test_export_flops_and_rates_together(trained, exported, model, tmp_path):
    macs = {row["rate"]: row["macs"] for row in exported[1]["rates"]}
    budget = (macs[0.5] + macs[1.0]) // 2
    expected = max(r for r in model.valid_rates(0.375) if model.macs_at(r) <= budget)
    assert expected == 0.75  # between the two exported rates
    out = tmp_path / "flops"
    data = run_json("slice", "export", trained[0], "--flops", str(budget), "--rates", "1", *FAST_TIMING, "--out", out)
    rows = {row["rate"]: row for row in data["rates"]}
    assert sorted(rows) == [0.75, 1.0]
    assert (rows[0.75]["budget_macs"], rows[1.0]["budget_macs"]) == (budget, None)
    assert rows[0.75]["macs"] == model.macs_at(0.75) <= budget
    assert ElasticModel.from_manifest(out).rates == [0.75, 1.0]


def test_export_table(exported):
    text = rendered(cli_slice.render_slice_export, exported[1])
    assert "slice export zoo:vgg_s (G=4, lb 0.375)" in text
    assert "ms/sample b4" in text and "ONNX parity" in text
    assert "(26%)" in text and "(100%)" in text
    assert "manifest.json" in text and "ElasticModel.from_manifest" in text


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _fp16_share(path: Path) -> float:
    """The fraction of the float weights (elements) stored as fp16 (fp16 graphs keep a few fp32 norm constants)."""
    sizes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for t in onnx.load(str(path)).graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    return sizes[onnx.TensorProto.FLOAT16] / sum(sizes.values())


@pytest.fixture(scope="module")
def exported_int8(trained, tmp_path_factory) -> tuple[Path, dict]:
    """``slice export --rates 0.5,1 --precision int8``."""
    out = tmp_path_factory.mktemp("export_int8") / "rates"
    data = run_json("slice", "export", trained[0], "--rates", "0.5,1", "--precision", "int8", *FAST_TIMING,
                    "--out", out)
    return out, data


def test_export_int8_writes_every_rate_quantized(exported_int8, trained):
    out, data = exported_int8
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["precision"], manifest["io_types"]) == ("int8", "fp32")
    torch_accuracy = {r["rate"]: r["accuracy"] for r in trained[1]["rates"]}
    for row in manifest["rates"]:
        assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(out / row["onnx"])
        written = row["deploy"]
        assert (row["precision"], written["precision"]) == ("int8", "int8")
        assert written["file_bytes"] == (out / row["onnx"]).stat().st_size
        assert row["accuracy"] == torch_accuracy[row["rate"]]  # still the fp32 r-subnet's
        assert row["max_abs_diff"] <= ATOL  # the fp32 export's parity, as before
        # accuracy change of the int8 file against fp32 on the test split (ONNX Runtime)
        assert written["accuracy_change"] == pytest.approx(written["accuracy"] - row["accuracy"], abs=0.002)
        assert abs(written["accuracy_change"]) <= 0.05 and written["agreement"] >= 0.9
    main = manifest["deploy"]  # the largest rate's report: calibration, every precision, the latency table
    assert main["path"] == "rate_1.0000.onnx" and main["calibration"]["of_rows"] == 4000  # mnist5k's training split
    assert set(main["precisions"]) == {"fp32", "fp16", "int8"}
    rows = {(r["precision"], r["provider"], r["batch"]): r for r in main["latency"]}
    for precision in ("fp32", "fp16", "int8"):
        for batch in (1, 4):
            assert rows[(precision, "CPUExecutionProvider", batch)]["median_ms"] > 0
            assert rows[(precision, "CUDAExecutionProvider", batch)]["status"] == "not available"


def test_elastic_model_serves_the_int8_export(exported_int8, model):
    out, data = exported_int8
    elastic = ElasticModel.from_manifest(out)
    assert elastic.rates == [0.5, 1.0] and elastic.input_dtype == np.float32
    assert elastic.per_sample == pytest.approx({r["rate"]: r["per_sample_ms"] / 1e3 for r in data["rates"]})
    x = load_dataset("mnist5k", "test").x[:64]
    for rate in (0.5, 1.0):
        got = elastic.run(x.numpy(), rate=rate).outputs
        with torch.no_grad():
            want = model.slice(rate).module(x).numpy()
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_export_int8_table(exported_int8):
    text = rendered(cli_slice.render_slice_export, exported_int8[1])
    assert "int8 accuracy" in text and "vs fp32" in text and "int8 parity" in text
    assert "rate 1: int8 written to" in text and "ONNX Runtime latency" in text and "not available" in text


def test_export_fp16_with_fp16_io_runs_in_the_elastic_runtime(trained, model, tmp_path):
    out = tmp_path / "fp16"
    data = run_json("slice", "export", trained[0], "--rates", "0.5,1", "--precision", "fp16", "--io-types", "fp16",
                    *FAST_TIMING, "--out", out)
    assert data["precision"] == "fp16" and data["io_types"] == "fp16"
    for row in data["rates"]:
        assert _fp16_share(out / row["onnx"]) > 0.99
        written = row["deploy"]
        assert written["precision"] == "fp16" and written["max_abs_diff"] <= written["tolerance"]
    elastic = ElasticModel.from_manifest(out)
    assert elastic.input_dtype == np.float16
    x = load_dataset("mnist5k", "test").x[:16]
    got = elastic.run(x.numpy().astype(np.float16), rate=0.5).outputs
    with torch.no_grad():
        want = model.slice(0.5).module(x).numpy()
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want).max() <= DEFAULT_ATOL_FP16 * max(1.0, float(np.abs(want).max()))


def test_export_default_out_is_inside_the_trained_directory(trained, monkeypatch):
    """Without --out the export goes to DIR/export (export_rates stubbed: only the directory logic runs)."""
    seen = {}

    def fake_export(directory, staging, **kwargs):
        seen.update(kwargs, directory=directory, staging=staging)
        (staging / "manifest.json").write_text("{}")
        return {"rates": []}

    monkeypatch.setattr("zoocompiler.pipelines.slice.export.export_rates", fake_export)
    code, out, err = run_cli("slice", "export", trained[0], "--json")
    try:
        assert code == 0, err
        data = json.loads(out)
        assert data["out"] == str(trained[0] / "export")
        assert (trained[0] / "export" / "manifest.json").is_file()
        assert (seen["rates"], seen["flops"], seen["latency_batch"], seen["runs"]) == (None, None, 32, 30)
        assert seen["deploy"] == DeployOptions(latency_batch=32, latency_runs=30)  # fp32; --runs serves the table
        assert seen["staging"].parent == trained[0]
    finally:
        import shutil

        shutil.rmtree(trained[0] / "export", ignore_errors=True)
    assert sorted(p.name for p in trained[0].iterdir()) == ["accuracy.png", "slice.json", "sliceable.safetensors"]


# ----------------------------------------------------------------------------- errors


def _assert_user_error(argv, fragment: str, parent: Path) -> None:
    before = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    code, out, err = run_cli(*argv)
    assert code == 2, err
    assert out == ""
    assert_one_line_error(err, fragment)
    assert (sorted(p.name for p in parent.iterdir()) if parent.exists() else []) == before


TRAIN_ERRORS = {
    "unknown spec": (["zoo:nope"], "unknown zoo model 'nope'"),
    "lb zero": ([SPEC, "--lb", "0"], "lower bound 0 is outside (0, 1]"),
    "lb above one": ([SPEC, "--lb", "1.5"], "lower bound 1.5 is outside (0, 1]"),
    "scheduler option": ([SPEC, "--span", "0.1"], "unknown option 'span' for rate scheduler 'sandwich'"),
    "groups": ([SPEC, "--groups", "0"], "groups must be >= 1"),
    "no sliceable group": (["python:test_cli_slice:linear_only"], "no sliceable unit group"),
    "num_classes": (["timm:resnet18,in_chans=1"], "num_classes=10"),
    "distill without sandwich": ([SPEC, "--scheduler", "normal", "--distill"],
                                 "in-place distillation needs the full width in every batch"),
    "sandwich option": ([SPEC, "--scheduler", "normal", "--random-rates", "2"],
                        "unknown option 'random' for rate scheduler 'normal'"),
    "sandwich random": ([SPEC, "--random-rates", "-1"], "sandwich random rates -1"),
}


@pytest.mark.parametrize("case", list(TRAIN_ERRORS))
def test_train_user_errors_write_nothing(case, tmp_path):
    argv, fragment = TRAIN_ERRORS[case]
    _assert_user_error(["slice", "train", *argv, "--epochs", "1", "--out", tmp_path / "out"], fragment, tmp_path)
    assert not (tmp_path / "out").exists()


def test_train_channel_mismatch_is_a_user_error(tmp_path):
    _assert_user_error(["slice", "train", "timm:resnet18", "--out", tmp_path / "out"], "channel", tmp_path)


def test_train_existing_out_needs_force(trained):
    _assert_user_error(["slice", "train", SPEC, "--out", trained[0]], "already exists", trained[0].parent)
    assert (trained[0] / "slice.json").is_file()


EXPORT_ERRORS = {
    "rate above one": (["--rates", "0.5,1.5"], "slice rate '1.5' in '0.5,1.5' is not in (0, 1]"),
    "rate zero": (["--rates", "0"], "slice rate '0' in '0' is not in (0, 1]"),
    "rate below lb": (["--rates", "0.25,1"], "rate 0.25 is below the lower bound 0.5"),
    "bad flops": (["--flops", "lots"], "bad --flops 'lots'"),
    "flops below smallest": (["--flops", "1k"], "is below the smallest slice (rate 0.5"),
    "latency batch": (["--latency-batch", "0"], "bad --latency-batch 0"),
    "fp16 io without fp16": (["--io-types", "fp16"], "--io-types fp16 needs --precision fp16"),
}


@pytest.mark.parametrize("case", list(EXPORT_ERRORS))
def test_export_user_errors_write_nothing(case, trained, tmp_path):
    argv, fragment = EXPORT_ERRORS[case]
    _assert_user_error(["slice", "export", trained[0], *argv, "--out", tmp_path / "out"], fragment, tmp_path)
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_is_not_a_trained_directory(tmp_path):
    _assert_user_error(["slice", "export", tmp_path], "has no slice.json", tmp_path)


def test_export_never_replaces_the_trained_directory(trained):
    for out in (trained[0], trained[0].parent):
        _assert_user_error(
            ["slice", "export", trained[0], "--out", out, "--force"], "would replace the trained directory", out
        )
    assert (trained[0] / "sliceable.safetensors").is_file()


def test_export_existing_out_needs_force(trained, exported):
    _assert_user_error(["slice", "export", trained[0], "--out", exported[0]], "already exists", exported[0].parent)
    assert (exported[0] / "manifest.json").is_file()


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [["slice"], ["slice", "train"], ["slice", "export"]], ids=" ".join)
def test_help_documents_every_option(command):
    assert_help_documents_every_option(command)
