"""Cut-point activations for representation similarity: which cut points a reassembly uses, their values
on a batch of data, and per-sample feature matrices pooled from them.

A model's *assembly positions* are cut point 0 (the input) and every later cut point with a stitchable
layout up to its *features* position, the last stitchable cut point before the classifier (whose output is
replaced by a new head). Values are recorded with a ``torch.fx.Interpreter`` that stops once every
requested node has run, so the classifier is never evaluated when only the features are asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from zoocompiler.core.errors import PassError, ZooError
from zoocompiler.core.modules import eval_mode
from zoocompiler.ir import Layout, TensorInfo, graph_info

from .cut_points import CutPoint, cut_point_table

STITCHABLE = (Layout.MAP, Layout.MAP_NHWC, Layout.TOKENS, Layout.FLAT)
POOL_MODES = ("auto", "mean", "flatten")
AUTO_MAX_FEATURES = 16384  # "auto": per-sample feature size up to which a value is flattened, not pooled


def _head_cut(table: list[CutPoint]) -> int:
    """Index of the classifier output: the earliest cut point after which no cut adds params or MACs.

    Trailing parameter-free ops after the classifier (timm's ``head.flatten`` Identity, dropout) are thus
    part of the head; a model with no costed ops at all falls back to its final cut point.
    """
    last = table[-1]
    for row in table[1:]:
        if row.cum_params == last.cum_params and row.cum_macs == last.cum_macs:
            return row.index
    return last.index


def assembly_positions(gm: fx.GraphModule) -> list[CutPoint]:
    """The model's reassembly positions 0..L: the input, then every stitchable cut point before the head.

    Position L (the *features*) is the last stitchable cut point strictly before the classifier output
    (see ``_head_cut``). Needs the analysis passes (``zoocompiler.trace`` runs them). Raises
    ``PassError`` when fewer than two positions remain.
    """
    if not graph_info(gm).cut_points:
        raise PassError("graph has no cut points", "trace it with zoocompiler.trace (or run run_analysis(gm))")
    table = cut_point_table(gm)
    head = _head_cut(table)
    positions = [table[0]]
    positions += [row for row in table[1:head] if row.tensor is not None and row.tensor.layout in STITCHABLE]
    if len(positions) < 2:
        raise PassError(
            f"model has {len(positions)} reassembly position(s) (input + stitchable cut points before the head)",
            "use a model with at least one map/tokens/flat cut point before its classifier",
        )
    return positions


class _AllRecorded(Exception):
    """Raised inside the interpreter once every requested value is recorded (stops the forward early)."""


class _RecordingInterpreter(fx.Interpreter):
    """Runs a GraphModule and keeps copies of the values of ``wanted`` nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.recorded: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        if n.name in self.wanted:
            if not isinstance(result, torch.Tensor):
                raise PassError(f"node '{n.name}' yields {type(result).__name__}, not a tensor", "record cut points")
            # Clone: a later in-place op (ReLU(inplace=True)) would otherwise overwrite the recorded value.
            self.recorded[n.name] = result.detach().to(torch.float32, copy=True)
            if len(self.recorded) == len(self.wanted):
                raise _AllRecorded
        return result


@torch.no_grad()
def cut_point_activations(
    gm: fx.GraphModule, x: torch.Tensor, nodes: Sequence[str], *, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Values of the named nodes on ``x`` (run in eval mode, ``batch_size`` samples at a time).

    Returns ``{name: float32 tensor}`` with the full batch dimension of ``x``. The module's train/eval
    flags are restored afterwards. An unknown node name raises ``PassError``.
    """
    known = {n.name for n in gm.graph.nodes}
    unknown = [name for name in nodes if name not in known]
    if unknown:
        raise PassError(f"no node named {unknown[0]!r} in the graph", "pick names from graph_info(gm).cut_points")
    if batch_size < 1:
        raise PassError(f"batch_size must be positive, got {batch_size}", "pass batch_size >= 1")
    wanted = set(nodes)
    if not wanted:
        return {}
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    with eval_mode(gm):
        for batch in torch.split(x, batch_size):
            interpreter = _RecordingInterpreter(gm, wanted)
            try:
                interpreter.run(batch.clone())  # clone: an in-place first op must not edit the caller's data
            except _AllRecorded:
                pass
            for name in wanted:
                chunks[name].append(interpreter.recorded[name])
    return {name: torch.cat(chunks[name]) for name in nodes}


def pooled_features(t: torch.Tensor, info: TensorInfo, mode: str = "mean") -> torch.Tensor:
    """Per-sample feature matrix (N, D) in float64 for a value of layout ``info.layout``.

    ``mode="mean"``: maps (NCHW / NHWC) are averaged over their spatial dims, tokens over all tokens
    (prefix tokens included), flat values are kept. ``mode="flatten"``: every sample is flattened.
    ``mode="auto"``: flattened while a sample has at most ``AUTO_MAX_FEATURES`` values (small inputs keep
    their spatial layout, so early positions stay distinguishable); larger maps are average-pooled to the
    finest g×g grid that fits (then flattened), larger token sequences are averaged.
    Unknown modes raise ``ZooError``; non-stitchable layouts raise ``PassError``.
    """
    if mode not in POOL_MODES:
        raise ZooError(f"unknown pooling mode {mode!r}", f"use one of: {', '.join(POOL_MODES)}")
    if info.layout not in STITCHABLE:
        raise PassError(f"cannot pool a value of layout {info.layout!r}", f"pool {', '.join(STITCHABLE)} values")
    expected_ndim = {Layout.MAP: 4, Layout.MAP_NHWC: 4, Layout.TOKENS: 3, Layout.FLAT: 2}[info.layout]
    if t.dim() != expected_ndim:
        raise PassError(
            f"{info.layout} value has {t.dim()} dims, expected {expected_ndim}", "pass the TensorInfo of this value"
        )
    t = t.detach().to(torch.float64)
    if mode == "auto":
        if t[0].numel() <= AUTO_MAX_FEATURES or info.layout == Layout.FLAT:
            return t.reshape(t.shape[0], -1)
        if info.layout in (Layout.MAP, Layout.MAP_NHWC):
            nchw = t if info.layout == Layout.MAP else t.permute(0, 3, 1, 2)
            grid = max(1, int((AUTO_MAX_FEATURES / nchw.shape[1]) ** 0.5))
            return torch.nn.functional.adaptive_avg_pool2d(nchw, grid).reshape(t.shape[0], -1)
        return t.mean(dim=1)
    if mode == "flatten":
        return t.reshape(t.shape[0], -1)
    if info.layout == Layout.MAP:
        return t.mean(dim=(2, 3))
    if info.layout == Layout.MAP_NHWC:
        return t.mean(dim=(1, 2))
    if info.layout == Layout.TOKENS:
        return t.mean(dim=1)
    return t
