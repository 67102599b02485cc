"""Matmul, scaled-dot-product attention and nn.MultiheadAttention: contractions unite; heads become units."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .context import Cx, RuleFailure
from .coupling import check_shape_scalars, couple, record_param
from .layers import simple_param
from .registry import function_rule, module_rule
from .states import ParamRef, Table, TensorSpec
from .tables import permute_state, project


def contract(cx: Cx, a: tuple[Any, tuple[int, ...]], b: tuple[Any, tuple[int, ...]], out_shape: tuple[int, ...]) -> Any:
    """Batched matmul of two activations ``a (..., n, k) @ b (..., k, m)``.

    The contracted elements of a and b are united position-wise. Units of the batch dims, a's n
    and b's m pass to the output (coupled like an element-wise op); when a batch dim keeps units
    (heads), every contracted element is united into them -- a head becomes one unit.
    """
    (sa, sha), (sb, shb) = a, b
    if len(sha) < 2 or len(shb) < 2:
        raise RuleFailure("matmul with a vector")
    ka, kb = len(sha) - 1, len(shb) - 2
    ta = sa if isinstance(sa, Table) else None
    tb = sb if isinstance(sb, Table) else None
    a_has_k = ta is not None and ka in ta.dims
    b_has_k = tb is not None and kb in tb.dims
    if a_has_k and b_has_k:  # unite a[..., k] with b[..., k, :] position-wise over the batch dims
        va = _without_dim(cx, ta, ka - 1)
        vb = _without_dim(cx, tb, kb + 1)
        couple(
            cx,
            [(va, tuple(sha[:-2]) + (sha[-1],), "lhs"), (vb, tuple(shb[:-2]) + (shb[-2],), "rhs")],
            tuple(torch.broadcast_shapes(torch.Size(sha[:-2]), torch.Size(shb[:-2]))) + (sha[-1],),
        )
    elif a_has_k or b_has_k:
        t, k_t, other, k_o = (ta, ka, sb, kb) if a_has_k else (tb, kb, sa, ka)
        if isinstance(other, ParamRef):
            for name, dmap in other.sources:
                pd = dmap[k_o]
                if pd is not None and pd >= 0:
                    record_param(cx, t, name, {k_t: pd}, "linear_in")
                elif pd is None:
                    cx.store.pin(t.ids, f"{cx.where()} contracts units with an untracked parameter view")
        else:
            cx.store.pin(t.ids, f"{cx.where()} contracts a unit dim with a tensor that has no units there")
    va = _kept_units(cx, ta, sha, ka)
    vb = _kept_units(cx, tb, shb, kb)
    ops = [
        (va if ta is not None else sa, tuple(sha[:-1]) + (1,), "lhs"),
        (vb if tb is not None else sb, tuple(shb[:-2]) + (1, shb[-1]), "rhs"),
    ]
    return couple(cx, ops, out_shape)


def _without_dim(cx: Cx, t: Table, drop: int) -> Table:
    """``t`` without tensor dim ``drop`` (coupling across it if it carries units); later dims shift down."""
    kept = tuple(d for d in t.dims if d != drop)
    ids = project(cx.store, t, kept) if drop in t.dims else t.ids
    return Table(tuple(d - (d > drop) for d in kept), ids)


def _kept_units(cx: Cx, t: Table | None, sh: tuple[int, ...], drop: int) -> Table | None:
    """An operand's units on the dims that survive the contraction of dim ``drop``.

    Contracted elements are united into the kept units (marked as heads when those sit on batch dims).
    """
    if t is None:
        return None
    kept = tuple(d for d in t.dims if d != drop)
    if not kept:
        return None
    ids = project(cx.store, t, kept)
    if drop in t.dims and any(d < len(sh) - 2 for d in kept):
        cx.store.heads.append(ids.ravel().copy())
    return Table(kept, ids)


@function_rule("matmul", "bmm", "mm")
def rule_matmul(cx: Cx) -> Any:
    """``x @ W`` with a 2-d parameter is a linear layer; between activations see :func:`contract`."""
    a, b = cx.arg(0, "input"), cx.arg(1, "other")
    if cx.node.op == "call_method":
        a, b = cx.node.args[0], cx.node.args[1]
    sa, sb = cx.st(a), cx.st(b)
    sha, shb = cx.shape(a), cx.shape(b)
    if sha is None or shb is None:
        raise RuleFailure("matmul operand is not a tensor")
    for s, sh, other, osh, side in ((sb, shb, sa, sha, "rhs"), (sa, sha, sb, shb, "lhs")):
        if isinstance(s, ParamRef) and len(sh) == 2 and simple_param(s, 2) and isinstance(other, (Table, type(None))):
            return _matmul_weight(cx, other, osh, s.sources[0][0], side)
    return contract(cx, (sa, sha), (sb, shb), cx.out_shape)


def _matmul_weight(cx: Cx, x: Any, sh: tuple[int, ...], weight: str, side: str) -> Any:
    """``x @ W`` (W: k×m parameter) behaves like a linear layer with rows/cols swapped."""
    if side == "lhs":
        raise RuleFailure("parameter on the left of matmul")
    last = len(sh) - 1
    if isinstance(x, Table):
        if last in x.dims:
            cx.store.param(cx.node.name, weight, (0,), project(cx.store, x, (last,)), "linear_in")
        if x.dims != (last,):
            cx.store.pin(x.ids, f"{cx.where()} maps a tensor whose units are not only on the last dim")
    out = cx.store.fresh(cx.out_shape[-1])
    cx.store.param(cx.node.name, weight, (1,), out, "linear_out")
    return Table((len(cx.out_shape) - 1,), out)


@function_rule("scaled_dot_product_attention")
def rule_sdpa(cx: Cx) -> Any:
    """``q @ kᵀ`` (+ mask) then ``@ v``: each head unites its q, k and v elements."""
    q, k, v = cx.arg(0, "query"), cx.arg(1, "key"), cx.arg(2, "value")
    mask = cx.arg(3, "attn_mask")
    check_shape_scalars(cx)
    sq, sk, sv = cx.st(q), cx.st(k), cx.st(v)
    shq, shk, shv = cx.shape(q), cx.shape(k), cx.shape(v)
    if len(shq) < 2:
        raise RuleFailure("attention on vectors")
    perm = list(range(len(shk)))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    skt, shkt = permute_state(sk, perm), tuple(shk[p] for p in perm)
    batch = torch.broadcast_shapes(torch.Size(shq[:-2]), torch.Size(shk[:-2]))
    scores_shape = tuple(batch) + (shq[-2], shk[-2])
    scores = contract(cx, (sq, shq), (skt, shkt), scores_shape)
    if isinstance(mask, fx.Node) and cx.shape(mask) is not None:
        scores = couple(cx, [(scores, scores_shape, "scores"), (cx.st(mask), cx.shape(mask), mask.name)], scores_shape)
    return contract(cx, (scores, scores_shape), (sv, shv), cx.out_shape)


def heads_units(
    cx: Cx,
    x: Any,
    heads: int,
    head_dim: int,
    c_out: int,
    qkv: list[tuple[str, int]],
    proj_w: str,
    proj_b: str | None,
    extra: list[tuple[str, int, str]],
    reason: str,
    in_weights: list[tuple[Any, str]],
) -> Table:
    """A fused attention layer: input consumed like a linear, heads as units (pinned with ``reason``), output fresh.

    ``qkv``: (weight or bias, copies of the per-head rows); ``extra``: (parameter, dim, "head" or
    "dim") per-head tables; ``in_weights``: (input node, weight consuming it on dim 1).
    """
    for xi, wname in in_weights:
        s, a = cx.st(xi), cx.shape(xi)
        if isinstance(s, Table):
            last = len(a) - 1
            if last in s.dims:
                cx.store.param(cx.node.name, wname, (1,), project(cx.store, s, (last,)), "linear_in")
            if s.dims != (last,):
                cx.store.pin(s.ids, f"{cx.where()} attends over a tensor with units off the feature dim")
    hid = cx.store.fresh(heads)
    cx.store.heads.append(hid)
    per_head = np.repeat(hid, head_dim)
    for name, copies in qkv:
        cx.store.param(cx.node.name, name, (0,), np.tile(per_head, copies), "linear_out")
    cx.store.param(cx.node.name, proj_w, (1,), per_head, "linear_in")
    for name, pdim, kind in extra:
        cx.store.param(cx.node.name, name, (pdim,), hid if kind == "head" else per_head, "param")
    cx.store.pin(hid, reason)
    out = cx.store.fresh(c_out)
    cx.store.param(cx.node.name, proj_w, (0,), out, "linear_out")
    if proj_b is not None:
        cx.store.param(cx.node.name, proj_b, (0,), out, "linear_out")
    return (
        Table((len(cx.out_shape) - 1,), out)
        if isinstance(cx.out, TensorSpec)
        else Table((len(cx.out[0].shape) - 1,), out)
    )


@module_rule(nn.MultiheadAttention)
def rule_mha(cx: Cx, m: nn.MultiheadAttention) -> Any:
    """nn.MultiheadAttention: heads are units but pinned (the module derives head_dim from embed_dim)."""
    t = cx.node.target
    q = cx.arg(0, "query")
    k, v = cx.arg(1, "key", q), cx.arg(2, "value", q)
    e, h = m.embed_dim, m.num_heads
    reason = (
        f"nn.MultiheadAttention at node {cx.node.name} derives head_dim from embed_dim; "
        "replace the module to prune heads"
    )
    extra = [(f"{t}.{n}", 2, "dim") for n in ("bias_k", "bias_v") if getattr(m, n, None) is not None]
    if m._qkv_same_embed_dim:
        qkv = [(f"{t}.in_proj_weight", 3)]
        in_weights = [(x, f"{t}.in_proj_weight") for x in dict.fromkeys([q, k, v])]
    else:
        qkv = [(f"{t}.{n}_proj_weight", 1) for n in "qkv"]
        in_weights = [(q, f"{t}.q_proj_weight"), (k, f"{t}.k_proj_weight"), (v, f"{t}.v_proj_weight")]
    fixed = [q] if not m._qkv_same_embed_dim else list(dict.fromkeys([q, k, v]))
    for a in fixed:  # the module checks query (and fused key/value) width == embed_dim
        s = cx.st(a)
        if isinstance(s, Table):
            cx.store.pin(s.ids, f"nn.MultiheadAttention at node {cx.node.name} needs input width == embed_dim")
    if m.in_proj_bias is not None:
        qkv.append((f"{t}.in_proj_bias", 3))
    bias = f"{t}.out_proj.bias" if m.out_proj.bias is not None else None
    out = heads_units(
        cx, q, h, e // h, m.out_proj.out_features, qkv, f"{t}.out_proj.weight", bias, extra, reason, in_weights
    )
    return [out, None]
