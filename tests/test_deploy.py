"""Deployment precisions (issue 17): fp16 and int8 models derived from the verified fp32 export, their checks, the
latency table, the per-target --round-to, and the bad inputs (int8 without data, fp16 overflow, CUDA without GPU)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from helpers.architectures import ARCH_BY_ID, ARCH_IDS, fresh_model
from helpers.cli import assert_one_line_error, run_cli
from models_for_tests import tiny_cnn

from zoocompiler.core.deploy import DeployOptions, round_to_for
from zoocompiler.core.errors import ExportError, ZooError
from zoocompiler.exports.deploy import calibration_sample, export_deployable
from zoocompiler.exports.precision import FP32_OPS, fp16_overflow, to_fp16

TINY = "python:models_for_tests:tiny_cnn"
NO_TABLE = DeployOptions(latency_runs=0)


class TinyAttention(nn.Module):
    """Patch embedding, LayerNorm, one softmax attention, mean pool, head: the ops fp16 keeps in fp32."""

    def __init__(self, dim: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = (q @ k.transpose(1, 2) / 4.0).softmax(dim=-1)
        return self.head((attn @ v + t).mean(1))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # realistic statistics: outputs of order 1, not ~0
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _x(rows: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    values = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


# ----------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("factory", [tiny_cnn, TinyAttention], ids=["cnn", "attention"])
def test_fp16_model_is_half_with_norm_and_softmax_in_fp32(tmp_path, factory):
    model, x = _seeded(factory()), _x()
    report = export_deployable(model, x, tmp_path / "m.onnx", DeployOptions(precision="fp16", latency_runs=0))
    proto = onnx.load(tmp_path / "m.onnx")
    inits = [i for i in proto.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    half = sum(onnx.numpy_helper.to_array(i).size for i in inits if i.data_type == onnx.TensorProto.FLOAT16)
    assert half >= 0.95 * sum(onnx.numpy_helper.to_array(i).size for i in inits)  # LayerNorm's affine stays fp32
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O by default
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    types = _elem_types(proto)
    kept = [n for n in proto.graph.node if n.op_type in FP32_OPS]
    if factory is TinyAttention:
        assert {"LayerNormalization", "Softmax"} <= {n.op_type for n in kept}
    for node in kept:  # fed and computed in float32 (the converter casts around them)
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node
        assert types[node.output[0]] == onnx.TensorProto.FLOAT, node
    chosen = report.chosen
    assert chosen.precision == "fp16" and chosen.rel_tolerance == 1e-2
    assert 0 < chosen.rel_diff <= 1e-2  # half precision rounds, within the stated tolerance
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_fp16_io_types(tmp_path):
    model, x = _seeded(tiny_cnn()), _x()
    options = DeployOptions(precision="fp16", io_types="fp16", latency_runs=0)
    report = export_deployable(model, x, tmp_path / "m.onnx", options)
    proto = onnx.load(tmp_path / "m.onnx")
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy().astype(np.float16)})[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got.astype(np.float32) - ref).max() <= report.chosen.tolerance


class _Overflowing(nn.Module):
    """Finite in fp32, but its hidden layer reaches ~1e6: beyond fp16's 65504."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.down = nn.Linear(8, 2)
        with torch.no_grad():
            self.up.weight.fill_(2e4)
            self.down.weight.fill_(1e-5)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_fp16_overflow_names_the_node_and_writes_nothing(tmp_path):
    x = torch.ones(2, 8)
    with pytest.raises(ExportError, match=r"fp16 outputs overflow: node '.*' \(Gemm|MatMul") as err:
        export_deployable(_Overflowing().eval(), x, tmp_path / "m.onnx", DeployOptions(precision="fp16"))
    assert "\n" not in str(err.value) and "--precision fp32" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_fp16_overflow_finds_the_first_node():
    from zoocompiler.exports.onnx_export import export_onnx_bytes

    data, _ = export_onnx_bytes(_Overflowing().eval(), torch.ones(2, 8))
    proto = onnx.load_from_string(data)
    found = fp16_overflow(proto, [np.ones((2, 8), np.float32)])
    assert found is not None and found.op_type in ("Gemm", "MatMul") and found.peak == pytest.approx(8 * 2e4, rel=1e-3)
    order = [n.name for n in proto.graph.node]
    assert order.index(found.node) == min(i for i, n in enumerate(proto.graph.node) if n.op_type == found.op_type)
    assert fp16_overflow(proto, [np.full((2, 8), 1e-3, np.float32)]) is None  # 160: within range


def test_weight_beyond_fp16_range_is_refused():
    from zoocompiler.exports.onnx_export import export_onnx_bytes

    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = 1e6
    data, _ = export_onnx_bytes(model.eval(), torch.zeros(2, 4))
    with pytest.raises(ExportError, match=r"holds 1e\+06, beyond fp16's range"):
        to_fp16(onnx.load_from_string(data))


# ----------------------------------------------------------------------------- int8


def _task(rows: int = 96, seed: int = 0):
    """A separable 3-class task for tiny_cnn: the class sets the mean of one input channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(rows) % 3
    x = torch.randn(rows, 3, 16, 16, generator=g) * 0.3
    x[torch.arange(rows), y] += 1.5
    return x, y


def _trained_tiny() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=3)
    x, y = _task(192, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_int8_is_qdq_per_channel_with_accuracy_change(tmp_path):
    model = _trained_tiny()
    train_x, _ = _task(192, seed=3)
    test = _task(96, seed=4)
    options = DeployOptions(precision="int8", latency_runs=0, calibration_size=64)
    report = export_deployable(model, test[0][:2], tmp_path / "m.onnx", options, calibration=train_x, evaluation=test)
    proto = onnx.load(tmp_path / "m.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and "DequantizeLinear" in ops
    inits = {i.name: i for i in proto.graph.initializer}
    conv_weight = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    dq = next(n for n in proto.graph.node if n.output[0] == conv_weight)  # the weight's DequantizeLinear
    assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
    assert onnx.numpy_helper.to_array(inits[dq.input[1]]).size == 8  # one scale per output channel
    assert report.calibration == {"rows": 64, "seed": 0, "method": "minmax", "of_rows": 192}
    fp32, int8 = report.precisions["fp32"], report.chosen
    assert fp32.accuracy >= 0.9  # the task is learnt, so the comparison means something
    assert int8.accuracy_change == pytest.approx(int8.accuracy - fp32.accuracy)
    assert abs(int8.accuracy_change) <= 0.05 and int8.agreement >= 0.9
    assert int8.tolerance is None and int8.rel_diff > 0  # parity is information only for int8
    assert report.file_bytes < fp32.file_bytes


def test_int8_without_data_fails_before_exporting(tmp_path):
    with pytest.raises(ZooError, match="int8 needs data to calibrate on — pass --data"):
        export_deployable(tiny_cnn().eval(), _x(), tmp_path / "m.onnx", DeployOptions(precision="int8"))
    assert list(tmp_path.iterdir()) == []


def test_calibration_sample_is_seeded():
    x = torch.arange(100.0).view(100, 1)
    a, b = calibration_sample(x, 10, seed=0), calibration_sample(x, 10, seed=0)
    assert torch.equal(a, b) and len(set(a.flatten().tolist())) == 10
    assert not torch.equal(a, calibration_sample(x, 10, seed=1))
    assert len(calibration_sample(x, 500)) == 100


# ----------------------------------------------------------------------------- latency table, providers


def test_latency_table_has_every_precision_and_unavailable_cuda(tmp_path):
    model = _trained_tiny()
    options = DeployOptions(latency_runs=2, latency_batch=4)
    report = export_deployable(model, _x(), tmp_path / "m.onnx", options, calibration=_task()[0])
    cpu = {(r["precision"], r["batch"]): r for r in report.latency if r["provider"] == "CPUExecutionProvider"}
    assert set(cpu) == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 4)}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"] for r in cpu.values())
    cuda = [r for r in report.latency if r["provider"] == "CUDAExecutionProvider"]
    if not torch.cuda.is_available():
        assert len(cuda) == 6 and {r["status"] for r in cuda} == {"not available"}
        assert {r["why"] for r in cuda} <= {"onnxruntime-gpu not installed", "no CUDA device"}
    assert list(report.precisions) == ["fp32", "fp16", "int8"]
    assert report.precision == "fp32" and onnx.load(tmp_path / "m.onnx").graph.initializer[0].data_type == 1


def test_precision_not_asked_for_that_fails_is_a_row(tmp_path):
    x = torch.ones(2, 8)
    report = export_deployable(_Overflowing().eval(), x, tmp_path / "m.onnx", DeployOptions(latency_runs=1))
    assert report.precisions["fp16"].error.startswith("fp16 outputs overflow")
    assert report.precisions["int8"].error == "no data to calibrate on (--data)"
    assert {r["precision"] for r in report.latency} == {"fp32"}
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_provider_without_gpu_is_refused(tmp_path):
    with pytest.raises(ZooError, match="CUDAExecutionProvider") as err:
        export_deployable(tiny_cnn().eval(), _x(), tmp_path / "m.onnx", DeployOptions(provider="cuda"))
    assert "gpu" in str(err.value) or "no CUDA device" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_default_export_is_the_plain_fp32_export(tmp_path):
    from zoocompiler.exports.onnx_export import export_onnx

    model, x = _seeded(tiny_cnn()), _x()
    report = export_deployable(model, x, tmp_path / "d.onnx", NO_TABLE)
    plain = export_onnx(model, x, tmp_path / "p.onnx")
    assert (tmp_path / "d.onnx").read_bytes() == (tmp_path / "p.onnx").read_bytes()
    assert report.export.path == str(tmp_path / "d.onnx") and report.latency == []
    assert report.export.max_abs_diff == plain.max_abs_diff


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("precision", "target", "round_to", "expected"),
    [
        ("fp32", None, None, None),
        ("fp16", None, None, 8),
        ("int8", None, None, 16),
        ("fp16", "cpu", None, 16),
        ("int8", "any", None, None),
        ("fp16", "gpu", 4, 4),
    ],
)
def test_round_to_per_target(precision, target, round_to, expected):
    value, reason = round_to_for(precision, target, round_to)
    assert value == expected
    assert ("--round-to" in reason) == (round_to is not None)
    assert ("implied by --precision" in reason) == (round_to is None and target is None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DeployOptions(precision="fp8"), "unknown --precision 'fp8'"),
        (DeployOptions(io_types="fp16"), "--io-types fp16 needs --precision fp16"),
        (DeployOptions(provider="rocm"), "unknown --provider 'rocm'"),
        (DeployOptions(calibration_size=0), "bad --calibration-size 0"),
        (DeployOptions(latency_runs=-1), "bad --latency-runs -1"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ZooError, match=message.replace("(", r"\(")):
        options.check()


# ----------------------------------------------------------------------------- commands


def test_cli_export_int8_with_data(tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", "zoo:vgg_s", "--precision", "int8", "--data", "digits",
                                "--calibration-size", "64", "--runs", "0", "--out", out, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    deploy = data["deploy"]
    assert deploy["precision"] == "int8" and deploy["calibration"]["rows"] == 64
    assert deploy["precisions"]["int8"]["accuracy_change"] is not None
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--precision", "int8"], "int8 needs data to calibrate on — pass --data"),
        (["--precision", "fp32", "--io-types", "fp16"], "--io-types fp16 needs --precision fp16"),
        (["--precision", "int8", "--data", "digits"], "the model takes (3, 16, 16)"),
    ],
)
def test_cli_export_bad_deploy_input(tmp_path, extra, fragment):
    out = tmp_path / "m.onnx"
    code, _, err = run_cli("export", TINY, *extra, "--out", out)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_cuda_provider_without_gpu(tmp_path):
    code, _, err = run_cli("export", TINY, "--provider", "cuda", "--out", tmp_path / "m.onnx")
    assert code == 2
    assert_one_line_error(err, "CUDAExecutionProvider")
    assert list(tmp_path.iterdir()) == []


def test_cli_prune_fp16_rounds_to_8_and_says_why(tmp_path):
    out = tmp_path / "p"
    code, stdout, err = run_cli("prune", "torchvision:resnet18,num_classes=10", "--input-shape", "3,32,32",
                                "--ratio", "0.5", "--precision", "fp16", "--latency-runs", "0", "--out", out, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["plan"]["round_to"] == 8
    assert data["plan"]["round_to_reason"] == "target gpu (fp16 tensor cores, implied by --precision fp16)"
    kept = json.loads((out / "plan.json").read_text())["keep"]
    assert all(len(units) % 8 == 0 for units in kept.values())
    assert data["deploy"]["precisions"]["fp16"]["rel_diff"] <= 1e-2
    proto = onnx.load(out / "model.onnx")
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)


# ----------------------------------------------------------------------------- across the architecture matrix

QUICK_ARCHS = ("timm_vit_tiny",)


@pytest.mark.parametrize(
    "arch", [a if a in QUICK_ARCHS else pytest.param(a, marks=pytest.mark.slow) for a in ARCH_IDS]
)
def test_every_precision_on_real_architectures(tmp_path, arch):
    """fp16 within its stated tolerance, int8 a QDQ model with finite outputs, all three timed, on the matrix."""
    model = _seeded(fresh_model(arch))
    x = torch.randn(2, *ARCH_BY_ID[arch].input_shape)
    calibration = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    options = DeployOptions(precision="fp16", latency_runs=1, latency_batch=2)
    report = export_deployable(model, x, tmp_path / "m.onnx", options, calibration=calibration)
    fp16, int8 = report.precisions["fp16"], report.precisions["int8"]
    assert fp16.error is None and fp16.rel_diff <= 1e-2, fp16
    assert int8.error is None and np.isfinite(int8.max_abs_diff), int8
    assert int8.notes["quantize_nodes"] > 0
    assert int8.file_bytes < 0.5 * report.precisions["fp32"].file_bytes
    timed = {r["precision"] for r in report.latency if r.get("status") == "ok"}
    assert timed == {"fp32", "fp16", "int8"}



def test_cli_prune_implied_round_to_that_prunes_nothing_says_where_it_came_from(tmp_path):
    out = tmp_path / "p"
    code, _, err = run_cli("prune", TINY, "--ratio", "0.5", "--precision", "fp16", "--out", out)
    assert code == 2
    assert_one_line_error(err, "--round-to 8 (target gpu (fp16 tensor cores, implied by --precision fp16)) is not "
                               "smaller than any prunable group (the largest has 8 units)")
    assert list(tmp_path.iterdir()) == []


def test_int8_accuracy_guard_keeps_stem_and_classifier_float(tmp_path, monkeypatch):
    """Full int8 losing more than --int8-max-drop points is re-quantized with the first and last weighted nodes in
    float, and the more accurate model is written (accuracies stubbed: 100 % fp32, 50 % full int8, 90 % guarded)."""
    from zoocompiler.exports import deploy

    def stem_is_float(proto: onnx.ModelProto) -> bool:
        dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        return next(n for n in proto.graph.node if n.op_type == "Conv").input[1] not in dequantized

    def stub_accuracy(data, evaluation, providers):
        proto = onnx.load_from_string(data)
        if not any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            return 1.0
        return 0.9 if stem_is_float(proto) else 0.5

    monkeypatch.setattr(deploy, "_accuracy", stub_accuracy)
    model = _trained_tiny()
    test = _task(48, seed=4)
    options = DeployOptions(precision="int8", latency_runs=0)
    report = export_deployable(model, test[0][:2], tmp_path / "m.onnx", options, calibration=_task(64)[0],
                               evaluation=test)
    notes = report.chosen.notes
    assert notes["full_int8_drop_points"] == pytest.approx(50.0)
    written = onnx.load(tmp_path / "m.onnx")
    assert stem_is_float(written)  # the guarded model was written
    assert next(n for n in written.graph.node if n.op_type == "Conv").name in notes["float_nodes"]
    assert len(notes["float_nodes"]) == 2 and notes["quantize_nodes"] > 0


def test_int8_within_the_allowed_drop_stays_fully_int8(tmp_path):
    model = _trained_tiny()
    test = _task(96, seed=4)
    options = DeployOptions(precision="int8", latency_runs=0, int8_max_drop=100.0)
    report = export_deployable(model, test[0][:2], tmp_path / "m.onnx", options, calibration=_task(64)[0],
                               evaluation=test)
    assert report.chosen.notes["float_nodes"] == []
