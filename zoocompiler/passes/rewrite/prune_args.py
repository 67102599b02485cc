"""Rewrite the node arguments of a pruned graph that encode unit counts, and check every shape.

:class:`ArgRewriter` runs the pruned graph once on the example input. Before each node runs, its
size-encoding arguments are rewritten from the *expected* new shapes (old shape minus the removed
positions along unit dims, see :mod:`.prune_layout`): reshape/view/expand/unflatten sizes, split /
chunk sections, getitem slices, narrow/select/slice positions, functional group_norm groups,
layer_norm/rms_norm shapes (functional, ``nn.LayerNorm``, ``nn.RMSNorm``), conv groups and GroupNorm
module groups; a batch-independent size read from another tensor's pruned unit count is set to the
expected one. After it runs, its output shape must equal the expected one; anything else raises
``PassError`` naming the node and op (fail closed).
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from zoocompiler.core.errors import PassError
from zoocompiler.core.text import first_line
from zoocompiler.ir import node_info

from ..analysis.unit_rules import op_name

Layout = tuple[int, list[int], int]  # (dim, kept old positions, old size)
_SIZE_OPS = {"reshape", "view", "expand", "broadcast_to", "new_zeros", "new_ones", "new_empty", "new_full"}
_FACTORY_OPS = {"zeros", "ones", "empty", "full", "rand", "randn"}
_SPLIT_OPS = {"split", "chunk", "split_with_sizes", "unsafe_split", "unsafe_chunk", "tensor_split", "unbind"}
_CONV_FUNCTIONS = {"conv1d", "conv2d", "conv3d"}
FIX = "keep the unit groups this op touches unpruned (remove them from the plan)"


class ArgRewriter(ShapeProp):
    """Interpreter over the pruned graph that rewrites size arguments in place and checks shapes
    (a ``ShapeProp``: it also refreshes every node's ``tensor_meta``).

    ``expected``: node name → expected output shape (nodes not listed are not checked);
    ``layouts``: node name → layout of that value in the pruned graph (only values that lost positions);
    ``orig``: node name → node of the original graph (for batch-dependence of shape values);
    ``orig_gm``: the original module (for module attributes such as GroupNorm's num_groups);
    ``sliced``: parameter name → {dim: (old size, kept count)} (for views of sliced parameters).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        expected: dict[str, tuple[int, ...]],
        layouts: dict[str, Layout],
        orig: dict[str, fx.Node],
        orig_gm: fx.GraphModule,
        sliced: dict[str, dict[int, tuple[int, int]]] | None = None,
    ):
        super().__init__(gm)
        self.expected, self.layouts, self.orig, self.orig_gm = expected, layouts, orig, orig_gm
        self.sliced = sliced or {}

    # ------------------------------------------------------------------ driver

    def run_node(self, n: fx.Node) -> Any:
        op = op_name(n) if n.op in ("call_function", "call_method") else str(n.target)
        try:
            self._rewrite(n, op)
            result = super().run_node(n)
        except PassError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the rewritten graph names its node
            raise PassError(f"pruned graph fails at node {n.name} ({op}): {first_line(err)}", FIX) from err
        want = self.expected.get(n.name)
        if want is not None and isinstance(result, torch.Tensor) and tuple(result.shape) != tuple(want):
            raise PassError(
                f"pruned graph has shape {list(result.shape)} at node {n.name} ({op}), expected {list(want)}", FIX
            )
        return result

    def _fail(self, n: fx.Node, op: str, why: str) -> None:
        raise PassError(f"cannot rewrite {op} at node {n.name}: {why}", FIX)

    def _layout(self, a: Any) -> Layout | None:
        return self.layouts.get(a.name) if isinstance(a, fx.Node) else None

    def _value(self, a: Any) -> Any:
        return self.env[a] if isinstance(a, fx.Node) else a

    def _rewrite(self, n: fx.Node, op: str) -> None:
        if n.op == "call_module":
            self._module(n)
        elif n.op not in ("call_function", "call_method"):
            return
        elif op in _SIZE_OPS or op in _FACTORY_OPS:
            self._sizes(n, op)
        elif op == "unflatten":
            self._unflatten(n, op)
        elif op in _SPLIT_OPS:
            self._split(n, op)
        elif op == "getitem":
            self._getitem(n, op)
        elif op in ("narrow", "select", "slice"):
            self._positional(n, op)
        elif op == "group_norm":
            self._group_norm_fn(n, op)
        elif op in ("layer_norm", "native_layer_norm", "rms_norm"):
            self._layer_norm_fn(n, op)
        elif op in _CONV_FUNCTIONS:
            self._conv_fn(n, op)

    # ------------------------------------------------------------------ helpers

    def _arg(self, n: fx.Node, i: int, name: str, default: Any = None) -> tuple[str | int, Any]:
        """(where, value) of the ``i``-th argument after the tensor input (``self`` of a method)."""
        j = i + 1
        if j < len(n.args):
            return j, n.args[j]
        return name, n.kwargs.get(name, default)

    def _set(self, n: fx.Node, where: str | int, value: Any) -> None:
        if isinstance(where, int):
            args = list(n.args)
            args[where] = value
            n.args = tuple(args)
        else:
            kwargs = dict(n.kwargs)
            kwargs[where] = value
            n.kwargs = kwargs

    def _batch_independent(self, e: fx.Node) -> bool:
        """Whether shape value ``e`` had the same value at batch + 1 (or was not measured there)."""
        info = node_info(self.orig[e.name]) if e.name in self.orig else None
        return info is None or info.shape_value_alt_batch is None or info.shape_value_alt_batch == info.shape_value

    def _scaled(self, n: fx.Node, e: fx.Node, old: int, new: int) -> Any:
        """A replacement for shape value ``e`` (old value ``old``) that evaluates to ``new``."""
        if self._batch_independent(e):
            return new  # batch-independent: a constant
        g = math.gcd(old, new)
        with self.graph.inserting_before(n):
            div = self.graph.call_function(operator.floordiv, (e, old // g))
            mul = self.graph.call_function(operator.mul, (div, new // g))
        self.env[div] = self.env[e] // (old // g)
        self.env[mul] = self.env[div] * (new // g)
        return mul

    def _fixed_sizes(self, n: fx.Node, op: str, sizes: list, want: tuple[int, ...], old: tuple[int, ...]) -> list:
        if len(sizes) != len(want) or len(old) != len(want):
            self._fail(n, op, f"{len(sizes)} size arguments for a rank-{len(want)} result")
        out = list(sizes)
        for i, e in enumerate(sizes):
            actual = self._value(e)
            if not isinstance(actual, int) or actual == -1 or actual == want[i]:
                continue
            if actual != old[i]:  # read from another tensor's (pruned) unit count: BEiT's reshape(B, N, C)
                if not (isinstance(e, fx.Node) and self._batch_independent(e)):
                    self._fail(n, op, f"size argument {i} is {actual}; expected {want[i]} (was {old[i]})")
                out[i] = want[i]
                continue
            out[i] = self._scaled(n, e, old[i], want[i]) if isinstance(e, fx.Node) else want[i]
        return out

    def _old_want(self, n: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        want = self.expected.get(n.name)
        orig = self.orig.get(n.name)
        tm = orig.meta.get("tensor_meta") if orig is not None else None
        if want is None or not hasattr(tm, "shape"):
            return None
        old = tuple(int(s) for s in tm.shape)
        changed_size = any(isinstance(self._value(a), int) and a.name in self.orig
                           and self._value(a) != getattr(node_info(self.orig[a.name]), "shape_value", None)
                           for a in n.all_input_nodes)
        return (old, want) if old != tuple(want) or changed_size else None

    # ------------------------------------------------------------------ rules

    def _param_view(self, n: fx.Node, op: str) -> None:
        """A view/reshape of a tensor computed from sliced parameters alone (no expected shape: the slicing
        decides it), e.g. ``scale.view(C, 1, 1)`` or ``bias_table[index].view(N, N, heads)``: the one literal
        size equal to a sliced dim's old size of those parameters becomes its kept count."""
        x = n.args[0] if n.args else None
        tm = self.orig[x.name].meta.get("tensor_meta") if isinstance(x, fx.Node) and x.name in self.orig else None
        rest = list(n.args[1:])
        sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if op not in ("view", "reshape") or tm is None or not all(isinstance(v, int) for v in sizes):
            return
        if self._value(x).numel() == math.prod(tm.shape):
            return
        params, todo, seen = set(), [x], set()
        while todo:
            a = todo.pop()
            if a.name in seen:
                continue
            seen.add(a.name)
            if a.op == "get_attr":
                params.add(a.target)
            todo.extend(a.all_input_nodes)
        dims = [(d - self.orig_gm.get_parameter(p).dim() if p in dict(self.orig_gm.named_parameters()) else None,
                 old, kept) for p in params for d, (old, kept) in self.sliced.get(p, {}).items()]
        # the same dim counted from the end (bias_table[index] keeps the heads last), else a unique old size
        hits = {len(sizes) + e: kept for e, old, kept in dims if e is not None and -len(sizes) <= e
                and sizes[len(sizes) + e] == old}
        if len(hits) != 1:
            hits = {i: kept for i, v in enumerate(sizes) for _, old, kept in dims if v == old}
        if len(hits) != 1:
            return  # ambiguous or nothing to change: the run fails and names the node
        (i, kept), = hits.items()
        sizes[i] = kept
        n.args = (n.args[0], tuple(sizes)) if len(rest) == 1 else (n.args[0], *sizes)

    def _sizes(self, n: fx.Node, op: str) -> None:
        ow = self._old_want(n)
        if ow is None:
            self._param_view(n, op)
            return
        old, want = ow
        start = 0 if op in _FACTORY_OPS and n.op == "call_function" else 1
        rest = list(n.args[start:])
        if op == "new_full" or (op == "full" and n.op == "call_function"):
            rest = rest[:1]
        if "size" in n.kwargs or "shape" in n.kwargs:
            key = "size" if "size" in n.kwargs else "shape"
            sizes = n.kwargs[key]
            if isinstance(sizes, fx.Node):
                self._fail(n, op, "sizes come from a computed shape value")
            self._set(n, key, type(sizes)(self._fixed_sizes(n, op, list(sizes), want, old)))
            return
        if len(rest) >= 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            new = self._fixed_sizes(n, op, list(rest[0]), want, old)
            self._set(n, start, tuple(new))
        elif len(rest) == 1 and isinstance(rest[0], fx.Node) and not isinstance(self._value(rest[0]), int):
            value = tuple(self._value(rest[0]))
            inferred = sum(v == -1 for v in value) == 1 and all(v in (-1, w) for v, w in zip(value, want))
            if value != tuple(want) and not (len(value) == len(want) and inferred):  # -1 takes the pruned size
                self._fail(n, op, f"sizes come from a computed shape value {list(value)}; expected {list(want)}")
        else:
            new = self._fixed_sizes(n, op, rest, want, old)
            n.args = tuple(n.args[:start]) + tuple(new) + tuple(n.args[start + len(rest) :])

    def _unflatten(self, n: fx.Node, op: str) -> None:
        ow = self._old_want(n)
        if ow is None:
            return
        old, want = ow
        where_d, d = self._arg(n, 0, "dim")
        where_s, sizes = self._arg(n, 1, "sizes")
        d = d % (len(want) - len(sizes) + 1)
        span = slice(d, d + len(sizes))
        self._set(n, where_s, tuple(self._fixed_sizes(n, op, list(sizes), want[span], old[span])))

    def _split(self, n: fx.Node, op: str) -> None:
        x = n.args[0]
        lay = self._layout(x)
        if lay is None:
            return
        ud, kept, old_size = lay
        rank = self._value(x).dim()
        default = 0
        where_d, d = self._arg(n, 1, "dim", default) if op != "unbind" else self._arg(n, 0, "dim", default)
        if d % rank != ud:
            return
        if op == "unbind":
            self._fail(n, op, "unbind along a pruned unit dim changes the number of outputs")
        tm = self.orig[n.name].meta.get("tensor_meta")
        if not isinstance(tm, (tuple, list)):
            self._fail(n, op, "section sizes of the original split are unknown")
        bounds = [0]
        for t in tm:
            bounds.append(bounds[-1] + int(t.shape[ud]))
        new = [bisect.bisect_left(kept, e) - bisect.bisect_left(kept, s) for s, e in zip(bounds, bounds[1:])]
        if min(new) == 0:
            self._fail(n, op, f"a section loses all its units (sections {new})")
        if op in ("chunk", "unsafe_chunk") and len(set(new)) == 1:
            return  # equal sections: chunk(k) still splits them right
        if n.op == "call_method":
            n.target = "split"
            n.args, n.kwargs = (x, new, ud), {}
        else:
            n.target = torch.split
            n.args, n.kwargs = (x, new), {"dim": ud}

    def _getitem(self, n: fx.Node, op: str) -> None:
        x = n.args[0]
        lay = self._layout(x)
        if lay is None or not isinstance(self._value(x), torch.Tensor):
            return
        ud, kept, old_size = lay
        idx = n.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        rank = self._value(x).dim()
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        dim, out = 0, []
        for it in items:
            if it is Ellipsis:
                dim += rank - consuming
            elif it is not None:
                if dim == ud:
                    it = self._remap(n, op, it, kept, old_size)
                dim += 1
            out.append(it)
        n.args = (x, tuple(out) if isinstance(idx, tuple) else out[0])

    def _remap(self, n: fx.Node, op: str, it: Any, kept: list[int], size: int) -> Any:
        def pos(p: int) -> int:
            return bisect.bisect_left(kept, min(max(p + size if p < 0 else p, 0), size))

        if isinstance(it, slice):
            parts = (it.start, it.stop, it.step)
            if any(isinstance(p, fx.Node) for p in parts) or it.step not in (None, 1):
                self._fail(n, op, f"slice {it} on a pruned unit dim")
            return slice(None if it.start is None else pos(it.start), None if it.stop is None else pos(it.stop))
        if isinstance(it, int):
            p = it + size if it < 0 else it
            if p not in set(kept):
                self._fail(n, op, f"index {it} selects a removed unit position")
            return pos(p)
        self._fail(n, op, f"index {it!r} on a pruned unit dim")

    def _positional(self, n: fx.Node, op: str) -> None:
        x = n.args[0]
        lay = self._layout(x)
        if lay is None:
            return
        ud, kept, size = lay
        rank = self._value(x).dim()
        where_d, d = self._arg(n, 0, "dim")
        if d % rank != ud:
            return
        pos = lambda p: bisect.bisect_left(kept, min(max(p + size if p < 0 else p, 0), size))  # noqa: E731
        if op == "select":
            where_i, i = self._arg(n, 1, "index")
            i = i + size if i < 0 else i
            if i not in set(kept):
                self._fail(n, op, f"index {i} selects a removed unit position")
            self._set(n, where_i, pos(i))
        elif op == "narrow":
            where_s, s = self._arg(n, 1, "start")
            where_l, length = self._arg(n, 2, "length")
            start = s + size if s < 0 else s
            self._set(n, where_s, pos(start))
            self._set(n, where_l, pos(start + length) - pos(start))
        else:  # aten.slice(x, dim, start, end, step)
            where_s, s = self._arg(n, 1, "start")
            where_e, e = self._arg(n, 2, "end")
            _, step = self._arg(n, 3, "step", 1)
            if step != 1:
                self._fail(n, op, f"step {step} on a pruned unit dim")
            if s is not None:
                self._set(n, where_s, pos(s))
            if e is not None:
                self._set(n, where_e, pos(min(e, size)))

    def _group_norm_fn(self, n: fx.Node, op: str) -> None:
        x = n.args[0]
        lay = self._layout(x)
        if lay is None or lay[0] != 1:
            return
        where, groups = self._arg(n, 0, "num_groups")
        self._set(n, where, self._groups(n, op, groups, len(lay[1]), lay[2]))

    def _groups(self, n: fx.Node, op: str, groups: int, new_c: int, old_c: int) -> int:
        if (groups * new_c) % old_c:
            self._fail(n, op, f"{new_c} channels do not split into whole norm groups of {old_c // groups}")
        return groups * new_c // old_c

    def _layer_norm_fn(self, n: fx.Node, op: str) -> None:
        where, shape = self._arg(n, 0, "normalized_shape")
        want = tuple(self._value(n.args[0]).shape[len(self._value(n.args[0]).shape) - len(shape) :])
        if tuple(shape) != want:
            self._set(n, where, want)

    def _conv_fn(self, n: fx.Node, op: str) -> None:
        where, groups = self._arg(n, 5, "groups", 1)
        x, w = self._value(n.args[0]), self._value(n.args[1])
        if groups != 1 and x.shape[1] != w.shape[1] * groups:
            self._set(n, where, x.shape[1] // w.shape[1])

    def _module(self, n: fx.Node) -> None:
        m = self.module.get_submodule(n.target)
        plain_ln = isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and type(m).forward in (nn.LayerNorm.forward,
                                                                                    nn.RMSNorm.forward)
        if plain_ln and isinstance(self._value(n.args[0]), torch.Tensor):
            x = self._value(n.args[0])  # normalized_shape follows the input (also without an affine)
            m.normalized_shape = tuple(x.shape[x.dim() - len(m.normalized_shape) :])
        if isinstance(m, nn.GroupNorm):
            lay = self._layout(n.args[0])
            if lay is not None and lay[0] == 1:
                om = self.orig_gm.get_submodule(n.target)
                m.num_groups = self._groups(n, "group_norm", om.num_groups, len(lay[1]), om.num_channels)
                m.num_channels = len(lay[1])
