"""Leaf functions and modules of torchvision and timm that the tracer keeps opaque.

timm classes are registered by qualified name, so importing this module does not import timm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from .attention import heads_units
from .context import Cx
from .coupling import unknown
from .elementwise import rule_identity, rule_no_units, rule_pointwise
from .layers import param_names, simple_param
from .norms import batchnorm_module
from .registry import function_rule, module_rule
from .states import ParamRef, Table

function_rule("torchvision.ops.stochastic_depth.stochastic_depth")(rule_identity)
function_rule("timm.layers.attention.resolve_self_attn_mask")(rule_no_units)
module_rule(
    "timm.layers.norm_act.BatchNormAct2d",
    "timm.layers.norm_act.SyncBatchNormAct",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
)(batchnorm_module)


@function_rule("torchvision.models.swin_transformer.shifted_window_attention")
def rule_swin_attention(cx: Cx) -> Any:
    """torchvision's ``shifted_window_attention``: heads as units; head_dim comes from the input width."""
    x = cx.arg(0, "input")
    qkv_w, proj_w, rpb = cx.arg(1, "qkv_weight"), cx.arg(2, "proj_weight"), cx.arg(3, "relative_position_bias")
    heads = int(cx.val(cx.arg(5, "num_heads")))
    qkv_b, proj_b, logit = cx.arg(9, "qkv_bias"), cx.arg(10, "proj_bias"), cx.arg(11, "logit_scale")
    names = param_names(cx, [qkv_w, proj_w, qkv_b, proj_b], [2, 2, 1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses weights that are not plain parameters")
    qkv_rows = cx.shape(qkv_w)[0]
    head_dim = qkv_rows // (3 * heads)
    extra: list[tuple[str, int, str]] = []
    rs = cx.st(rpb)
    reason = f"{cx.where()} derives head_dim and its output width from the input width"
    if isinstance(rs, ParamRef):
        for name, dmap in rs.sources:
            if dmap[1] is not None and dmap[1] >= 0:
                extra.append((name, dmap[1], "head"))
    if logit is not None:
        ln = param_names(cx, [logit], [3])
        if ln is None:
            return unknown(cx, f"{cx.where()} uses a logit scale that is not a plain parameter")
        extra.append((ln[0], 0, "head"))
    qkv = [(names[0], 3)] + ([(names[2], 3)] if names[2] else [])
    out = heads_units(
        cx, x, heads, head_dim, cx.shape(proj_w)[0], qkv, names[1], names[3], extra, reason, [(x, names[0])]
    )
    cx.store.pin(out.ids, reason)
    s = cx.st(x)
    if isinstance(s, Table):
        cx.store.pin(s.ids, reason)
    return out


@function_rule("torchvision.models.swin_transformer._get_relative_position_bias")
def rule_swin_rel_bias(cx: Cx) -> Any:
    """torchvision's ``_get_relative_position_bias(table, index, window)``: (1, heads, N, N) from table (L, heads)."""
    name = simple_param(cx.st(cx.arg(0)), 2)
    if name is None:
        return unknown(cx)
    return ParamRef(((name, (-1, 1, None, None)),))


@function_rule("torchvision.models.swin_transformer._patch_merging_pad")
def rule_patch_merging_pad(cx: Cx) -> Any:
    """torchvision's ``_patch_merging_pad``: four spatial phases concatenated on the channel dim."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    if not isinstance(s, Table):
        return None
    last = len(a) - 1
    if s.dims != (last,):
        cx.store.pin(s.ids, f"{cx.where()} moves positions along a unit dim")
        return None
    return Table((last,), np.tile(s.ids, 4))


@function_rule("timm.layers.attention.maybe_add_mask")
def rule_maybe_add_mask(cx: Cx) -> Any:
    """timm's ``maybe_add_mask(scores, mask)``: the scores, plus the mask when there is one."""
    mask = cx.arg(1, "attn_mask")
    if not isinstance(mask, fx.Node):
        return cx.st(cx.arg(0))
    return rule_pointwise(cx)
