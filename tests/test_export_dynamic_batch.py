"""Dynamic batch through the dynamo exporter (issue 16, item 4): models pruned by zoocompiler and exported from a
one-row example (``zoocompile prune``'s default ``--batch 1``) go through ``torch.export`` with a symbolic batch,
no TorchScript fallback, and match PyTorch at two batch sizes.

``torch.export`` specialises a dimension whose example size is 1; before the exporter traced with two rows, ConvNeXt,
EdgeNeXt and Swin v2 failed ("Invalid ranges [2:1]") and PiT/XCiT/CoaT/PVT/Twins came back with the batch fixed
at 1 (torch.onnx retries with the size torch.export suggests), which the batch-3 parity check then rejected.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import zoocompiler
from zoocompiler.core.errors import ExportError
from zoocompiler.exports import export_onnx
from zoocompiler.exports import onnx_export as onnx_export_module
from zoocompiler.passes.analysis.plans import plan_by_importance
from zoocompiler.passes.rewrite.prune import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32_TOL = 1e-4


class TokenMapConv(nn.Module):
    """The PiT/XCiT pattern that makes batch 1 special: patch tokens sliced after a class token, transposed and
    reshaped back to a map (at batch 1 that view happens to be channels-last), then a depthwise conv, whose
    backend choice ``torch.export`` guards on the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pool = nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=8)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = tokens.shape
        tokens = torch.cat((self.cls.expand(b, -1, -1), tokens), dim=1)[:, 1:]
        side = int(n**0.5)
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        return self.head(self.pool(grid).mean((2, 3)))


class IntBatch(nn.Module):
    """A model that makes its batch size a constant (``int()`` of a shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(int(x.shape[0]), 48))


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_dynamo_with_dynamic_batch(report, path, model: nn.Module, shape: tuple[int, ...]) -> None:
    """Exported by dynamo with nothing tried before it, batch symbolic on input and output, and ONNX Runtime
    equal to PyTorch (relative to the output's scale) at batch 1 and batch 3, recomputed here."""
    assert report.exporter == "dynamo" and report.exporter_errors == {}, report.exporter_errors
    graph = onnx.load(str(path)).graph
    assert all(v.type.tensor_type.shape.dim[0].dim_param for v in (graph.input[0], graph.output[0]))
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = model(x).numpy()
        got = ort_run(path, x)
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= FP32_TOL * float(np.abs(ref).max()), batch


def test_one_row_example_is_traced_with_two_rows():
    x = torch.randn(1, 3, 4, 4)
    traced = onnx_export_module._trace_example(x, dynamic_batch=True)
    assert traced.shape == (2, 3, 4, 4) and torch.equal(traced[0], x[0]) and torch.equal(traced[1], x[0])
    assert onnx_export_module._trace_example(x, dynamic_batch=False) is x
    two = torch.randn(2, 3)
    assert onnx_export_module._trace_example(two, dynamic_batch=True) is two


def test_batch_one_special_model_exports_through_dynamo_from_a_one_row_example(tmp_path):
    model, path = TokenMapConv().eval(), tmp_path / "m.onnx"
    report = export_onnx(model, torch.randn(1, 3, 14, 14), path)
    assert report.batch_sizes_checked == (1, 3)
    assert_dynamo_with_dynamic_batch(report, path, model, (3, 14, 14))


def test_batch_fixed_by_torch_export_is_a_failure_with_its_reason(tmp_path, capfd):
    with pytest.raises(ExportError, match=r"dynamo: torch\.export specialised the batch dimension: the ONNX input "
                       r"has a fixed batch of 2 \(.*int\(\) of a shape"):
        export_onnx(IntBatch().eval(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", exporters=("dynamo",))
    report = export_onnx(IntBatch().eval(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", dynamic_batch=False)
    assert report.exporter == "dynamo"
    assert capfd.readouterr().err == ""  # ONNX Runtime's own error log of the failing run stays quiet too


class _WarnsWhileTraced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # as the TorchScript tracer's own TracerWarnings
            warnings.warn("a warning raised while exporting", UserWarning, stacklevel=1)
        return self.fc(x)


def test_python_warnings_while_exporting_go_to_the_report(tmp_path, capfd):
    shown = warnings.showwarning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = export_onnx(_WarnsWhileTraced().eval(), torch.randn(2, 6), tmp_path / "m.onnx",
                             exporters=("torchscript",))
    assert seen == [] and capfd.readouterr().err == ""
    assert warnings.showwarning is shown
    assert any(line.startswith("WARNING py.warnings: UserWarning: a warning raised while exporting")
               for line in report.exporter_log)


def pruned_half(spec: str, x: torch.Tensor) -> nn.Module:
    """``zoocompile prune --ratio 0.5``'s module: traced, an L1 plan over groups, pruned physically."""
    gm = zoocompiler.trace(zoocompiler.load_model(spec).eval(), x)
    return prune(gm, plan_by_importance(gm, 0.5, importance="l1", scope="group")).module.eval()


def check_pruned(spec: str, side: int, tmp_path) -> None:
    x = torch.randn(1, 3, side, side)
    model, path = pruned_half(spec, x), tmp_path / "m.onnx"
    report = export_onnx(model, x, path)
    assert report.batch_sizes_checked == (1, 3) and report.max_abs_diff <= report.tolerance
    assert_dynamo_with_dynamic_batch(report, path, model, (3, side, side))


def test_pruned_convnext_exports_through_dynamo_from_a_one_row_example(tmp_path):
    check_pruned("timm:convnext_atto,num_classes=10", 32, tmp_path)


def test_pruned_beit_exports_through_dynamo(tmp_path):
    # torch.onnx failed to decompose BEiT's attention ("Cannot view a tensor with shape [B, 5, 12, 64]") at any batch
    check_pruned("timm:beit_base_patch16_224,num_classes=10,img_size=32,depth=2", 32, tmp_path)


# the families that fell back to TorchScript in issue 16 (smallest variants, small inputs): 10–60 s each on 2 cores
SLOW_FAMILIES = {
    "edgenext": ("timm:edgenext_xx_small,num_classes=10", 64),
    "pit": ("timm:pit_ti_224,num_classes=10,img_size=64", 64),
    "xcit": ("timm:xcit_nano_12_p16_224,num_classes=10,img_size=64", 64),
    "pvt_v2": ("timm:pvt_v2_b0,num_classes=10", 64),
    "coat": ("timm:coat_lite_tiny,num_classes=10,img_size=64", 64),
    "twins": ("timm:twins_pcpvt_small,num_classes=10", 64),
    "levit": ("timm:levit_128s,num_classes=10", 224),
    "swinv2": ("timm:swinv2_cr_tiny_ns_224,num_classes=10,img_size=64,window_size=4", 64),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SLOW_FAMILIES))
def test_pruned_family_exports_through_dynamo_from_a_one_row_example(family, tmp_path):
    spec, side = SLOW_FAMILIES[family]
    check_pruned(spec, side, tmp_path)
