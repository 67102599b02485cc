"""``zoocompile assemble --precision fp16|int8``: model.onnx written at the chosen precision, checked against the fp32
PyTorch network, int8 calibrated on the task's training data and scored on its test split, the latency budget
checked on the file written, the per-precision latency table (CUDA rows "not available" without a GPU)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.cli import assert_one_line_error, rendered, run_cli, run_json
from torch import nn

from zoocompiler.cli import assemble as cli_assemble
from zoocompiler.core.budget import Budget
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError
from zoocompiler.exports.onnx_export import DEFAULT_ATOL_FP16
from zoocompiler.pipelines.assemble.pipeline import AssembleConfig, export_model
from zoocompiler.pipelines.assemble.task import load_task
from zoocompiler.training import evaluate, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_ZOO = "resnet_s,vgg_s"
QUICK = ("--zoo", SMALL_ZOO, "-K", "3", "--restarts", "4", "--top", "2", "--tune-top", "1", "--tune", "none",
         "--no-baselines")


def initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer if t.data_type != onnx.TensorProto.INT64}


def op_types(model) -> set[str]:
    """The op types of an ONNX model given as a path or as bytes."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return {n.op_type for n in proto.graph.node}


@pytest.fixture(scope="module")
def task():
    return load_task("digits")  # 8×8 digits: fit, val and test parts


@pytest.fixture(scope="module")
def net(task):
    """A small CNN trained for 3 epochs on the task's fit part (well above chance, so int8's change is meaningful)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    train(model, task.fit, epochs=3, progress=False)
    return model.eval()


def test_export_model_fp16(task, net, tmp_path):
    options = DeployOptions(precision="fp16", latency_runs=0)
    deploy, latency = export_model(net, task, tmp_path, AssembleConfig(budget=Budget(), deploy=options, latency_runs=3))
    path = tmp_path / "model.onnx"
    assert initializer_types(path) == {onnx.TensorProto.FLOAT16}  # fp16 weights
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"  # fp32 I/O kept by default
    x = task.test.x[:64]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= DEFAULT_ATOL_FP16 * max(scale, 1.0)
    chosen = deploy.chosen
    assert (deploy.precision, chosen.precision, deploy.latency) == ("fp16", "fp16", [])
    assert chosen.max_abs_diff <= chosen.tolerance and chosen.file_bytes == path.stat().st_size
    assert deploy.export.max_abs_diff <= 1e-4  # the fp32 export it derives from
    assert chosen.accuracy == pytest.approx(evaluate(net, task.test), abs=0.01)  # ONNX Runtime, fp16, test split
    assert latency.batch == 1 and latency.dtype == "float32" and latency.median_ms > 0  # the file written


def test_export_model_latency_budget_measures_the_written_file(task, net, tmp_path, monkeypatch):
    """The budget check times model.onnx as written (int8 here) and names its precision; nothing else is timed."""
    import zoocompiler.exports.deploy as deploy_module

    timed = []
    real = deploy_module.measure_latency

    def spy(path, shape, **kw):
        timed.append(("QuantizeLinear" in op_types(path), tuple(shape)))
        return real(path, shape, **kw)

    monkeypatch.setattr(deploy_module, "measure_latency", spy)
    config = AssembleConfig(budget=Budget(latency_ms=1e-6), deploy=DeployOptions(precision="int8", latency_runs=0),
                            latency_runs=3)
    with pytest.raises(ZooError, match=r"measures [0-9.]+ ms \(int8 model.onnx, batch 1\) > latency budget 1e-06 ms"):
        export_model(net, task, tmp_path, config)
    assert timed == [(True, (1, 1, 8, 8))]


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """``assemble --precision int8`` end to end on a two-model zoo (no tuning, no baselines), with a latency table."""
    root = tmp_path_factory.mktemp("asm_int8")
    out = root / "asm"
    data = run_json("assemble", *QUICK, "--budget", "flops=6M", "--cache-dir", root / "cache", "--precision",
                    "int8", "--latency-runs", "2", "--latency-batch", "4", "--out", out)
    return out, data


def test_assemble_int8_writes_a_calibrated_qdq_model(int8_run):
    out, data = int8_run
    path = out / "model.onnx"
    assert "QuantizeLinear" in op_types(path) and "DequantizeLinear" in op_types(path)
    assert onnx.TensorProto.INT8 in initializer_types(path)  # per-channel int8 weights
    deploy = data["deploy"]
    assert (data["precision"], deploy["precision"], deploy["path"]) == ("int8", "int8", str(path))
    assert deploy["file_bytes"] == path.stat().st_size
    assert deploy["export"]["path"] == data["export"]["path"] == ""  # the fp32 export was not written
    assert data["export"]["max_abs_diff"] <= 1e-4  # its parity: the fp32 model's, as before
    # calibrated on a seeded sample of the training (fit) split, scored on the test split
    assert deploy["calibration"] == {"rows": 256, "seed": 0, "method": "minmax", "of_rows": data["task"]["fit"]}
    int8, fp32 = deploy["precisions"]["int8"], deploy["precisions"]["fp32"]
    assert int8["accuracy_change"] == pytest.approx(int8["accuracy"] - fp32["accuracy"])
    assert fp32["accuracy"] == pytest.approx(data["accuracy"], abs=0.01)  # the PyTorch network's test accuracy
    assert abs(int8["accuracy_change"]) <= 0.05 and int8["agreement"] >= 0.9
    assert int8["notes"]["quantize_nodes"] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["deploy"]["path"] == "model.onnx" and report["precision"] == "int8"


def test_assemble_latency_table_has_every_precision(int8_run):
    out, data = int8_run
    rows = {(r["precision"], r["provider"], r["batch"]): r for r in data["deploy"]["latency"]}
    for precision in ("fp32", "fp16", "int8"):
        for batch in (1, 4):
            assert rows[(precision, "CPUExecutionProvider", batch)]["median_ms"] > 0
            assert rows[(precision, "CUDAExecutionProvider", batch)]["status"] == "not available"  # no GPU here
    assert data["latency_ms"] > 0  # the budget's measurement: the int8 file, batch 1
    text = rendered(cli_assemble.render_assemble, data)
    assert "(int8 model.onnx)" in text and "int8 (written)" in text
    assert "ONNX Runtime latency" in text and "not available" in text


def test_assemble_cuda_provider_without_a_gpu_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "asm"
    code, _, err = run_cli("assemble", *QUICK, "--budget", "flops=6M", "--provider", "cuda", "--out", out)
    assert code == 2
    assert_one_line_error(err, "CUDAExecutionProvider")
    assert not out.exists() and not list(tmp_path.glob(".asm*"))
