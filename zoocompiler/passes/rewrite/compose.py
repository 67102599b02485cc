"""Block composition: blocks of traced models in stage order, stitch layers between them, a new head.

Used by every method that composes networks from blocks of other networks (DeRy's reassembly,
Learngene Pool's descendants). A model is anything with a traced ``graph``, its ``positions``
(cut points usable as block boundaries) and a ``name`` (:class:`PositionedModel`); a block is a
contiguous range of one model's positions. Two consecutive blocks
that are contiguous in the same model are joined directly; any other pair through a stitch layer
(``zoocompiler.passes.rewrite.stitch.make_stitch``) initialised by least squares on probe activations:
the source is the assembled prefix run on the probe images, the destination the activation the
next block's own model produces at that block's start on the same images. The head is a stitch
to a flat ``num_classes`` vector (global pooling + linear) fitted by ridge regression to one-hot
labels, i.e. a linear probe, so an assembly is usable before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.errors import PassError
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.ir import Layout, TensorInfo
from zoocompiler.solvers.partition import BlockRef

from ..analysis.activations import cut_point_activations
from ..analysis.cut_points import CutPoint
from .blocks import extract_block
from .stitch import Stitch, batched_forward, make_stitch

HEAD_RIDGE_PER_SAMPLE = 1e-3  # ridge λ for the head's linear probe, per training sample
BATCH = 256  # samples per forward when running probes through blocks
STITCH_RIDGE = 1e-3  # stitch ridge λ relative to the source's mean per-channel energy (keeps LS well-posed)


class PositionedModel(Protocol):
    """A traced model whose ``positions`` (cut points) may start or end a block."""

    name: str
    graph: fx.GraphModule
    positions: Sequence[CutPoint]


@dataclass(frozen=True)
class ChosenBlock:
    """Block ``stage`` of an assembly: positions ``start``..``end`` of zoo model ``model``."""

    model: str
    stage: int
    start: int
    end: int

    @property
    def key(self) -> str:
        return f"{self.model}[{self.start}:{self.end}]"

    def to_dict(self) -> dict:
        return asdict(self)


def chosen(members: Sequence[PositionedModel], ref: BlockRef) -> ChosenBlock:
    """The block a solver's block reference stands for."""
    return ChosenBlock(members[ref.model].name, ref.stage, ref.start, ref.end)


def joins_directly(a: ChosenBlock, b: ChosenBlock) -> bool:
    """True when ``b`` continues ``a`` inside the same model (no stitch layer needed)."""
    return a.model == b.model and a.end == b.start


class AssembledNet(nn.Module):
    """``head(body(x))``; ``body`` is ``block0, stitch1, block1, …`` (stitches only where needed)."""

    def __init__(self, body: Mapping[str, nn.Module], head: nn.Module):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(body))
        self.head = head
        self.frozen: tuple[str, ...] = ()

    def freeze_blocks(self) -> None:
        """FROZEN-TUNING: zoo blocks keep their weights and BatchNorm statistics; stitches and head train."""
        self.frozen = tuple(name for name in self.body._modules if name.startswith("block"))
        for name in self.frozen:
            self.body.get_submodule(name).requires_grad_(False)

    def train(self, mode: bool = True) -> AssembledNet:
        super().train(mode)
        for name in self.frozen:
            self.body.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ProbeActivations:
    """Activations of each zoo model at its positions on fixed probe images, computed once on demand."""

    def __init__(self, members: Mapping[str, PositionedModel], probe: torch.Tensor):
        self.members = members
        self.probe = probe
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def at(self, model: str, position: int) -> torch.Tensor:
        key = (model, position)
        if key not in self._cache:
            member = self.members[model]
            if position == 0:
                self._cache[key] = self.probe
            else:
                node = member.positions[position].node
                self._cache[key] = cut_point_activations(member.graph, self.probe, [node])[node]
        return self._cache[key]


def block_module(member: PositionedModel, start: int, end: int) -> nn.Module:
    """A standalone copy of ``member``'s block between two positions (eval mode; trainable without touching the zoo)."""
    cut_start, cut_end = member.positions[start].index, member.positions[end].index
    return copy.deepcopy(extract_block(member.graph, cut_start, cut_end).module).eval()


def stitch_cost(src: TensorInfo, dst: TensorInfo) -> tuple[int, int] | None:
    """(params, per-sample MACs) of a stitch layer from ``src`` to ``dst``; ``None`` if they cannot be joined.
    Memoised by the two tensors' descriptions (a zoo has few distinct block-end tensors; the assembly ILP asks
    for every pair of blocks), and the global RNG is left untouched."""
    return _stitch_cost(dataclasses.astuple(src), dataclasses.astuple(dst))


@functools.lru_cache(maxsize=65536)
def _stitch_cost(src: tuple, dst: tuple) -> tuple[int, int] | None:
    source = TensorInfo(*src)
    try:
        with torch.random.fork_rng(devices=[]):
            layer = make_stitch(source, TensorInfo(*dst), init="random")
    except PassError:
        return None
    return count_params(layer), count_macs(layer, source.shape[1:], eval=True)


def head_info(num_classes: int) -> TensorInfo:
    return TensorInfo((1, num_classes), "", Layout.FLAT)


def stitch_ridge(src_act: torch.Tensor, src: TensorInfo, relative: float = STITCH_RIDGE) -> float:
    """Absolute ridge λ = ``relative`` × the source's summed energy per channel (scale-invariant regularisation).

    Probe features of a block can be rank-deficient (dead ReLU channels, concatenated copies); the
    plain pseudo-inverse then fits noise with huge weights that make tuning diverge.
    """
    channels = src.channels or 1
    return relative * float(src_act.double().pow(2).sum()) / channels


def build_body(
    blocks: Sequence[ChosenBlock], members: Mapping[str, PositionedModel], probes: ProbeActivations
) -> OrderedDict[str, nn.Module]:
    """The body modules of an assembly (blocks in stage order, ridge-LS-initialised stitches between them)."""
    body: OrderedDict[str, nn.Module] = OrderedDict()
    prefix_out = probes.probe
    for k, block in enumerate(blocks):
        member = members[block.model]
        if k > 0 and not joins_directly(blocks[k - 1], block):
            prev = blocks[k - 1]
            src = members[prev.model].positions[prev.end].tensor
            dst = member.positions[block.start].tensor
            target = probes.at(block.model, block.start)
            ridge = stitch_ridge(prefix_out, src)
            layer = make_stitch(src, dst, probe_src=prefix_out, probe_dst=target, ridge=ridge)
            body[f"stitch{k}"] = layer
            prefix_out = batched_forward(layer, prefix_out, BATCH)
        body[f"block{k}"] = block_module(member, block.start, block.end)
        prefix_out = batched_forward(body[f"block{k}"], prefix_out, BATCH)
    return body


def fit_head(body: nn.Module, features: TensorInfo, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> Stitch:
    """A new classifier on ``body``'s features: pooling + linear, ridge-regressed onto one-hot ``y``."""
    feats = batched_forward(body.eval(), x, BATCH)
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    ridge = HEAD_RIDGE_PER_SAMPLE * len(x)
    return make_stitch(features, head_info(num_classes), probe_src=feats, probe_dst=onehot, ridge=ridge)


def build_assembly(
    blocks: Sequence[ChosenBlock],
    members: Mapping[str, PositionedModel],
    probes: ProbeActivations,
    head_x: torch.Tensor,
    head_y: torch.Tensor,
    num_classes: int,
) -> AssembledNet:
    """The full assembled network: body (see :func:`build_body`) and a linear-probe head (eval mode)."""
    body = nn.Sequential(build_body(blocks, members, probes))
    last = blocks[-1]
    head = fit_head(body, members[last.model].positions[last.end].tensor, head_x, head_y, num_classes)
    return AssembledNet(body._modules, head).eval()
