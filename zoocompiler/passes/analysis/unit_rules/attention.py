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
    reason: str | None,
    in_weights: list[tuple[Any, str]],
) -> Table:
    """A fused attention layer: input consumed like a linear, heads as units (pinned with ``reason`` unless
    None), output fresh.

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
    if reason is not None:
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


def mha_prunable(m: nn.MultiheadAttention) -> bool:
    """Whether the prune pass can replace ``m`` by an explicit-width equivalent (fused q/k/v projection,
    no ``bias_k``/``bias_v``, no zero attention): then its heads and input width are prunable."""
    return m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn


@module_rule(nn.MultiheadAttention)
def rule_mha(cx: Cx, m: nn.MultiheadAttention) -> Any:
    """nn.MultiheadAttention: heads are units, the input is consumed like a linear, the output is fresh.

    Prunable when :func:`mha_prunable` (the prune pass then swaps in
    :class:`~zoocompiler.passes.rewrite.explicit_mha.ExplicitMultiheadAttention`); otherwise the heads
    and the query (and fused key/value) width are pinned, since the module derives ``head_dim`` from
    ``embed_dim`` and checks the query width.
    """
    t = cx.node.target
    q = cx.arg(0, "query")
    k, v = cx.arg(1, "key", q), cx.arg(2, "value", q)
    e, h = m.embed_dim, m.num_heads
    prunable = mha_prunable(m)
    reason = (
        f"nn.MultiheadAttention at node {cx.node.name} has separate k/v projections, bias_k/bias_v or "
        "add_zero_attn; its heads cannot be pruned"
    )
    extra = [(f"{t}.{n}", 2, "dim") for n in ("bias_k", "bias_v") if getattr(m, n, None) is not None]
    if m._qkv_same_embed_dim:
        qkv = [(f"{t}.in_proj_weight", 3)]
        in_weights = [(x, f"{t}.in_proj_weight") for x in dict.fromkeys([q, k, v])]
    else:
        qkv = [(f"{t}.{n}_proj_weight", 1) for n in "qkv"]
        in_weights = [(q, f"{t}.q_proj_weight"), (k, f"{t}.k_proj_weight"), (v, f"{t}.v_proj_weight")]
    fixed = [] if prunable else [q] if not m._qkv_same_embed_dim else list(dict.fromkeys([q, k, v]))
    for a in fixed:  # the module checks query (and fused key/value) width == embed_dim
        s = cx.st(a)
        if isinstance(s, Table):
            cx.store.pin(s.ids, f"nn.MultiheadAttention at node {cx.node.name} needs input width == embed_dim")
    if m.in_proj_bias is not None:
        qkv.append((f"{t}.in_proj_bias", 3))
    bias = f"{t}.out_proj.bias" if m.out_proj.bias is not None else None
    out = heads_units(
        cx, q, h, e // h, m.out_proj.out_features, qkv, f"{t}.out_proj.weight", bias, extra,
        None if prunable else reason, in_weights
    )
    return [out, None]


def _einsum_parts(cx: Cx) -> tuple[list[str], str, list[fx.Node]]:
    """The operand subscripts, the output subscripts and the operand nodes of a ``torch.einsum`` call; the
    forms this rule does not follow (ellipsis, implicit output, repeated letters) are a ``RuleFailure``."""
    equation = cx.val(cx.node.args[0])
    operands = list(cx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str):
        raise RuleFailure("einsum without a constant equation")
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    ins = lhs.split(",")
    if not arrow or "." in equation:
        raise RuleFailure(f"einsum {equation!r}: write the output subscripts explicitly, without '...'")
    if len(ins) != len(operands) or any(len(set(s)) != len(s) for s in (*ins, out)):
        raise RuleFailure(f"einsum {equation!r}: a repeated subscript (diagonal) or an operand count mismatch")
    for subs, node in zip(ins, operands, strict=True):
        shape = cx.shape(node)
        if shape is None or len(shape) != len(subs):
            raise RuleFailure(f"einsum {equation!r}: operand rank does not match its subscripts")
    return ins, out, operands


@function_rule("einsum")
def rule_einsum(cx: Cx) -> Any:
    """``torch.einsum`` by its equation: one operand whose output keeps every subscript is a permutation; two
    operands with shared (batch) subscripts, one subscript kept from each and one contracted are a batched
    matmul (``a[b..., n, k] @ b[b..., k, m]``, see :func:`contract`), permuted to the output's order. Other
    forms (sums over one operand's dims, several contracted or kept subscripts, three operands) fail closed."""
    ins, out, nodes = _einsum_parts(cx)
    if len(ins) == 1:
        if set(ins[0]) != set(out):
            raise RuleFailure("einsum that sums over a dim")
        return permute_state(cx.st(nodes[0]), [ins[0].index(c) for c in out])
    if len(ins) != 2:
        raise RuleFailure("einsum of more than two operands")
    a, b = ins
    if any(c not in out for c in a if c not in b) or any(c not in out for c in b if c not in a):
        raise RuleFailure("einsum that sums over a dim of one operand")
    batch = [c for c in out if c in a and c in b]
    n = [c for c in out if c in a and c not in b]
    m = [c for c in out if c in b and c not in a]
    k = [c for c in a if c in b and c not in out]
    if len(n) != 1 or len(m) != 1 or len(k) != 1:
        raise RuleFailure("einsum that is not one batched matmul (one kept subscript per operand, one contracted)")
    order_a, order_b = [a.index(c) for c in batch + n + k], [b.index(c) for c in batch + k + m]
    sha, shb = cx.shape(nodes[0]), cx.shape(nodes[1])
    inner = batch + n + m
    result = contract(
        cx,
        (permute_state(cx.st(nodes[0]), order_a), tuple(sha[i] for i in order_a)),
        (permute_state(cx.st(nodes[1]), order_b), tuple(shb[i] for i in order_b)),
        tuple(cx.out_shape[out.index(c)] for c in inner),
    )
    return permute_state(result, [inner.index(c) for c in out])
