"""Fuse: fold eval-mode affine maps into the convolutions and linears that produce them.

``fuse(gm)`` returns a new GraphModule, equal to ``gm`` in eval mode (up to float rounding), with

1. identity nodes removed: ``nn.Identity``, dropout modules and functions in eval, timm ``DropPath``,
   torchvision ``stochastic_depth`` with ``training=False``;
2. BatchNorm folded into the conv / linear before it, with torch's own
   ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` and the pattern helpers of
   ``torch.fx.experimental.optimization`` (its ``fuse`` is not called as is: it would fold a
   ``BatchNorm1d`` that normalises the token axis of a 3-d linear output, and it skips timm's
   ``BatchNormAct2d``, whose activation is kept here);
3. consecutive affine maps with no nonlinearity between them folded into one: linear → linear,
   conv → 1×1 conv, 1×1 conv → conv, and per-channel ``x * s``, ``x + t``, ``x - t``, ``x / s``
   by constants (layer scale) into the conv / linear before them, also across permutes.

A rule fires only when it is exact and not more expensive: the producer's value has no other user,
each module is called at one node, the fused layer has no more MACs than the two it replaces, and a
1×1 conv with a bias is not folded into a zero-padded k×k conv (the padding would see the bias).
ATen-level graphs (``torch.export`` fallback) are returned unchanged with a note.
The counts land in ``graph_info(fused).extra["fuse"]``; ``fuse_report(before, after)`` summarises.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import matches_module_pattern, replace_node_module
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from zoocompiler.core.modules import count_params
from zoocompiler.ir import graph_info

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_PATTERNS = [
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
]
_DROPOUT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_AFFINE_OPS = {
    operator.mul: "mul",
    torch.mul: "mul",
    "mul": "mul",
    "mul_": "mul",
    operator.add: "add",
    torch.add: "add",
    "add": "add",
    "add_": "add",
    operator.sub: "sub",
    torch.sub: "sub",
    "sub": "sub",
    "sub_": "sub",
    operator.truediv: "div",
    torch.div: "div",
    "div": "div",
    "div_": "div",
}
_PERMUTES = {"permute", "transpose", torch.permute, torch.transpose}


@dataclass
class FuseStats:
    """What one ``fuse`` call changed (stored in ``graph_info(fused).extra["fuse"]``)."""

    identities_removed: int = 0
    batchnorms_folded: int = 0
    affines_folded: int = 0  # linear→linear, conv→conv and channel scale/shift folds
    note: str | None = None


@dataclass
class FuseReport:
    """Graph size before and after fusion."""

    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    identities_removed: int
    batchnorms_folded: int
    affines_folded: int
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --- small graph helpers -----------------------------------------------------------------------------


def _modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def _module_calls(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _owned_module(gm: fx.GraphModule, node: Any, types: tuple[type, ...], calls: Counter) -> nn.Module | None:
    """The module ``node`` calls if it is one of ``types`` and called at this node only."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or calls[node.target] != 1:
        return None
    module = gm.get_submodule(node.target)
    return module if type(module) in types else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(int(s) for s in meta.shape) if hasattr(meta, "shape") else None


def _positions(node: fx.Node) -> int | None:
    """Spatial positions per sample of a conv-like N×C×… value."""
    shape = _shape(node)
    return None if shape is None else int(torch.tensor(shape[2:]).prod())


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (and, recursively, their inputs) that no longer have users; pure nodes only."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n.op in ("placeholder", "output") or n.users or n.graph is not graph:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def _bypass(graph: fx.Graph, node: fx.Node, source: fx.Node) -> None:
    """Make ``node``'s users read ``source`` and drop ``node`` (and its now-dead constant inputs)."""
    node.replace_all_uses_with(source)
    _erase_dead(graph, [node])


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters/buffers no node reads any more (e.g. a folded layer scale), then unused submodules."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if any(name == u or name.startswith(u + ".") or u.startswith(name + ".") for u in used):
            continue
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.delete_all_unused_submodules()


# --- 1. identities ---------------------------------------------------------------------------------


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        name = type(module).__name__
        return isinstance(module, _DROPOUT_MODULES) or name in ("DropPath", "StochasticDepth")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _DROPOUT_FUNCTIONS:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            return training is False
        if name in ("stochastic_depth", "drop_path"):
            training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else None)
            if name == "drop_path":
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else False)
            return training is False
    return False


def remove_identities(gm: fx.GraphModule) -> int:
    """Bypass identity and eval-mode dropout / drop-path nodes (in place); returns how many."""
    removed = 0
    for node in list(gm.graph.nodes):
        if _is_identity(gm, node):
            _bypass(gm.graph, node, node.args[0])
            removed += 1
    return removed


# --- 2. batch norm ----------------------------------------------------------------------------------


def _batchnorm_act_type() -> type | None:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm is a dependency; keep fuse usable without it
        return None
    return BatchNormAct2d


def _foldable_bn(bn: nn.Module) -> bool:
    return bool(bn.track_running_stats) and bn.running_mean is not None and bn.running_var is not None


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold eval BatchNorm into the conv/linear feeding only it (in place); returns how many."""
    calls, modules, folded = _module_calls(gm), _modules(gm), 0
    bn_act = _batchnorm_act_type()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or len(producer.users) != 1 or calls[producer.target] != 1:
            continue
        pattern = next((p for p in _BN_PATTERNS if matches_module_pattern(p, node, modules)), None)
        if pattern is None and bn_act is not None and type(modules.get(node.target)) is bn_act:
            if producer.op == "call_module" and type(modules.get(producer.target)) is nn.Conv2d:
                pattern = (nn.Conv2d, bn_act)
        if pattern is None or not _foldable_bn(bn := modules[node.target]):
            continue
        first = modules[producer.target]
        if pattern[0] is nn.Linear:
            if len(_shape(producer) or ()) != 2:  # BatchNorm1d on B×N×D normalises N, not the linear's D
                continue
            fused = fuse_linear_bn_eval(first.eval(), bn.eval())
        else:
            fused = fuse_conv_bn_eval(first.eval(), bn.eval())
        if pattern[1] is bn_act:
            if not isinstance(bn.drop, _DROPOUT_MODULES):
                continue
            replace_node_module(producer, modules, fused)
            replace_node_module(node, modules, bn.act)  # the node now applies the activation only
            if isinstance(bn.act, nn.Identity):
                _bypass(gm.graph, node, producer)
        else:
            replace_node_module(producer, modules, fused)
            _bypass(gm.graph, node, producer)
        folded += 1
    return folded


# --- 3. affine chains -------------------------------------------------------------------------------


def _is_constant(node: fx.Node) -> bool:
    """True if ``node``'s value depends on parameters and constants only (no input, no module call)."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n.op not in ("get_attr", "call_function", "call_method"):
            return False
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return True


def _constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | float | None:
    """The value of ``arg`` if it depends on parameters/constants only (a number or a tensor), else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, fx.Node) or not _is_constant(arg):
        return None
    if arg.op == "get_attr":
        value = operator.attrgetter(arg.target)(gm)
        return value.detach() if isinstance(value, torch.Tensor) else None
    inputs = {n: _constant(gm, n) for n in arg.all_input_nodes}
    args, kwargs = fx.node.map_arg((arg.args, arg.kwargs), lambda n: inputs[n])
    with torch.no_grad():
        if arg.op == "call_function":
            value = arg.target(*args, **kwargs)
        else:
            value = getattr(args[0], arg.target)(*args[1:], **kwargs)
    return value.detach() if isinstance(value, torch.Tensor) else value if isinstance(value, (int, float)) else None


def _permuted_channel(node: fx.Node, channel: int, rank: int) -> int | None:
    """Where dim ``channel`` of the input of permute/transpose ``node`` ends up (None if not one)."""
    target = node.target
    rest = list(node.args[1:])
    if target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        return [d % rank for d in dims].index(channel)
    if target in ("transpose", torch.transpose) and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        a, b = rest[0] % rank, rest[1] % rank
        return b if channel == a else a if channel == b else channel
    return None


def _producer(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> tuple[fx.Node, int] | None:
    """The single-user conv/linear whose channels reach ``node`` through permutes only, and where they sit."""
    chain: list[fx.Node] = []
    current = node
    while current.op in ("call_method", "call_function") and current.target in _PERMUTES:
        chain.append(current)
        current = current.args[0]
        if not isinstance(current, fx.Node):
            return None
    module = _owned_module(gm, current, (*_CONVS, nn.Linear), calls)
    shape = _shape(current)
    if module is None or shape is None or any(len(n.users) != 1 for n in [current, *chain]):
        return None
    rank = len(shape)
    channel = rank - 1 if isinstance(module, nn.Linear) else 1
    for n in reversed(chain):
        channel = _permuted_channel(n, channel, rank)
        if channel is None:
            return None
    return current, channel


def _channel_vector(value: torch.Tensor | float, out_shape: tuple[int, ...], channel: int) -> torch.Tensor | None:
    """``value`` as a vector over ``out_shape[channel]`` if it broadcasts along that dim only."""
    size = out_shape[channel]
    if not isinstance(value, torch.Tensor):
        return torch.full((size,), float(value))
    if not value.is_floating_point() or value.dim() > len(out_shape):
        return None
    padded = (1,) * (len(out_shape) - value.dim()) + tuple(value.shape)
    for dim, (v, o) in enumerate(zip(padded, out_shape)):
        if v != 1 and (dim != channel or v != o):
            return None
    return value.reshape(-1).expand(size).clone() if value.numel() == 1 else value.reshape(size).clone()


@torch.no_grad()
def _scale_shift(module: nn.Conv2d | nn.Linear, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``module`` compute ``module(x) * scale + shift`` per output channel."""
    w = module.weight
    w.mul_(scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
    bias = module.bias if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    new_bias = bias * scale.to(w.dtype) + shift.to(w.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(new_bias)
    else:
        module.bias.copy_(new_bias)


def _fold_channel_affine(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> bool:
    """Fold ``x ∘ c`` (∘ in *, +, -, /; c a per-channel constant) into the conv/linear producing x."""
    kind = _AFFINE_OPS.get(node.target) if node.op in ("call_function", "call_method") else None
    if kind is None or len(node.args) != 2 or node.kwargs:
        return False
    out_shape = _shape(node)
    for data_pos in (0, 1):
        data, const = node.args[data_pos], node.args[1 - data_pos]
        if not isinstance(data, fx.Node) or (data_pos == 1 and (kind == "div" or node.op == "call_method")):
            continue
        found = None if _is_constant(data) else _producer(gm, data, calls)
        value = _constant(gm, const)
        if found is None or value is None or out_shape is None or _shape(data) != out_shape:
            continue
        producer, channel = found
        vector = _channel_vector(value, out_shape, channel)
        if vector is None or (kind == "div" and bool((vector == 0).any())):
            continue
        ones, zeros = torch.ones_like(vector), torch.zeros_like(vector)
        scale, shift = {
            "mul": (vector, zeros),
            "add": (ones, vector),
            "sub": (ones, -vector) if data_pos == 0 else (-ones, vector),
            "div": (1.0 / vector, zeros),
        }[kind]
        _scale_shift(gm.get_submodule(producer.target), scale, shift)
        _bypass(gm.graph, node, data)
        return True
    return False


def _conv_config(conv: nn.Module) -> dict[str, Any]:
    return {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
    }


def _pointwise(conv: nn.Module) -> bool:
    """A 1×1 (×1) conv that maps each position to the same position: stride 1, no padding, no groups."""
    return (
        all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and all(p == 0 for p in conv.padding)
        and conv.groups == 1
    )


def _pads(conv: nn.Module) -> bool:
    return conv.padding_mode == "zeros" and (conv.padding == "same" or any(p != 0 for p in conv.padding))


def _macs(conv: nn.Module, positions: int | None) -> int:
    return (positions if positions is not None else 1) * conv.weight.numel()


def _fold_conv_pair(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> bool:
    """Fold conv A → conv B (same dimensionality, groups 1) when A is pointwise or B is a plain 1×1."""
    b = _owned_module(gm, node, _CONVS, calls)
    a_node = node.args[0] if node.args else None
    a = _owned_module(gm, a_node, _CONVS, calls) if b is not None and len(node.args) == 1 else None
    if a is None or type(a) is not type(b) or len(a_node.users) != 1 or a.groups != 1 or b.groups != 1:
        return False
    if isinstance(a.padding, str) or isinstance(b.padding, str):
        return False
    p_mid, p_out = _positions(a_node), _positions(node)
    unfused = _macs(a, p_mid) + _macs(b, p_out)
    spatial = tuple(range(2, a.weight.dim()))
    if _pointwise(b):  # any conv A, then a per-position channel mix: fold into A's geometry
        w = torch.einsum("om,mi...->oi...", b.weight.flatten(1), a.weight)
        bias = b.weight.flatten(1) @ a.bias if a.bias is not None else torch.zeros(b.out_channels)
        fused = type(a)(a.in_channels, b.out_channels, a.kernel_size, bias=True, **_conv_config(a))
        fused_positions = p_out
    elif _pointwise(a):  # a channel mix, then any conv B: fold into B's geometry
        if a.bias is not None and _pads(b) and bool(a.bias.detach().ne(0).any()):
            return False  # B's zero padding would see A's bias at the border: not exact
        w = torch.einsum("om...,mi->oi...", b.weight, a.weight.flatten(1))
        bias = b.weight.sum(dim=spatial) @ a.bias if a.bias is not None else torch.zeros(b.out_channels)
        fused = type(b)(a.in_channels, b.out_channels, b.kernel_size, bias=True, **_conv_config(b))
        fused_positions = p_out
    else:
        return False
    if _macs(fused, fused_positions) > unfused:
        return False
    with torch.no_grad():
        fused.weight.copy_(w)
        fused.bias.copy_(bias + (b.bias.detach() if b.bias is not None else 0))
    return _replace_pair(gm, a_node, node, fused)


def _fold_linear_pair(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> bool:
    """Fold linear A → linear B into one linear when that is not more MACs."""
    b = _owned_module(gm, node, (nn.Linear,), calls)
    a_node = node.args[0] if node.args else None
    a = _owned_module(gm, a_node, (nn.Linear,), calls) if b is not None and len(node.args) == 1 else None
    if a is None or len(a_node.users) != 1 or node.kwargs:
        return False
    if b.out_features * a.in_features > a.weight.numel() + b.weight.numel():
        return False
    fused = nn.Linear(a.in_features, b.out_features)
    with torch.no_grad():
        fused.weight.copy_(b.weight @ a.weight)
        a_bias = a.bias if a.bias is not None else torch.zeros(a.out_features)
        fused.bias.copy_(b.weight @ a_bias + (b.bias if b.bias is not None else 0))
    return _replace_pair(gm, a_node, node, fused)


def _replace_pair(gm: fx.GraphModule, a_node: fx.Node, b_node: fx.Node, fused: nn.Module) -> bool:
    """``b_node`` now runs ``fused`` on ``a_node``'s input; ``a_node`` is erased."""
    fused = fused.to(dtype=gm.get_submodule(b_node.target).weight.dtype).eval()
    replace_node_module(b_node, _modules(gm), fused)
    b_node.args = (a_node.args[0],)
    _erase_dead(gm.graph, [a_node])
    return True


def fold_affine_chains(gm: fx.GraphModule) -> int:
    """Fold affine pairs and channel scale/shift constants to a fixed point (in place); returns how many."""
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:  # erased by an earlier fold in this sweep
                continue
            calls = _module_calls(gm)
            if (
                _fold_channel_affine(gm, node, calls)
                or _fold_conv_pair(gm, node, calls)
                or _fold_linear_pair(gm, node, calls)
            ):
                folded += 1
                changed = True
    return folded


def fold_into(gm: fx.GraphModule, consumers: set[str]) -> int:
    """Fold the conv / linear right before each node named in ``consumers`` into it (conv → conv,
    linear → linear, under the same exactness and cost rules), before any other fold can change either
    layer; in place; returns how many. For a rewrite that inserts a layer meant to vanish into its
    consumer (S&P's repairs), where ``fuse``'s graph-order sweep could first fold the inserted layer
    into its own producer (e.g. giving it a bias a padded consumer cannot take)."""
    _refresh_shapes(gm)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.name in consumers and node.graph is gm.graph:
            calls = _module_calls(gm)
            folded += _fold_conv_pair(gm, node, calls) or _fold_linear_pair(gm, node, calls)
    gm.graph.lint()
    gm.recompile()
    return folded


# --- the pass -----------------------------------------------------------------------------------------


def _refresh_shapes(gm: fx.GraphModule) -> None:
    example = graph_info(gm).example_input
    if example is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)


def fuse(gm: fx.GraphModule, *, analyze: bool = True) -> fx.GraphModule:
    """A fused copy of ``gm`` (eval mode; ``gm`` is untouched): identities removed, BatchNorm and
    consecutive affine maps folded. With ``analyze`` and an example input, the copy is re-annotated
    with every analysis pass. Statistics go to ``graph_info(result).extra["fuse"]``.
    """
    fused = copy.deepcopy(gm).eval()
    info = graph_info(fused)
    stats = FuseStats()
    if info.tracer == "export":
        stats.note = "ATen-level graph (torch.export fallback): returned unchanged"
    else:
        _refresh_shapes(fused)
        stats.identities_removed = remove_identities(fused)
        while True:  # a fold can expose another (conv → scale → BN): repeat to a fixed point
            batchnorms = fold_batchnorm(fused)
            stats.identities_removed += remove_identities(fused)  # BatchNormAct2d without activation
            affines = fold_affine_chains(fused)
            stats.batchnorms_folded += batchnorms
            stats.affines_folded += affines
            if not batchnorms and not affines:
                break
        _drop_unused_attributes(fused)
        fused.graph.lint()
        fused.recompile()
        if analyze and info.example_input is not None:
            from ..analysis import run_analysis

            run_analysis(fused)
    info.extra["fuse"] = asdict(stats)
    return fused


def fuse_report(before: fx.GraphModule, after: fx.GraphModule) -> FuseReport:
    """Node and parameter counts of ``before`` and its fused ``after``, with what ``fuse`` changed."""
    stats = graph_info(after).extra.get("fuse", {})
    return FuseReport(
        nodes_before=len(before.graph.nodes),
        nodes_after=len(after.graph.nodes),
        params_before=count_params(before),
        params_after=count_params(after),
        identities_removed=stats.get("identities_removed", 0),
        batchnorms_folded=stats.get("batchnorms_folded", 0),
        affines_folded=stats.get("affines_folded", 0),
        note=stats.get("note"),
    )
