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
    """torchvision's ``shifted_window_attention``: input consumed like a linear, heads as units, output fresh.

    The relative position bias (a table view, or Swin V2's MLP output) and V2's logit scale are per-head
    members. Pruned, the call becomes ``explicit_swin.explicit_shifted_window_attention`` of the rewrite
    passes (torchvision's derives head_dim and its output width from the input width).
    """
    x = cx.arg(0, "input")
    qkv_w, proj_w, rpb = cx.arg(1, "qkv_weight"), cx.arg(2, "proj_weight"), cx.arg(3, "relative_position_bias")
    heads = int(cx.val(cx.arg(5, "num_heads")))
    qkv_b, proj_b, logit = cx.arg(9, "qkv_bias"), cx.arg(10, "proj_bias"), cx.arg(11, "logit_scale")
    names = param_names(cx, [qkv_w, proj_w, qkv_b, proj_b], [2, 2, 1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses weights that are not plain parameters")
    head_dim = cx.shape(qkv_w)[0] // (3 * heads)
    extra: list[tuple[str, int, str]] = []
    rs = cx.st(rpb)
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
        cx, x, heads, head_dim, cx.shape(proj_w)[0], qkv, names[1], names[3], extra, None, [(x, names[0])]
    )
    hid = cx.store.heads[-1]
    if isinstance(rs, Table):  # Swin V2: the bias comes from an MLP whose outputs are the heads
        if rs.dims == (1,):
            cx.store.union(rs.ids, hid)
        else:
            cx.store.pin(np.concatenate([hid, rs.ids.ravel()]), f"{cx.where()} adds a bias with units off the head dim")
    return out


@function_rule("torchvision.models.swin_transformer._get_relative_position_bias")
def rule_swin_rel_bias(cx: Cx) -> Any:
    """torchvision's ``_get_relative_position_bias(table, index, window)``: (1, heads, N, N) from table (L, heads);
    the table is a parameter (Swin) or an MLP's output with the heads as units (Swin V2)."""
    table = cx.st(cx.arg(0))
    if isinstance(table, Table) and table.dims == (1,):
        return Table((1,), table.ids)
    name = simple_param(table, 2)
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


_WINDOW_FUNCTIONS = ("window_partition", "window_reverse", "grid_partition", "grid_reverse")
_WINDOW_MODULES = ("maxxvit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "gcvit")


@function_rule(
    *(f"timm.models.{m}.{f}" for m in _WINDOW_MODULES for f in _WINDOW_FUNCTIONS),
    *(f"timm.models.maxxvit.{f}_nchw" for f in _WINDOW_FUNCTIONS),
)
def rule_window_layout(cx: Cx) -> Any:
    """timm's window / grid partition and reverse: spatial positions move, the channel dim (last, or dim 1 for
    the ``_nchw`` forms) is carried; units anywhere else are pinned."""
    x = cx.this()
    s, a, b = cx.st(x), cx.shape(x), cx.out_shape
    if not isinstance(s, Table):
        return None if s is None else unknown(cx)
    nchw = cx.op.endswith("_nchw")
    ch_in, ch_out = (1, 1) if nchw else (len(a) - 1, len(b) - 1)
    if s.dims == (ch_in,) and a[ch_in] == b[ch_out]:
        return Table((ch_out,), s.ids)
    return unknown(cx, f"{cx.where()} moves positions along a unit dim")
