"""Producer layers: conv, linear and embedding create fresh units and consume their input's units.

The ``*_units`` helpers do the work for modules, functional calls and user rules alike: given the
input node and the parameter names, they record ``conv_in``/``linear_in`` (consumer) and
``conv_out``/``linear_out``/``embedding_out`` (producer) slices and return the output table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .context import Cx, leaf_input
from .coupling import taint_all, unknown
from .names import op_name
from .registry import function_rule, module_rule
from .states import ParamRef, Table
from .tables import project


def simple_param(s: Any, ndim: int) -> str | None:
    """Name of the parameter behind ``s`` when ``s`` is exactly that parameter (no view, no math)."""
    if isinstance(s, ParamRef) and len(s.sources) == 1 and s.sources[0][1] == tuple(range(ndim)):
        return s.sources[0][0]
    return None


def param_names(cx: Cx, args: list[Any], ndims: list[int]) -> list[str | None] | None:
    """Parameter names of functional-layer arguments; None if one is not a plain parameter."""
    out: list[str | None] = []
    for a, nd in zip(args, ndims):
        if a is None:
            out.append(None)
            continue
        name = simple_param(cx.st(a), nd)
        if name is None:
            return None
        out.append(name)
    return out


def is_aten(cx: Cx) -> bool:
    """Whether the node calls an ATen overload (``torch.export`` graphs): argument orders may differ."""
    return isinstance(cx.node.target, torch._ops.OpOverload)


def conv_units(cx: Cx, x: Any, weight: str, bias: str | None, groups: int, c_in: int, c_out: int) -> Table:
    """Conv: out channels are fresh (or follow the input channels for depthwise convs).

    ``x`` is the input node, ``weight``/``bias`` graph-wide parameter names (``bias`` may be None).
    Grouped convs (1 < groups, >1 channel per group) couple input channel i with i + k*C_in/groups
    and output channel o with o + k*C_out/groups: pruning then shrinks every group alike.
    """
    s = cx.st(x)
    in_ids = None
    if isinstance(s, Table):
        if s.dims != (1,):
            cx.store.pin(s.ids, f"{cx.where()} mixes positions along a unit dim")
        else:
            in_ids = s.ids
    cpg, opg = c_in // groups, c_out // groups
    if groups == 1:
        if in_ids is not None:
            cx.store.param(cx.node.name, weight, (1,), in_ids, "conv_in")
        out = cx.store.fresh(c_out)
        roles = "conv_out"
    elif cpg == 1:
        out = np.repeat(in_ids if in_ids is not None else cx.store.fresh(groups), opg)
        roles = "conv_dw"
    else:
        if in_ids is not None:
            row = cx.store.union_along(in_ids.reshape(groups, cpg), (1,))
            cx.store.param(cx.node.name, weight, (1,), row, "conv_in")
        out = np.tile(cx.store.fresh(opg), groups)
        roles = "conv_out"
    cx.store.param(cx.node.name, weight, (0,), out, roles)
    if bias is not None:
        cx.store.param(cx.node.name, bias, (0,), out, roles)
    return Table((1,), out)


def linear_units(cx: Cx, x: Any, weight: str, bias: str | list[tuple[str, int]] | None, out_features: int) -> Table:
    """Linear over the last dim: input features consumed (weight dim 1), output features fresh.

    ``bias`` is a parameter name, or the (name, length) pieces of a bias concatenated from parameters.
    """
    s, a = cx.st(x), cx.shape(x)
    last = len(a) - 1
    if isinstance(s, Table):
        if last in s.dims:
            cx.store.param(cx.node.name, weight, (1,), project(cx.store, s, (last,)), "linear_in")
        if s.dims != (last,):
            cx.store.pin(s.ids, f"{cx.where()} maps a tensor whose units are not only on the last dim")
    elif isinstance(s, ParamRef):
        taint_all(cx, s, f"consumed by {cx.where()}")
    out = cx.store.fresh(out_features)
    cx.store.param(cx.node.name, weight, (0,), out, "linear_out")
    offset = 0
    for name, length in [(bias, out_features)] if isinstance(bias, str) else bias or []:
        cx.store.param(cx.node.name, name, (0,), out[offset : offset + length], "linear_out")
        offset += length
    return Table((len(cx.out_shape) - 1,), out)


def concatenated_params(cx: Cx, a: Any) -> list[tuple[str, int]] | None:
    """The (name, length) pieces of a 1-d tensor ``torch.cat``-ed from plain 1-d parameters or buffers
    (BEiT/EVA's ``cat((q_bias, k_bias, v_bias))``), else None."""
    if not isinstance(a, fx.Node) or a.op not in ("call_function", "call_method") or op_name(a) != "cat":
        return None
    pieces = a.args[0] if a.args else a.kwargs.get("tensors")
    dim = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim", 0)
    if dim not in (0, -1) or not isinstance(pieces, (list, tuple)):
        return None
    names = [simple_param(cx.st(p), 1) for p in pieces]
    if any(n is None for n in names):
        return None
    return [(n, cx.shape(p)[0]) for n, p in zip(names, pieces)]


def embedding_units(cx: Cx, idx: Any, weight: str, dim: int) -> Table:
    """Embedding: the last dim is fresh (weight dim 1); unit values used as indices are pinned."""
    s = cx.st(idx)
    if isinstance(s, Table):
        cx.store.pin(s.ids, f"{cx.where()} uses unit values as indices")
    out = cx.store.fresh(dim)
    cx.store.param(cx.node.name, weight, (1,), out, "embedding_out")
    return Table((len(cx.out_shape) - 1,), out)


@module_rule(nn.modules.conv._ConvNd)
def conv_module(cx: Cx, m: nn.modules.conv._ConvNd) -> Any:
    if m.transposed:
        return unknown(cx, f"{cx.where()} is a transposed convolution (not supported)")
    weight, bias = f"{cx.node.target}.weight", cx.param_name("bias")
    return conv_units(cx, leaf_input(cx), weight, bias, m.groups, m.in_channels, m.out_channels)


@module_rule(nn.Linear)
def linear_module(cx: Cx, m: nn.Linear) -> Any:
    return linear_units(cx, leaf_input(cx), f"{cx.node.target}.weight", cx.param_name("bias"), m.out_features)


@module_rule(nn.Embedding)
def embedding_module(cx: Cx, m: nn.Embedding) -> Any:
    return embedding_units(cx, leaf_input(cx), f"{cx.node.target}.weight", m.embedding_dim)


@function_rule("linear")
def rule_linear_fn(cx: Cx) -> Any:
    x, w, b = cx.arg(0, "input"), cx.arg(1, "weight"), cx.arg(2, "bias")
    pieces = concatenated_params(cx, b)
    names = param_names(cx, [w, None if pieces else b], [2, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses a weight or bias that is not a plain parameter")
    return linear_units(cx, x, names[0], pieces or names[1], cx.shape(w)[0])


@function_rule("conv1d", "conv2d", "conv3d", "convolution")
def rule_conv_fn(cx: Cx) -> Any:
    x, w, b = cx.arg(0, "input"), cx.arg(1, "weight"), cx.arg(2, "bias")
    if cx.op == "convolution":
        if cx.val(cx.arg(6, "transposed")):
            return unknown(cx, f"{cx.where()} is a transposed convolution")
        groups = int(cx.val(cx.arg(8, "groups", 1)))
    else:
        groups = int(cx.val(cx.arg(6, "groups", 1)))
    wshape = cx.shape(w)
    names = param_names(cx, [w, b], [len(wshape), 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses a weight that is not a plain parameter")
    return conv_units(cx, x, names[0], names[1], groups, cx.shape(x)[1], wshape[0])


@function_rule("embedding")
def rule_embedding_fn(cx: Cx) -> Any:
    w = cx.arg(1, "weight")
    name = simple_param(cx.st(w), 2)
    if name is None or is_aten(cx):
        return unknown(cx)
    return embedding_units(cx, cx.arg(0, "input"), name, cx.shape(w)[1])
