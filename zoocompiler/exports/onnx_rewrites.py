"""ONNX graph rewrites that every export applies before it is verified (so the parity check covers them).

**GroupNorm's affine map as one BatchNormalization.** Both torch exporters write an affine ``nn.GroupNorm`` as
Reshape → InstanceNormalization → Reshape → Mul(γ) → Add(β): the statistics per group, then the per-channel
affine map as two more passes over the activation. :func:`groupnorm_affine_as_batchnorm` replaces each such
Mul + Add by one inference ``BatchNormalization`` (scale γ, bias β, mean 0, variance 1, epsilon 0), which ONNX
Runtime runs in one pass and in its blocked NCHWc layout. GroupNorm's statistics depend on the input, so they
cannot fold into the convolution as BatchNorm's do; ONNX Runtime (1.32) has no CPU kernel for opset-18/21
``GroupNormalization`` and expands it into about ten elementwise ops (measured slower: docs/slice.md).
Hand-written: no maintained ONNX optimizer (onnxscript's, onnxsim, ORT's own fusions) performs this rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Value name → array, for initializers and Constant nodes with a tensor ``value``."""
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _per_channel(value: np.ndarray | None, rank: int | None) -> np.ndarray | None:
    """``value`` as a vector over dim 1 of a rank-``rank`` activation when it broadcasts that way ((C, 1, ...) or
    (1, C, 1, ...)), else None."""
    if value is None or rank is None or value.ndim not in (rank - 1, rank) or value.size < 1:
        return None
    shape = value.shape[1:] if value.ndim == rank else value.shape
    if (value.ndim == rank and value.shape[0] != 1) or any(d != 1 for d in shape[1:]):
        return None
    return value.reshape(-1)


def groupnorm_affine_as_batchnorm(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every InstanceNormalization → Reshape → Mul(per-channel constant) → Add(per-channel
    constant) chain's Mul + Add into one BatchNormalization with the same function; returns how many. The Mul's
    output must feed only the Add, and the activation's rank must be known (ONNX shape inference)."""
    graph = model.graph
    if not any(node.op_type == "InstanceNormalization" for node in graph.node):
        return 0
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.value_info, *inferred.input)
             if v.type.tensor_type.HasField("shape")}
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    replaced: dict[int, onnx.NodeProto] = {}  # id(Mul) → its BatchNormalization
    dropped: set[int] = set()
    for add in graph.node:
        mul = producer.get(add.input[0]) if add.op_type == "Add" and len(add.input) == 2 else None
        if mul is None or mul.op_type != "Mul" or uses.get(mul.output[0]) != 1 or id(mul) in replaced:
            continue
        reshape = producer.get(mul.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            continue
        if (norm := producer.get(reshape.input[0])) is None or norm.op_type != "InstanceNormalization":
            continue
        rank = ranks.get(mul.input[0])
        scale, bias = _per_channel(constants.get(mul.input[1]), rank), _per_channel(constants.get(add.input[1]), rank)
        if scale is None or bias is None or scale.shape != bias.shape or scale.dtype != bias.dtype:
            continue
        names = [f"{mul.output[0]}_bn_{part}" for part in ("scale", "bias", "mean", "var")]
        graph.initializer.extend(numpy_helper.from_array(v, n) for v, n in zip(
            (scale, bias, np.zeros_like(scale), np.ones_like(scale)), names))
        replaced[id(mul)] = helper.make_node("BatchNormalization", [mul.input[0], *names], [add.output[0]],
                                             name=f"{add.name or add.output[0]}_groupnorm_affine", epsilon=0.0)
        dropped.add(id(add))
    if replaced:
        nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        orphans = [i for i in graph.initializer if i.name not in used]
        for init in orphans:
            graph.initializer.remove(init)
    return len(replaced)
