"""The masked reference's statistics: norms and reductions over a pruned unit dim, over the kept units only.

A stream analysed with ``layernorm_streams="prune"`` may lose units that a LayerNorm, an RMSNorm or
a mean/var/std/sum reduction runs over. The pruned model then computes that statistic over the kept
units; :func:`mask_statistics` rewrites a masked reference so it does the same: each such node
becomes :func:`masked_layer_norm`, :func:`masked_rms_norm` or :func:`masked_reduction` with a 0/1
mask of the kept units (norm outputs are 0 at the removed units). Written by hand: no library
offers masked norms over an arbitrary unit subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.errors import PassError

from ..analysis.unit_rules import op_name
from ..analysis.unit_rules.reductions import STATISTICS
from .prune_layout import PruneLayout, old_shape

Shape = int | list[int] | tuple[int, ...]


def _as_tuple(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _masked_layer_norm_stats(
    x: torch.Tensor, normalized_shape: Shape, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = _as_tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    m = mask.to(x.dtype)
    count = m.expand(shape).sum()
    mean = (x * m).sum(dims, keepdim=True) / count
    centred = (x - mean) * m
    rstd = torch.rsqrt((centred * centred).sum(dims, keepdim=True) / count + eps)
    return _affine(centred * rstd, weight, bias) * m, mean, rstd


def masked_layer_norm(
    x: torch.Tensor, normalized_shape: Shape, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``F.layer_norm`` whose mean and (biased) variance run over the positions where ``mask`` is 1
    only; the output is 0 where it is 0. ``mask`` broadcasts to ``normalized_shape``."""
    return _masked_layer_norm_stats(x, normalized_shape, weight, bias, eps, mask)[0]


def masked_native_layer_norm(
    x: torch.Tensor, normalized_shape: Shape, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`masked_layer_norm` for ``aten.native_layer_norm``: (output, mean, rstd)."""
    return _masked_layer_norm_stats(x, normalized_shape, weight, bias, eps, mask)


def masked_rms_norm(
    x: torch.Tensor, normalized_shape: Shape, weight: torch.Tensor | None, eps: float | None, mask: torch.Tensor
) -> torch.Tensor:
    """``F.rms_norm`` whose mean square runs over the positions where ``mask`` is 1 only; 0 where it is 0.
    ``eps=None`` is ``torch.finfo(x.dtype).eps``, as in ``F.rms_norm``."""
    shape = _as_tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    m = mask.to(x.dtype)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    ms = (x * x * m).sum(dims, keepdim=True) / m.expand(shape).sum()
    return _affine(x * torch.rsqrt(ms + eps), weight, None) * m


def masked_reduction(
    x: torch.Tensor, op: str, dims: Sequence[int], keepdim: bool, correction: float, mask: torch.Tensor
) -> Any:
    """``x.<op>(dims, keepdim)`` (``op`` in the analysis's ``STATISTICS``; var/std with ``correction``) over the
    positions where ``mask`` (broadcastable to ``x``) is 1 only."""
    m = mask.to(x.dtype).expand_as(x)
    dims = tuple(dims)
    total = (x * m).sum(dims, keepdim=True)
    if op == "sum":
        return total if keepdim else total.squeeze(dims)
    count = m.sum(dims, keepdim=True)
    mean = total / count
    out_mean = mean if keepdim else mean.squeeze(dims)
    if op == "mean":
        return out_mean
    centred = (x - mean) * m
    var = (centred * centred).sum(dims, keepdim=keepdim) / ((count if keepdim else count.squeeze(dims)) - correction)
    spread = var if op.startswith("var") else var.sqrt()
    return (spread, out_mean) if op.endswith("_mean") else spread


# ----------------------------------------------------------------------------- finding the nodes

_LN_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_RMS_ARGS = ("input", "normalized_shape", "weight", "eps")


def _call_args(n: fx.Node, names: tuple[str, ...], defaults: tuple[Any, ...]) -> list[Any]:
    return [n.args[i] if i < len(n.args) else n.kwargs.get(k, defaults[i]) for i, k in enumerate(names)]


def _module_norm(n: fx.Node, m: nn.Module) -> tuple[str, list[Any]] | None:
    if not isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return None
    if type(m).forward not in (nn.LayerNorm.forward, nn.RMSNorm.forward):
        raise PassError(f"norm module '{n.target}' ({type(m).__name__}) overrides forward",
                        "analyse with layernorm_streams='pin', or trace through the module")
    w = f"{n.target}.weight" if m.weight is not None else None
    if isinstance(m, nn.RMSNorm):
        return "rms", [n.args[0], tuple(m.normalized_shape), w, m.eps]
    b = f"{n.target}.bias" if m.bias is not None else None
    return "layer", [n.args[0], tuple(m.normalized_shape), w, b, m.eps]


def _norm_args(gm: fx.GraphModule, n: fx.Node) -> tuple[str, list[Any]] | None:
    """("layer" | "native" | "rms", its arguments) for a norm node, else None; a module's affine
    parameters are given by qualified name (str) or None."""
    if n.op == "call_module":
        return _module_norm(n, gm.get_submodule(n.target))
    name = op_name(n) if n.op == "call_function" else ""
    if name in ("layer_norm", "native_layer_norm"):
        return ("native" if name == "native_layer_norm" else "layer"), _call_args(n, _LN_ARGS, (None,) * 4 + (1e-5,))
    if name == "rms_norm":
        return "rms", _call_args(n, _RMS_ARGS, (None,) * 4)
    return None


def _reduction_args(n: fx.Node, rank: int) -> tuple[str, list[int], bool, float] | None:
    """(op, dims, keepdim, correction) of a mean/sum/var/std(_mean) node over explicit dims, else None."""
    if n.op not in ("call_function", "call_method") or op_name(n) not in STATISTICS:
        return None
    op, rest, kw = op_name(n), list(n.args[1:]), n.kwargs
    dim = rest[0] if rest else kw.get("dim")
    if isinstance(dim, torch.dtype) or any(isinstance(a, fx.Node) for a in (*rest, *kw.values())):
        return None
    dims = list(range(rank)) if dim is None or dim == [] else [int(d) % rank for d in _as_tuple(dim)]
    correction = 0.0
    if op in ("mean", "sum"):
        keepdim = rest[1] if len(rest) > 1 else kw.get("keepdim", False)
    else:
        flags = rest[1:]
        unbiased = flags[0] if flags else kw.get("unbiased", True)
        keepdim = flags[1] if len(flags) > 1 else kw.get("keepdim", False)
        correction = float(kw.get("correction", 1 if unbiased else 0))
    return op, dims, bool(keepdim), correction


def _mask(shape: tuple[int, ...], dim: int, kept: list[int], dims: range) -> torch.Tensor:
    mask = torch.zeros([shape[d] if d == dim else 1 for d in dims])
    mask.view(-1)[kept] = 1.0
    return mask


def mask_statistics(ref: fx.GraphModule, layout: PruneLayout) -> int:
    """Replace, in ``ref``, every norm or reduction whose statistics run over a dim that loses units by its
    masked form over the kept units (the input's pad-chain layout if it has one, else its group's);
    return how many nodes were replaced."""
    count = 0
    original: dict[str, str] = {}  # replacement node -> the node it replaced (layouts are keyed by the latter)
    for n in list(ref.graph.nodes):
        if n.op not in ("call_function", "call_method", "call_module") or not n.args:
            continue
        x = n.args[0]
        name = original.get(x.name, x.name) if isinstance(x, fx.Node) else None
        lay = (layout.pre_values.get(name) or layout.values.get(name)) if name is not None else None
        shape = old_shape(x) if lay is not None else None
        if shape is None:
            continue
        dim, kept = lay
        norm = _norm_args(ref, n)
        reduction = None if norm is not None else _reduction_args(n, len(shape))
        if norm is not None:
            kind, args = norm
            k = len(_as_tuple(args[1]))
            if dim < len(shape) - k:  # units off the normalised dims: the norm is per unit, nothing to mask
                continue
            buf_mask = _mask(shape, dim, kept, range(len(shape) - k, len(shape)))
            fn = {"layer": masked_layer_norm, "native": masked_native_layer_norm, "rms": masked_rms_norm}[kind]
        elif reduction is not None and dim in reduction[1]:
            buf_mask = _mask(shape, dim, kept, range(len(shape)))
            args, fn = [x, *reduction], masked_reduction
        else:
            continue
        buf = f"_zc_stat_mask_{count}"
        ref.register_buffer(buf, buf_mask)
        with ref.graph.inserting_before(n):
            args = [ref.graph.get_attr(a) if isinstance(a, str) and i in (2, 3) and norm else a
                    for i, a in enumerate(args)]
            masked = ref.graph.call_function(fn, (*args, ref.graph.get_attr(buf)))
        masked.meta = dict(n.meta)
        original[masked.name] = n.name
        n.replace_all_uses_with(masked)
        ref.graph.erase_node(n)
        count += 1
    if count:
        ref.recompile()
    return count
