"""ONNX export: checker, ONNX Runtime parity (fp32 and fp16), dynamic batch, atomic writes, latency reports.

Every parity assertion is recomputed here with a plain ``onnxruntime.InferenceSession`` on the
written file, independently of the exporter's own check. Models get randomised norm statistics
(and no all-zero heads) so their outputs are O(0.01..1): fresh torchvision inits give outputs as
small as 1e-14, or exactly 0 for ViT, which would make any tolerance vacuous.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from helpers.architectures import ARCH_BY_ID, fresh_model
from models_for_tests import tiny_cnn

from zoocompiler.core.errors import ExportError, InputShapeError, ZooError
from zoocompiler.exports import (
    available_providers,
    export_onnx,
    measure_latency,
    onnx_parity,
    ort_session,
    parity_stats,
)
from zoocompiler.exports import onnx_export as onnx_export_module
from zoocompiler.exports.latency import has_fp16

FP32_TOL = 1e-4
FP16_TOL = 1e-2


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every norm layer; no all-zero weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():  # e.g. torchvision ViT's zero head
                m.weight.normal_(0.0, 0.05, generator=gen)
            if not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def build(case_id: str) -> tuple[nn.Module, torch.Tensor]:
    """``<arch id>`` or ``<arch id>+fx`` (torch.fx.symbolic_trace of it) or ``<arch id>+zc`` (our tracer)."""
    arch_id, _, variant = case_id.partition("+")
    case = ARCH_BY_ID[arch_id]
    model = randomize_norms(fresh_model(arch_id))  # seed 0, load_model(case.spec).eval(), a private copy
    x = torch.randn(2, *case.input_shape)
    if variant == "fx":
        model = torch.fx.symbolic_trace(model)
    elif variant == "zc":
        from zoocompiler.passes.analysis import trace

        model = trace(model, x, analyze=False)
    assert variant in ("", "fx", "zc")
    return model.eval(), x


def tiny() -> nn.Module:
    return randomize_norms(tiny_cnn()).eval()


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    """A plain ONNX Runtime session, independent of ``ort_session`` except for the onnxruntime#28392 workaround."""
    session = ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
    )
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def torch_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def assert_dynamic_batch_parity(path, model: nn.Module, shape: tuple[int, ...], rel_tol: float) -> float:
    """ONNX Runtime on batches 1 and 3 equals PyTorch within ``rel_tol * max(1, scale)``; returns the relative error."""
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        ref, got = torch_run(model, x), ort_run(path, x)
        assert got.shape == ref.shape
        assert got.dtype == np.float32
        scale = float(np.abs(ref).max())
        diff = float(np.abs(got - ref).max())
        assert diff <= rel_tol * max(1.0, scale), (batch, diff, scale)
        worst = max(worst, diff / scale)
    return worst


def batch_dims(path) -> tuple[str, str]:
    graph = onnx.load(str(path)).graph
    first_dim = [v.type.tensor_type.shape.dim[0].dim_param for v in (graph.input[0], graph.output[0])]
    return first_dim[0], first_dim[1]


def no_temp_files(directory) -> bool:
    return not any(p.name.endswith(".tmp") for p in directory.iterdir())


# --------------------------------------------------------------------------- real architectures

# Default run: a CNN, a ViT, and a GraphModule from our tracer (~10 s each on 2 cores); the rest is @slow.
FAST_CASES = ["tv_resnet18", "timm_vit_tiny", "timm_convnext_atto+zc"]
FULL_CASES = [
    *ARCH_BY_ID,
    "tv_resnet18+fx",
    "tv_mobilenet_v3_small+fx",
    "timm_convnext_atto+fx",
    "timm_vit_tiny+fx",
    "tv_densenet121+fx",
    "tv_swin_t+fx",
    "timm_convnext_atto+zc",
    "timm_efficientnet_b0+zc",
]
SLOW_CASES = [c for c in FULL_CASES if c not in FAST_CASES]


def check_fp32_export(case_id: str, tmp_path) -> None:
    model, x = build(case_id)
    with torch.no_grad():
        assert float(model(x).abs().max()) > 1e-2, "outputs too small for a meaningful parity test"
    path = tmp_path / "model.onnx"
    report = export_onnx(model, x, path)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert report.exporter == "dynamo" and report.exporter_errors == {}
    assert report.checker == "full"
    assert report.batch_sizes_checked == (2, 3)
    assert report.max_abs_diff <= report.tolerance
    assert report.onnx_nodes == len(proto.graph.node) > 0
    assert report.file_bytes == path.stat().st_size
    assert report.opset == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert report.provider == "CPUExecutionProvider"
    assert all(batch_dims(path)), "batch dimension must be symbolic on input and output"
    assert_dynamic_batch_parity(path, model, tuple(x.shape[1:]), FP32_TOL)
    assert json.loads(json.dumps(report.to_dict()))["path"] == str(path)


def check_fp16_export(case_id: str, tmp_path) -> None:
    model, x = build(case_id)
    path = tmp_path / "model_fp16.onnx"
    report = export_onnx(model, x, path, fp16=True)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert report.fp16 and report.max_abs_diff <= report.tolerance
    io_types = [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)]
    assert io_types == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT], "fp16 export keeps float32 I/O"
    n_params = sum(p.numel() for p in model.parameters())
    fp16_elems = sum(math.prod(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    fp32_elems = sum(math.prod(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert fp16_elems >= 0.99 * n_params and fp32_elems <= 0.01 * n_params, (fp16_elems, fp32_elems, n_params)
    rel = assert_dynamic_batch_parity(path, model, tuple(x.shape[1:]), FP16_TOL)
    assert rel > 1e-6, "an fp16 model cannot match fp32 this closely: compute is not fp16"


@pytest.mark.parametrize("case_id", FAST_CASES)
def test_fp32_export_matches_pytorch(case_id, tmp_path):
    check_fp32_export(case_id, tmp_path)


@pytest.mark.parametrize("case_id", ["tv_resnet18", "timm_vit_tiny"])
def test_fp16_export_within_tolerance(case_id, tmp_path):
    check_fp16_export(case_id, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SLOW_CASES)
def test_fp32_export_full_matrix(case_id, tmp_path):
    check_fp32_export(case_id, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c for c in FULL_CASES if c not in ("tv_resnet18", "timm_vit_tiny")])
def test_fp16_export_full_matrix(case_id, tmp_path):
    check_fp16_export(case_id, tmp_path)


# --------------------------------------------------------------------------- behaviour on small models


class ExportSensitive(nn.Module):
    """Eager output differs from the exported graph's by +0.5: a forced ONNX/PyTorch mismatch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        y = self.linear(x)
        return y + 0.5 if torch.onnx.is_in_onnx_export() else y


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return {"meta": 7}, self.linear(x), x.sum()


def test_forced_mismatch_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(ExportSensitive(), torch.randn(2, 4), path)
    message = str(info.value)
    assert "max |Δ|=0.5" in message
    assert "tolerance 0.0001" in message
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_failed_export_does_not_clobber_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous good export")
    with pytest.raises(ExportError):
        export_onnx(ExportSensitive(), torch.randn(2, 4), path, exporters=("torchscript",))
    assert path.read_bytes() == b"previous good export"
    assert no_temp_files(tmp_path)


def test_every_exporter_failing_names_each(tmp_path, monkeypatch):
    def broken(name):
        def export(*args, **kwargs):
            raise RuntimeError(f"{name} exploded")

        return export

    monkeypatch.setitem(onnx_export_module._EXPORT_FNS, "dynamo", broken("dynamo"))
    monkeypatch.setitem(onnx_export_module._EXPORT_FNS, "torchscript", broken("torchscript"))
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="dynamo: dynamo exploded; torchscript: torchscript exploded"):
        export_onnx(tiny(), torch.randn(2, 3, 16, 16), path)
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exploded")

    monkeypatch.setitem(onnx_export_module._EXPORT_FNS, "dynamo", broken)
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    report = export_onnx(model, x, tmp_path / "m.onnx")
    assert report.exporter == "torchscript"
    assert report.exporter_errors == {"dynamo": "dynamo exploded"}
    assert all(batch_dims(tmp_path / "m.onnx"))
    assert_dynamic_batch_parity(tmp_path / "m.onnx", model, (3, 16, 16), FP32_TOL)


def test_torchscript_exporter_fp16(tmp_path):
    model = tiny()
    report = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", fp16=True, exporters=("torchscript",))
    assert report.exporter == "torchscript" and report.fp16
    assert_dynamic_batch_parity(tmp_path / "m.onnx", model, (3, 16, 16), FP16_TOL)


def test_static_batch_export(tmp_path):
    path = tmp_path / "m.onnx"
    report = export_onnx(tiny(), torch.randn(2, 3, 16, 16), path, dynamic_batch=False)
    assert report.batch_sizes_checked == (2,)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    with pytest.raises(ExportError, match=r"cannot run the model on input \(3, 3, 16, 16\)"):
        onnx_parity(path, tiny(), torch.randn(3, 3, 16, 16))


def test_batch_one_example_still_gives_dynamic_batch(tmp_path):
    model = tiny()
    report = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert report.batch_sizes_checked == (1, 3)
    assert all(batch_dims(tmp_path / "m.onnx"))
    assert_dynamic_batch_parity(tmp_path / "m.onnx", model, (3, 16, 16), FP32_TOL)


def test_torch_export_module_with_static_batch(tmp_path):
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    static = torch.export.export(model, (x,), strict=False).module()
    with pytest.raises(InputShapeError, match=r"rejects input of shape \(3, 3, 16, 16\).*dynamic_batch=False"):
        export_onnx(static, x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    report = export_onnx(static, x, tmp_path / "m.onnx", dynamic_batch=False)
    assert report.batch_sizes_checked == (2,)
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", x), torch_run(model, x), atol=1e-5)


def test_torch_export_module_with_dynamic_batch(tmp_path):
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    dynamic = torch.export.export(model, (x,), strict=False, dynamic_shapes=({0: torch.export.Dim("b")},)).module()
    report = export_onnx(dynamic, x, tmp_path / "m.onnx")
    assert report.exporter == "dynamo"
    assert_dynamic_batch_parity(tmp_path / "m.onnx", model, (3, 16, 16), FP32_TOL)


def test_container_output_exports_first_tensor(tmp_path):
    model = TupleOutput()
    x = torch.randn(2, 4)
    report = export_onnx(model, x, tmp_path / "m.onnx")
    assert report.output_note is not None and "leaf 1" in report.output_note
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert len(graph.output) == 1
    x3 = torch.randn(3, 4)
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", x3), model(x3)[1].detach().numpy(), atol=1e-6)


def test_training_mode_is_restored_and_export_uses_eval(tmp_path):
    model = randomize_norms(tiny_cnn()).train()
    x = torch.randn(2, 3, 16, 16)
    export_onnx(model, x, tmp_path / "m.onnx")
    assert model.training
    model.eval()
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", x), torch_run(model, x), atol=1e-5)


def test_onnx_parity_equals_independent_computation(tmp_path):
    model, path = tiny(), tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 3, 16, 16), path)
    batches = [torch.randn(1, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    expected = max(float(np.abs(ort_run(path, b) - torch_run(model, b)).max()) for b in batches)
    assert onnx_parity(path, model, batches) == pytest.approx(expected, abs=1e-9)
    stats = parity_stats(path.read_bytes(), model, batches)
    scale = max(float(np.abs(torch_run(model, b)).max()) for b in batches)
    assert stats.ref_scale == pytest.approx(scale, rel=1e-6)
    assert stats.rel_diff == pytest.approx(stats.max_abs_diff / scale)


def test_check_false_skips_verification(tmp_path):
    report = export_onnx(ExportSensitive(), torch.randn(2, 4), tmp_path / "m.onnx", check=False)
    assert (tmp_path / "m.onnx").exists()
    assert math.isnan(report.max_abs_diff) and report.batch_sizes_checked == ()


def test_user_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown exporters"):
        export_onnx(tiny(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", exporters=("tflite",))
    with pytest.raises(InputShapeError, match=r"rejects example input of shape \(2, 5\)"):
        export_onnx(tiny(), torch.randn(2, 5), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="onnxruntime-gpu is installed")
def test_missing_cuda_provider_names_the_gpu_extra(tmp_path):
    with pytest.raises(ZooError, match=r"pip install 'zoocompiler\[gpu\]'"):
        export_onnx(tiny(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", providers=["CUDAExecutionProvider"])
    with pytest.raises(ZooError, match="unknown execution provider 'NopeExecutionProvider'"):
        ort_session(b"", providers=["NopeExecutionProvider"])


def test_fp16_transpose_matmul_session_does_not_crash():
    """Regression: ORT's NchwcTransformer segfaulted on Transpose → fp16 MatMul (onnxruntime#28392)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).random((8, 4)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("MatMul", ["t", "w"], ["y"])],
        "transpose_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [5, "B", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert has_fp16(model)
    session = ort_session(model.SerializeToString())
    x = np.random.default_rng(1).random((2, 5, 8)).astype(np.float16)
    expected = np.transpose(x.astype(np.float32), (1, 0, 2)) @ weight.astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0].astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_has_fp16_on_exports(tiny_onnx):
    assert not has_fp16(onnx.load(str(tiny_onnx[0])))
    assert has_fp16(onnx.load(str(tiny_onnx[1])))


# --------------------------------------------------------------------------- latency


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    directory = tmp_path_factory.mktemp("latency")
    fp32, fp16 = directory / "tiny.onnx", directory / "tiny_fp16.onnx"
    export_onnx(tiny(), torch.randn(2, 3, 16, 16), fp32)
    export_onnx(tiny(), torch.randn(2, 3, 16, 16), fp16, fp16=True)
    return fp32, fp16


def test_latency_report_invariants(tiny_onnx):
    report = measure_latency(tiny_onnx[0], (4, 3, 16, 16), runs=15, warmup=2, threads=1)
    assert 0 < report.p10_ms <= report.median_ms <= report.p90_ms
    assert report.mean_ms > 0
    assert (report.runs, report.warmup, report.threads, report.batch) == (15, 2, 1, 4)
    assert report.input_shape == (4, 3, 16, 16) and report.dtype == "float32"
    assert report.provider == "CPUExecutionProvider"
    d = json.loads(json.dumps(report.to_dict()))
    assert d["input_shape"] == [4, 3, 16, 16] and d["runs"] == 15


def test_latency_on_fp16_export_uses_its_float32_inputs(tiny_onnx):
    report = measure_latency(tiny_onnx[1], (1, 3, 16, 16), runs=3, warmup=0)
    assert report.dtype == "float32" and report.batch == 1


def test_session_threading_is_pinned(tiny_onnx):
    session = ort_session(tiny_onnx[0], threads=2)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_latency_user_errors(tiny_onnx):
    with pytest.raises(InputShapeError, match="does not match the model's input"):
        measure_latency(tiny_onnx[0], (1, 3, 32, 32), runs=1)
    with pytest.raises(InputShapeError):
        measure_latency(tiny_onnx[0], (3, 16, 16), runs=1)
    with pytest.raises(ZooError, match="runs >= 1"):
        measure_latency(tiny_onnx[0], (1, 3, 16, 16), runs=0)


# --- tolerance relative to the output's scale; torch's logging captured; full plain-text fallback reasons ------


class _Scaled(nn.Module):
    """A linear map whose outputs are about ``scale``."""

    def __init__(self, scale: float):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_tolerance_is_relative_to_the_output_scale(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = _Scaled(1e-9).eval(), torch.randn(2, 8)
    report = export_onnx(model, x, tmp_path / "tiny.onnx")
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert 1e-11 < scale < 1e-8 and report.tolerance == pytest.approx(FP32_TOL * scale, rel=0.6)
    assert report.max_abs_diff <= report.tolerance
    # a difference of 10% of the outputs (1e-10 on outputs of 1e-9) passed the old bound atol·max(1, |y|); now it fails
    wrong = onnx_export_module.ParityStats(max_abs_diff=1e-10, ref_scale=1e-9, provider="CPUExecutionProvider")
    monkeypatch.setattr(onnx_export_module, "_compare", lambda *a, **k: wrong)
    with pytest.raises(ExportError, match=r"relative 0\.1\) > tolerance 1e-13"):
        export_onnx(model, x, tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()


def test_exporter_logging_never_reaches_the_terminal_and_fallback_reasons_are_plain_and_whole(
    tmp_path, monkeypatch, capfd
):
    import logging

    torch_handler = logging.StreamHandler()  # as torch installs its own handlers, which write to stderr
    onnx_logger = logging.getLogger("torch.onnx._internal.exporter")
    onnx_logger.addHandler(torch_handler)
    frames = "\n".join(f"frame {i}" for i in range(150))
    reason = f"\x1b[1m\x1b[31mFailed to export the model with torch.export.\x1b[0m\nNext steps:\n- see it\n{frames}"

    def failing_dynamo(module, x, opset, dynamic_batch):
        try:
            raise RuntimeError("constraint violation on the batch dimension")
        except RuntimeError:
            onnx_logger.exception("torch.export failed")  # a traceback through torch's own logger
        logging.getLogger("torch").warning("\x1b[33manother torch warning\x1b[0m")
        raise RuntimeError(reason)

    monkeypatch.setitem(onnx_export_module._EXPORT_FNS, "dynamo", failing_dynamo)
    try:
        report = export_onnx(tiny_cnn().eval(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
        assert onnx_logger.handlers == [torch_handler]  # restored after the export
    finally:
        onnx_logger.removeHandler(torch_handler)
    assert capfd.readouterr().err == ""
    assert report.exporter == "torchscript"
    text = report.exporter_errors["dynamo"]
    assert "\x1b" not in text and text.startswith("Failed to export the model with torch.export.\nNext steps:")
    assert text.endswith("frame 149")  # the whole reason, not its first line
    log = "\n".join(report.exporter_log)
    assert "ERROR torch.onnx._internal.exporter: torch.export failed" in log and "Traceback" in log
    assert "WARNING torch: another torch warning" in log
