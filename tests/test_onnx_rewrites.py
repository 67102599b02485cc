"""ONNX rewrites every export applies (exports/onnx_rewrites.py): GroupNorm's affine map becomes one
BatchNormalization with the same function; chains that only look alike are left alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.exports.onnx_rewrites import groupnorm_affine_as_batchnorm


class _Norms(nn.Module):
    """Conv → GroupNorm (random affine) → ReLU → conv1d-shaped GroupNorm on a 3-D view → InstanceNorm2d(affine)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.gn1d = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        for norm in (self.gn, self.gn1d, self.inorm):
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.gn(self.conv(x)))
        z = self.gn1d(y.flatten(2)).view_as(y)
        return self.inorm(z)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_groupnorm_affine_becomes_one_batchnorm_with_the_same_outputs(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = _Norms().eval(), torch.randn(2, 3, 6, 6)
    plain, rewritten = tmp_path / "plain.onnx", tmp_path / "rewritten.onnx"
    export_onnx(model, x, plain, exporters=(exporter,), rewrites=False)
    report = export_onnx(model, x, rewritten, exporters=(exporter,))
    before, after = _ops(plain), _ops(rewritten)
    assert after["BatchNormalization"] - before["BatchNormalization"] == 2  # the two GroupNorms (4-D and 3-D)
    assert (before["Mul"] - after["Mul"], before["Add"] - after["Add"]) == (2, 2)
    assert after["InstanceNormalization"] == before["InstanceNormalization"] == 3  # InstanceNorm2d untouched
    other = torch.randn(5, 3, 6, 6)
    session = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        expected = model(other).numpy()
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert report.max_abs_diff <= 1e-5


def _chain(mul_constant: np.ndarray, *, extra_use: bool = False, with_norm: bool = True) -> onnx.ModelProto:
    """x (1, 4, 2, 2) → [Reshape (1, 2, 8) → InstanceNormalization → Reshape back] → Mul(c) → Add(b) → y."""
    inits = [numpy_helper.from_array(np.array([1, 2, 8], np.int64), "grouped"),
             numpy_helper.from_array(np.array([1, 4, 2, 2], np.int64), "back"),
             numpy_helper.from_array(np.ones(2, np.float32), "ones"),
             numpy_helper.from_array(np.zeros(2, np.float32), "zeros"),
             numpy_helper.from_array(mul_constant.astype(np.float32), "c"),
             numpy_helper.from_array(np.full((4, 1, 1), 0.5, np.float32), "b")]
    nodes = [helper.make_node("Reshape", ["x", "grouped"], ["g"]),
             helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["n"]) if with_norm
             else helper.make_node("Identity", ["g"], ["n"]),
             helper.make_node("Reshape", ["n", "back"], ["r"]),
             helper.make_node("Mul", ["r", "c"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 4, 2, 2]))
        nodes.append(helper.make_node("Identity", ["m"], ["m2"]))
        outputs.append(helper.make_tensor_value_info("m2", TensorProto.FLOAT, [1, 4, 2, 2]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("case", ["per-channel", "full tensor", "second use", "no norm"])
def test_only_groupnorm_affine_chains_are_rewritten(case):
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    per_channel = np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1)
    model = {"per-channel": lambda: _chain(per_channel),
             "full tensor": lambda: _chain(np.arange(16, dtype=np.float32).reshape(4, 2, 2)),
             "second use": lambda: _chain(per_channel, extra_use=True),
             "no norm": lambda: _chain(per_channel, with_norm=False)}[case]()
    expected = _run(model, x)
    count = groupnorm_affine_as_batchnorm(model)
    onnx.checker.check_model(model, full_check=True)
    assert count == (1 if case == "per-channel" else 0)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == count
    for got, want in zip(_run(model, x), expected):
        assert np.allclose(got, want, atol=1e-6)
    if count:
        assert {"c", "b"}.isdisjoint(i.name for i in model.graph.initializer)  # orphaned constants removed
