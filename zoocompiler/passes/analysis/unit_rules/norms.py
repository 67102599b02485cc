"""Norm layers: BatchNorm/InstanceNorm carry channels, GroupNorm couples norm groups, LayerNorm couples its dims."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .context import Cx, leaf_input
from .coupling import record_param, unknown
from .elementwise import is_param_free_activation
from .layers import is_aten, param_names
from .registry import function_rule, module_rule
from .states import APPROX_LAYERNORM, Table


def norm_params(cx: Cx, t: Table, dim: int, names: list[str | None]) -> None:
    """Record per-channel norm parameters/buffers ``names`` (None skipped) as holding ``t``'s units on ``dim``."""
    if dim in t.dims:
        for name in names:
            if name is not None:
                record_param(cx, t, name, {dim: 0}, "norm")


def batchnorm_units(cx: Cx, x: Any, names: list[str | None]) -> Any:
    """Per-channel norm (dim 1): units carry; weight, bias and running stats ``names`` are ``norm`` slices."""
    s = cx.st(x)
    if not isinstance(s, Table):
        return None
    norm_params(cx, s, 1, names)
    return s


def groupnorm_units(cx: Cx, x: Any, groups: int, names: list[str | None]) -> Any:
    """GroupNorm: the channels of one norm group are coupled (a unit is a whole norm group)."""
    s = cx.st(x)
    if not isinstance(s, Table):
        return None
    if s.dims != (1,):
        cx.store.pin(s.ids, f"{cx.where()} normalises over a unit dim other than channels")
        return s
    cx.store.union_along(s.ids.reshape(groups, -1), (0,))
    norm_params(cx, s, 1, names)
    return s


def layernorm_units(cx: Cx, x: Any, k: int, names: list[str | None], kind: str = "LayerNorm") -> Any:
    """LayerNorm (or RMSNorm, ``kind``) over the last ``k`` dims: units there are coupled (statistics change
    when pruned).

    ``cx.layernorm_streams == "pin"`` pins them; ``"prune"`` (and ``"auto"``) leaves them prunable and marks them
    :data:`~.states.APPROX_LAYERNORM`: the pruned norm computes its statistics over the kept units only.
    The affine is recorded as ``norm`` either way.
    """
    s, a = cx.st(x), cx.shape(x)
    if not isinstance(s, Table):
        return None
    normed = [d for d in s.dims if d >= len(a) - k]
    if normed:
        if cx.prunes_streams:
            cx.store.mark_approx(s.ids, APPROX_LAYERNORM)
        else:
            cx.store.pin(s.ids, f"{kind} over the unit dim couples all its units (node {cx.node.name})")
        for name in names:
            if name is not None:
                record_param(cx, s, name, {d: d - (len(a) - k) for d in normed}, "norm")
    return s


@module_rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def batchnorm_module(cx: Cx, m: nn.Module) -> Any:
    """BatchNorm/InstanceNorm, and norm-act layers whose ``act``/``drop`` are parameter-free activations."""
    for sub in (getattr(m, "act", None), getattr(m, "drop", None)):
        if sub is not None and not is_param_free_activation(sub):
            return unknown(cx, f"{cx.where()} applies a non-element-wise {type(sub).__name__}")
    names = [cx.param_name(n) for n in ("weight", "bias", "running_mean", "running_var")]
    return batchnorm_units(cx, leaf_input(cx), names)


@module_rule(nn.GroupNorm)
def groupnorm_module(cx: Cx, m: nn.GroupNorm) -> Any:
    return groupnorm_units(cx, leaf_input(cx), m.num_groups, [cx.param_name("weight"), cx.param_name("bias")])


@module_rule(nn.LayerNorm)
def layernorm_module(cx: Cx, m: nn.LayerNorm) -> Any:
    """nn.LayerNorm; a subclass with its own forward (e.g. a channels-first LayerNorm2d) is an unknown op."""
    if type(m).forward is not nn.LayerNorm.forward:
        return unknown(cx, f"{type(m).__name__} at node {cx.node.name} overrides LayerNorm.forward")
    names = [cx.param_name("weight"), cx.param_name("bias")]
    return layernorm_units(cx, leaf_input(cx), len(m.normalized_shape), names)


@module_rule(nn.RMSNorm)
def rmsnorm_module(cx: Cx, m: nn.RMSNorm) -> Any:
    """nn.RMSNorm: as LayerNorm (statistics over its dims), a weight and no bias."""
    if type(m).forward is not nn.RMSNorm.forward:
        return unknown(cx, f"{type(m).__name__} at node {cx.node.name} overrides RMSNorm.forward")
    return layernorm_units(cx, leaf_input(cx), len(m.normalized_shape), [cx.param_name("weight")], "RMSNorm")


@function_rule("rms_norm")
def rule_rmsnorm_fn(cx: Cx) -> Any:
    shape = cx.val(cx.arg(1, "normalized_shape"))
    k = 1 if isinstance(shape, int) else len(shape)
    names = param_names(cx, [cx.arg(2, "weight")], [k])
    if names is None:
        return unknown(cx, f"{cx.where()} uses a weight that is not a plain parameter")
    return layernorm_units(cx, cx.arg(0, "input"), k, names, "RMSNorm")


@function_rule("batch_norm", "_native_batch_norm_legit_no_training")
def rule_batchnorm_fn(cx: Cx) -> Any:
    if is_aten(cx):
        args = [cx.arg(i) for i in (1, 2, 3, 4)]  # aten: input, weight, bias, running_mean, running_var
    else:  # F.batch_norm: input, running_mean, running_var, weight, bias
        args = [cx.arg(3, "weight"), cx.arg(4, "bias"), cx.arg(1, "running_mean"), cx.arg(2, "running_var")]
    names = param_names(cx, args, [1, 1, 1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses statistics that are not plain parameters")
    res = batchnorm_units(cx, cx.arg(0, "input"), names)
    if isinstance(cx.out, (list, tuple)):
        return [res] + [None] * (len(cx.out) - 1)
    return res


@function_rule("layer_norm", "native_layer_norm")
def rule_layernorm_fn(cx: Cx) -> Any:
    shape = cx.val(cx.arg(1, "normalized_shape"))
    k = 1 if isinstance(shape, int) else len(shape)
    names = param_names(cx, [cx.arg(2, "weight"), cx.arg(3, "bias")], [k, k])
    if names is None:
        return unknown(cx, f"{cx.where()} uses an affine that is not a plain parameter")
    res = layernorm_units(cx, cx.arg(0, "input"), k, names)
    if isinstance(cx.out, (list, tuple)):
        return [res] + [None] * (len(cx.out) - 1)
    return res


@function_rule("group_norm")
def rule_groupnorm_fn(cx: Cx) -> Any:
    names = param_names(cx, [cx.arg(2, "weight"), cx.arg(3, "bias")], [1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses an affine that is not a plain parameter")
    return groupnorm_units(cx, cx.arg(0, "input"), int(cx.val(cx.arg(1, "num_groups"))), names)
