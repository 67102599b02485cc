"""The annotated IR: a ``torch.fx.GraphModule`` whose nodes carry zoocompiler metadata.

Every analysis result lives under one key, ``META_KEY``, as small dataclasses:

* ``node.meta["zc"]`` is a :class:`NodeInfo` (tensor shape/dtype/layout, cost, cut index,
  unit-group ids of the node's unit dimension);
* ``gm.meta["zc"]`` is a :class:`GraphInfo` (example input, cut points, unit groups).

Passes write only their own fields, so running a pass twice gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

META_KEY = "zc"


class Layout:
    """Names of the value layouts the analysis distinguishes."""

    MAP = "map"  # feature map N×C×H×W
    MAP_NHWC = "map_nhwc"  # channels-last feature map N×H×W×C (e.g. Swin)
    TOKENS = "tokens"  # B×N×D, possibly with prefix (class / distillation) tokens
    FLAT = "flat"  # B×D
    OTHER = "other"  # any other tensor (attention scores, 5-d head tensors, ...)
    SHAPE = "shape"  # a non-tensor value derived from shapes (x.shape, size(), numel)
    CONST = "const"  # a non-tensor value that does not depend on any tensor

    CHANNEL_DIM = {MAP: 1, MAP_NHWC: 3, TOKENS: 2, FLAT: 1}


@dataclass
class TensorInfo:
    """Shape, dtype and layout of one tensor value (batch dimension first)."""

    shape: tuple[int, ...]
    dtype: str
    layout: str
    prefix_tokens: int = 0  # tokens layout: leading class/distillation tokens
    grid: tuple[int, int] | None = None  # tokens layout: spatial grid of the patch tokens

    @property
    def channel_dim(self) -> int | None:
        return Layout.CHANNEL_DIM.get(self.layout)

    @property
    def channels(self) -> int | None:
        d = self.channel_dim
        return None if d is None else self.shape[d]

    def describe(self) -> str:
        extra = ""
        if self.layout == Layout.TOKENS:
            extra = f" (+{self.prefix_tokens} prefix)" if self.prefix_tokens else ""
        return f"{self.layout}{list(self.shape)}{extra}"


@dataclass
class Cost:
    """Cost of one node: parameters it owns, MACs (FLOPs = 2×MACs), output activation bytes."""

    params: int = 0
    macs: int = 0
    act_bytes: int = 0

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs, self.act_bytes + other.act_bytes)


@dataclass
class NodeInfo:
    """Per-node annotations. ``None`` means the producing pass has not run."""

    tensor: TensorInfo | None = None
    value_kind: str | None = None  # "tensor", Layout.SHAPE, Layout.CONST, "param", "other"
    cost: Cost | None = None
    cut_index: int | None = None  # position among the cut points, None if not a cut point
    shape_value: Any = None  # shape/const nodes: the concrete value at the example batch size
    shape_value_alt_batch: Any = None  # ... and at the example batch size + 1
    unit_dim: int | None = None  # tensor dim whose indices are units (channels/features/heads)
    unit_groups: list[int] | None = None  # group id per index of ``unit_dim``


@dataclass
class UnitMember:
    """Where a unit group lives in one value or parameter: ``indices[u]`` are the positions of unit ``u``
    along ``dim`` (of the node's value, or of parameter ``param`` when it is set).

    ``role``: "value" for node values; for parameter slices "conv_out", "conv_dw", "linear_out", "norm",
    "embedding_out", "param" (producer side: zero them to zero the unit) or "conv_in", "linear_in"
    (consumer side). See docs/unit_groups.md.
    """

    node: str
    dim: int
    indices: list[list[int]]
    role: str = "value"
    param: str | None = None  # qualified parameter/buffer name (e.g. "layer1.0.conv1.weight"), None for values

    def span(self) -> tuple[int, int]:
        flat = [i for idx in self.indices for i in idx]
        return (min(flat), max(flat) + 1)


@dataclass
class UnitGroup:
    """A set of coupled dimensions that must be pruned together.

    ``size`` units; ``members`` says where each unit sits in every value and parameter it touches;
    ``divisible_by`` lists constraints on the number of kept units (the unit-group pass leaves it
    empty: grouped convs, GroupNorm groups and heads are encoded in ``indices``, so any subset of
    units may be kept); ``pinned`` groups are not prunable, ``reasons`` say why.
    ``kind``: "channel" (feature maps), "feature" (tokens / flat vectors) or "head" (attention heads).
    ``approx``: None when pruning equals masking exactly; ``"layernorm"`` for a residual stream made
    prunable by ``layernorm_streams="prune"`` (its LayerNorms then normalise over the kept units).
    """

    gid: int
    size: int
    kind: str = "channel"  # "channel", "feature", "head"
    members: list[UnitMember] = field(default_factory=list)
    divisible_by: list[int] = field(default_factory=list)
    pinned: bool = False
    reasons: list[str] = field(default_factory=list)
    approx: str | None = None

    @property
    def prunable(self) -> bool:
        return not self.pinned

    def pin(self, reason: str) -> None:
        self.pinned = True
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclass
class GraphInfo:
    """Graph-level annotations stored in ``gm.meta["zc"]``."""

    example_input: torch.Tensor | None = None
    tracer: str = ""  # which tracer produced the graph
    cut_points: list[str] = field(default_factory=list)  # node names, input→output order
    unit_groups: list[UnitGroup] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def node_info(node: fx.Node) -> NodeInfo:
    """The node's annotation record, created empty on first access."""
    info = node.meta.get(META_KEY)
    if info is None:
        info = node.meta[META_KEY] = NodeInfo()
    return info


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    """The graph's annotation record, created empty on first access."""
    meta = gm.meta
    info = meta.get(META_KEY)
    if info is None:
        info = meta[META_KEY] = GraphInfo()
    return info


def input_node(gm: fx.GraphModule) -> fx.Node:
    """The single placeholder of a zoocompiler graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        from .core.errors import PassError

        raise PassError(
            f"graph has {len(placeholders)} inputs", "zoocompiler handles single-input models; wrap the model"
        )
    return placeholders[0]


def output_value(gm: fx.GraphModule) -> fx.Node:
    """The tensor node the model returns (first tensor if the output is a tuple/dict)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    nodes: list[fx.Node] = []
    fx.node.map_arg(out.args[0], nodes.append)
    if not nodes:
        from .core.errors import PassError

        raise PassError("graph returns no tensor", "check the model's forward")
    return nodes[0]
