"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): a hidden unit is one unit of every layer.

``nn.RNNBase`` has a single ``hidden_size`` for all its layers and directions, so hidden unit ``j``
is one unit of the whole module: it spans row ``g*H + j`` of every gate block ``g`` (LSTM i,f,g,o;
GRU r,z,n; RNN one) of ``weight_ih_l{k}``, ``weight_hh_l{k}`` and both biases (``linear_out``),
column ``j`` of ``weight_hh_l{k}`` and column ``j`` (``H + j`` for the backward direction) of
``weight_ih_l{k+1}`` (``linear_in``), feature ``j`` (and ``H + j``) of the output and feature ``j`` of
``h_n``/``c_n``. Layer 0 consumes the input's last-dim units (``linear_in`` columns of
``weight_ih_l0``). With ``proj_size`` P the projected units are a second group: rows of
``weight_hr_l{k}`` (``linear_out``), the columns the projected state feeds, the output and ``h_n``;
the cell units keep the gate rows, ``c_n`` and the columns of ``weight_hr_l{k}``.

Zeroing a unit's gate rows and biases gives exactly ``h_j = 0`` at every step from a zero initial
state (LSTM: ``g = tanh(0) = 0`` keeps ``c_j = 0``; GRU: ``n = tanh(0) = 0`` and ``h_j = ½ h_j``;
RNN: ``tanh(0) = relu(0) = 0``), so pruned == masked. An explicit initial state is not followed
(fails closed).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn

from .context import Cx, RuleFailure, leaf_input
from .coupling import taint_all
from .registry import module_rule
from .states import ParamRef, Table, TensorSpec
from .tables import project

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _is_getitem(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem


def _pair_used_whole(cx: Cx) -> bool:
    """Whether an LSTM's ``(h_n, c_n)`` pair reaches anything but indexing (e.g. the model output)."""
    pairs = [u for u in cx.node.users if _is_getitem(u) and cx.val(u.args[1]) in (1, -1)]
    return any(not _is_getitem(w) for p in pairs for w in p.users)


def _gate_rows(ids: np.ndarray, gates: int) -> np.ndarray:
    """Ids of the rows of a gate-stacked weight: unit ``j`` at ``g*H + j`` for every gate ``g``."""
    return np.tile(ids, gates)


@module_rule(nn.RNNBase)
def recurrent_module(cx: Cx, m: nn.RNNBase) -> Any:
    """Units of an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` leaf; the state mirrors its nested outputs."""
    if len(cx.node.args) > 1 or cx.node.kwargs:
        raise RuleFailure(f"{cx.where()} passes an explicit initial state (units of h0/c0 are not followed)")
    gates = GATES.get(m.mode)
    out = cx.out
    if gates is None or not isinstance(out, list) or not isinstance(out[0], TensorSpec):
        raise RuleFailure(f"{cx.where()}: unsupported recurrent mode or input (PackedSequence?)")
    x = leaf_input(cx)
    dirs = 2 if m.bidirectional else 1
    sfx = ["", "_reverse"][:dirs]
    cell = cx.store.fresh(m.hidden_size)
    proj = cx.store.fresh(m.proj_size) if m.proj_size > 0 else cell
    name = cx.node.target
    s, sh = cx.st(x), cx.shape(x)
    if isinstance(s, Table):
        last = len(sh) - 1
        if last in s.dims:
            ids = project(cx.store, s, (last,))
            for d in sfx:
                cx.store.param(cx.node.name, f"{name}.weight_ih_l0{d}", (1,), ids, "linear_in")
        if s.dims != (last,):
            cx.store.pin(s.ids, f"{cx.where()} reads a tensor whose units are not only on the last dim")
    elif isinstance(s, ParamRef):
        taint_all(cx, s, f"consumed by {cx.where()}")
    rows = _gate_rows(cell, gates)
    for k in range(m.num_layers):
        for d in sfx:
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if p.startswith("weight") or m.bias:
                    cx.store.param(cx.node.name, f"{name}.{p}_l{k}{d}", (0,), rows, "linear_out")
            cx.store.param(cx.node.name, f"{name}.weight_hh_l{k}{d}", (1,), proj, "linear_in")
            if k > 0:
                cx.store.param(cx.node.name, f"{name}.weight_ih_l{k}{d}", (1,), np.tile(proj, dirs), "linear_in")
            if m.proj_size > 0:
                cx.store.param(cx.node.name, f"{name}.weight_hr_l{k}{d}", (0,), proj, "linear_out")
                cx.store.param(cx.node.name, f"{name}.weight_hr_l{k}{d}", (1,), cell, "linear_in")
    y = Table((len(out[0].shape) - 1,), np.tile(proj, dirs))
    if isinstance(out[1], list):  # LSTM: (h_n, c_n)
        if _pair_used_whole(cx):  # pins and unknown ops look one list level deep only
            cx.store.pin(np.concatenate([cell, proj]), f"{cx.where()}: its (h_n, c_n) pair is used as a whole")
        return [y, [Table((len(spec.shape) - 1,), ids) for spec, ids in zip(out[1], (proj, cell))]]
    return [y, Table((len(out[1].shape) - 1,), proj)]
