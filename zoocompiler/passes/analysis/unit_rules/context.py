"""What a rule sees (:class:`Cx`) and how it gives up (:class:`RuleFailure`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .states import Store, TensorSpec


class RuleFailure(Exception):
    """A rule met a form it does not handle; the driver falls back to the unknown-op rule."""


def norm_dim(d: int, ndim: int) -> int:
    """``d`` as a non-negative dim of a rank-``ndim`` tensor; ``RuleFailure`` when out of range."""
    if not -ndim <= d < max(ndim, 1):
        raise RuleFailure(f"dim {d} out of range for rank {ndim}")
    return d % ndim if ndim else 0


@dataclass
class Cx:
    """What a rule sees: the node, the states and concrete metas of its inputs, and the store."""

    store: Store
    gm: fx.GraphModule
    node: fx.Node
    states: dict[fx.Node, Any]
    metas: dict[fx.Node, Any]
    op: str
    layernorm_streams: str = "pin"  # "pin": a LayerNorm over a unit dim pins it; "prune"/"auto": it does not

    @property
    def prunes_streams(self) -> bool:
        """Whether norms and statistics over a unit dim leave it prunable (marked approx) instead of pinning it
        ("auto" decides per group afterwards, :func:`~..unit_groups.find_unit_groups`)."""
        return self.layernorm_streams in ("prune", "auto")

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``i`` (counted after ``self`` for methods) or keyword ``name``, else ``default``."""
        args = self.node.args[1:] if self.node.op == "call_method" else self.node.args
        if i < len(args):
            return args[i]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def this(self) -> Any:
        """First operand: ``self`` for methods, first argument for functions and modules."""
        return self.node.args[0] if self.node.args else next(iter(self.node.kwargs.values()), None)

    def st(self, a: Any) -> Any:
        """The state of argument ``a`` (None for constants)."""
        return self.states.get(a) if isinstance(a, fx.Node) else None

    def shape(self, a: Any) -> tuple[int, ...] | None:
        """Concrete shape of argument ``a``, or None when it is not a tensor."""
        m = self.metas.get(a) if isinstance(a, fx.Node) else None
        return m.shape if isinstance(m, TensorSpec) else None

    def val(self, a: Any) -> Any:
        """Concrete Python value of a non-tensor argument (nodes replaced by their recorded values)."""
        return fx.node.map_aggregate(a, lambda x: self.metas.get(x) if isinstance(x, fx.Node) else x)

    @property
    def out(self) -> Any:
        """The node's concrete output: a TensorSpec, a list of them, or a Python value."""
        return self.metas.get(self.node)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output shape; ``RuleFailure`` unless the output is a single tensor."""
        m = self.out
        if not isinstance(m, TensorSpec):
            raise RuleFailure("output is not a single tensor")
        return m.shape

    @property
    def module(self) -> nn.Module:
        """The leaf module a ``call_module`` node calls."""
        return self.gm.get_submodule(self.node.target)

    def param_name(self, attr: str) -> str | None:
        """Graph-wide name of the called module's parameter or buffer ``attr`` (dotted path allowed).

        ``None`` when the module has no such attribute or it is None (e.g. a conv without bias).
        """
        value = functools.reduce(lambda obj, a: getattr(obj, a, None), attr.split("."), self.module)
        return f"{self.node.target}.{attr}" if value is not None else None

    def where(self) -> str:
        return f"{self.op} at node {self.node.name}"

    def label(self, a: Any) -> str:
        return a.name if isinstance(a, fx.Node) else repr(a)


def leaf_input(cx: Cx) -> Any:
    """``node.args[0]`` (None without positional arguments): the input built-in module rules read."""
    return cx.node.args[0] if cx.node.args else None
