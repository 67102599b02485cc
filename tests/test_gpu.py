"""GPU checks of issue 17: fp16 models on ONNX Runtime's CUDA execution provider, within the fp16 parity
tolerance, and CUDA rows with numbers in the latency table. Marked ``gpu`` and skipped without a usable CUDA
device (the GPU build of onnxruntime and a device: ``pip install -e '.[gpu]'``); run them with
``pytest -m gpu tests/test_gpu.py``. One test runs everywhere else: asking for the CUDA provider on a
machine without one is a one-line ``ZooError`` that writes nothing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError
from zoocompiler.exports.deploy import export_deployable
from zoocompiler.exports.latency import provider_usable, why_unavailable
from zoocompiler.exports.onnx_export import DEFAULT_ATOL_FP16

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CUDA = "CUDAExecutionProvider"
CUDA_USABLE = provider_usable(CUDA)
needs_cuda = pytest.mark.skipif(not CUDA_USABLE, reason=f"needs a CUDA device: {why_unavailable(CUDA)}")


def small_cnn() -> torch.nn.Module:
    """conv-bn-relu ×2 → pool → linear on 3×32×32, BatchNorm statistics non-trivial."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def small_vit() -> torch.nn.Module:
    """A two-block ViT on 3×32×32 (LayerNorm and softmax: the ops fp16 keeps in fp32)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                             num_classes=10).eval()


MODELS = {"cnn": small_cnn, "vit": small_vit}


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp16_on_cuda_within_parity(tmp_path, name):
    model = MODELS[name]()
    path = tmp_path / "m.onnx"
    report = export_deployable(model, _x(), path, DeployOptions(precision="fp16", provider="cuda", latency_runs=0))
    fp16 = report.chosen
    assert report.precision == "fp16" and fp16.provider == CUDA
    assert fp16.tolerance is not None and fp16.max_abs_diff <= fp16.tolerance
    assert fp16.rel_diff <= DEFAULT_ATOL_FP16
    proto = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O by default
    # the written file runs on CUDA itself and agrees with PyTorch on a fresh batch
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[CUDA])
    assert session.get_providers()[0] == CUDA
    x = _x(5)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= DEFAULT_ATOL_FP16 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.gpu
@needs_cuda
def test_latency_table_has_cuda_numbers(tmp_path):
    options = DeployOptions(precision="fp16", provider="cuda", latency_runs=3, latency_batch=8)
    report = export_deployable(small_cnn(), _x(), tmp_path / "m.onnx", options)
    cuda = {(r["precision"], r["batch"]): r for r in report.latency if r["provider"] == CUDA}
    assert set(cuda) == {("fp32", 1), ("fp32", 8), ("fp16", 1), ("fp16", 8)}
    for row in cuda.values():
        assert row["status"] == "ok" and 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    cpu = [r for r in report.latency if r["provider"] == "CPUExecutionProvider"]
    assert len(cpu) == 4 and all(r["status"] == "ok" for r in cpu)


@pytest.mark.skipif(CUDA_USABLE, reason="checks the error on a machine without a usable CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_without_gpu_is_a_one_line_error_and_writes_nothing(tmp_path, precision):
    path = tmp_path / "out" / "m.onnx"
    path.parent.mkdir()
    with pytest.raises(ZooError) as err:
        export_deployable(small_cnn(), _x(), path, DeployOptions(precision=precision, provider="cuda"))
    text = str(err.value)
    assert "\n" not in text and CUDA in text
    assert "no CUDA device" in text or "pip install" in text  # says why: no device, or no GPU build
    assert list(path.parent.iterdir()) == []
