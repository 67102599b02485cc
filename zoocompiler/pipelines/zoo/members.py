"""The models a reassembly works on: loaded, traced and annotated, with what the solvers need to know.

``--zoo demo`` is the built-in demo zoo; otherwise a comma-separated list of model specs
(``zoo:resnet_s,timm:resnet18,num_classes=10,in_chans=1``): a piece without ``:`` continues the
previous spec as a ``key=value`` option, and a bare demo-zoo name stands for ``zoo:NAME``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.errors import InputShapeError, ZooError
from zoocompiler.passes.analysis.activations import assembly_positions
from zoocompiler.passes.analysis.cut_points import CutPoint

from ..base import Executor, LocalExecutor, local_only

TRACE_BATCH = 2


@dataclass
class ZooMember:
    """One traced zoo model: ``positions`` are its reassembly positions (input … features)."""

    name: str
    spec: str
    module: nn.Module
    graph: fx.GraphModule
    positions: list[CutPoint]
    input_shape: tuple[int, ...]
    accuracy: float | None = None

    def params_between(self, start: int, end: int) -> int:
        return self.positions[end].cum_params - self.positions[start].cum_params

    def macs_between(self, start: int, end: int) -> int:
        """Per-sample MACs between two positions (the trace ran on ``TRACE_BATCH`` samples)."""
        return (self.positions[end].cum_macs - self.positions[start].cum_macs) // TRACE_BATCH


def split_zoo_spec(text: str) -> list[str]:
    """``"zoo:a,timm:b,k=1"`` → ``["zoo:a", "timm:b,k=1"]`` (pieces without ``:`` are options; commas inside
    brackets or quotes, as in ``img_size=(64,64)``, do not split)."""
    from zoocompiler.sources import split_top_level

    specs: list[str] = []
    for piece in split_top_level(text):
        if not piece:
            continue
        if ":" not in piece and "=" in piece and specs:
            specs[-1] += f",{piece}"
        else:
            specs.append(piece if ":" in piece else f"zoo:{piece}")
    return specs


def zoo_specs(zoo: str) -> list[str]:
    """The model specs named by ``--zoo`` (``demo`` = every demo-zoo model)."""
    from zoocompiler.zoo import list_entries

    if zoo == "demo":
        return [f"zoo:{e.name}" for e in list_entries("demo")]
    specs = split_zoo_spec(zoo)
    if len(specs) < 2:
        raise ZooError(
            f"a reassembly needs at least two models, got {len(specs)} from --zoo {zoo!r}",
            "pass --zoo demo or several comma-separated specs, e.g. zoo:resnet_s,zoo:vgg_s",
        )
    if len(set(specs)) != len(specs):
        raise ZooError(f"--zoo {zoo!r} names a model twice", "list each model once")
    return specs


def declared_input_shape(zoo: str) -> tuple[int, ...] | None:
    """The input shape every model of ``--zoo`` declares (demo-zoo entries do), or None if any does not or
    they disagree (other specs accept what they are traced with)."""
    from zoocompiler.zoo import get_entry

    specs = zoo_specs(zoo)
    if not all(spec.startswith("zoo:") for spec in specs):
        return None
    shapes = {tuple(get_entry(spec[4:]).input_shape) for spec in specs}
    return shapes.pop() if len(shapes) == 1 else None


def _member_name(spec: str) -> str:
    source, _, rest = spec.partition(":")
    return rest if source == "zoo" else spec


def load_member(spec: str, input_shape: Sequence[int]) -> ZooMember:
    """Load, trace (at ``input_shape`` = C, H, W) and annotate one model (built under a fixed torch seed, so a
    spec without weights gives the same random weights in every run and a plan's weights hash stays valid).

    Demo-zoo models must be fed their own input shape; other specs must accept it when traced.
    Either mismatch raises ``InputShapeError`` naming the model, its shape and the data's.
    """
    from zoocompiler.passes.analysis import trace
    from zoocompiler.sources import load_model
    from zoocompiler.zoo import get_entry

    shape = tuple(int(s) for s in input_shape)
    accuracy, expected = None, None
    if spec.startswith("zoo:"):
        entry = get_entry(spec[4:])
        accuracy, expected = entry.test_accuracy, tuple(entry.input_shape)
    if expected is not None and expected != shape:
        raise InputShapeError(
            f"zoo model {spec} takes inputs of shape {expected} but the data has {shape}",
            "use data with the zoo's input shape (the demo zoo takes 1×28×28, e.g. --data mnist5k)",
        )
    with torch.random.fork_rng(devices=[]):  # a model built without weights gets the same ones in every run
        torch.manual_seed(0)
        model = load_model(spec).eval()
    try:
        graph = trace(model, torch.randn(TRACE_BATCH, *shape))
    except InputShapeError as err:
        raise InputShapeError(
            f"zoo model {spec} does not accept the data's input shape {shape}: {err.cause}",
            "use data with the zoo's input shape, or models built for it",
        ) from err
    return ZooMember(_member_name(spec), spec, model, graph, assembly_positions(graph), shape, accuracy)


def load_members(
    zoo: str, input_shape: Sequence[int], progress: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> list[ZooMember]:
    """Every model of ``--zoo``, traced at the data's ``input_shape``; each model is an item of ``executor``
    (default: in-process, in order)."""
    load = functools.partial(_load_reporting, input_shape=tuple(int(s) for s in input_shape),
                             progress=local_only(executor, progress))
    return (executor or LocalExecutor()).map(load, zoo_specs(zoo))


def _load_reporting(spec: str, input_shape: tuple[int, ...], progress: Callable[[str], None] | None) -> ZooMember:
    if progress is not None:
        progress(spec)
    return load_member(spec, input_shape)
