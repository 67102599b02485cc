"""Element-wise ops: identities and casts carry units, pointwise ops couple operands, activations carry.

Every op ATen tags ``pointwise`` is element-wise (:func:`is_pointwise`), so no hand list of
element-wise ops is kept; constructors (zeros, arange, ...) produce values without units.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .context import Cx, leaf_input
from .coupling import check_shape_scalars, couple, merge_shape_deps, unknown_module
from .registry import function_fallback, function_rule, module_rule
from .states import TensorSpec

POINTWISE_EXTRA = {"hardswish", "floor_divide"}  # element-wise ops ATen does not tag pointwise


@function_rule(
    "contiguous", "clone", "detach", "to", "type", "float", "half", "double", "bfloat16", "type_as", "_to_copy",
    "alias", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "native_dropout", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like", "requires_grad", "cpu", "cuda", "lift_fresh_copy", "positive",
)
def rule_identity(cx: Cx) -> Any:
    """Casts, copies, dropout, ``*_like``: the result has the first operand's units."""
    return cx.st(cx.this())


@functools.cache
def is_pointwise(name: str) -> bool:
    """Whether ATen tags ``name`` as a pointwise (broadcasting element-wise) op."""
    if name in POINTWISE_EXTRA:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


@function_fallback(is_pointwise)
def rule_pointwise(cx: Cx) -> Any:
    """Broadcasting element-wise op: operand elements at the same output position are united."""
    nodes: list[fx.Node] = []
    fx.node.map_arg((cx.node.args, cx.node.kwargs), nodes.append)
    if not isinstance(cx.out, TensorSpec):  # arithmetic on Python values (shapes): track what it reads
        return merge_shape_deps([cx.st(a) for a in nodes])
    check_shape_scalars(cx)
    operands = [(cx.st(a), cx.shape(a), a.name) for a in dict.fromkeys(nodes) if cx.shape(a) is not None]
    return couple(cx, operands, cx.out_shape)


@function_rule(
    "_assert", "zeros", "ones", "full", "empty", "arange", "new_zeros", "new_ones", "new_full", "new_empty",
    "rand", "randn", "tensor", "as_tensor", "linspace", "eye", "scalar_tensor",
)
def rule_no_units(cx: Cx) -> Any:
    """Ops whose result carries no units and does not depend on unit values (masks, metadata)."""
    return None


# ----------------------------------------------------------------------------- activation modules

_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention, nn.GLU)


def is_param_free_activation(m: nn.Module) -> bool:
    """An identity, dropout or parameter-free ``torch.nn`` activation (exactly its class, not a subclass)."""
    if any(True for _ in m.parameters()):
        return False
    mod = type(m).__module__
    if isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    return mod == "torch.nn.modules.activation" and not isinstance(m, _NOT_ELEMENTWISE)


def _torch_activation_classes() -> list[type]:
    mod = nn.modules.activation
    return [
        c
        for c in vars(mod).values()
        if isinstance(c, type) and c.__module__ == mod.__name__ and issubclass(c, nn.Module)
        if not issubclass(c, _NOT_ELEMENTWISE)
    ]


def _activation(cx: Cx, m: nn.Module) -> Any:
    if not is_param_free_activation(m):  # PReLU, or an Identity / dropout subclass with parameters
        return unknown_module(cx)
    check_shape_scalars(cx)
    return cx.st(leaf_input(cx))


module_rule(*_torch_activation_classes(), exact=True)(_activation)
module_rule(nn.Identity, nn.modules.dropout._DropoutNd)(_activation)
