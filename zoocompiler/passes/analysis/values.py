"""One run of the graph on its example input, shared by the passes that need concrete values.

:func:`record_values` runs the graph once with an ``fx.Interpreter`` (eval mode, no grad, counting FLOPs
with ``torch.utils.flop_counter``'s rules: a lean copy of ``FlopCounterMode``'s dispatch, or that mode
itself when a higher-order op runs) and keeps, per node, what the shape, cost and unit-group
passes read: a :class:`~.unit_rules.states.TensorSpec` (or list of them) for tensor values, the value
itself for anything else, the FLOPs of the node's ops and its output bytes. It writes
``node.meta["tensor_meta"]`` / ``["type"]`` as ``torch.fx.passes.shape_prop.ShapeProp`` does (its
``requires_grad`` is False: no grad, so that e.g. ``nn.MultiheadAttention`` takes the inference path
``FlopCounterMode`` sees on the module itself).
:class:`SharedValues` hands one record to every pass of one ``run_analysis`` (a pass run alone records
its own). :func:`alt_batch_values` gives the values of shape-like nodes at the example batch + 1, on
the meta device when the graph allows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from zoocompiler.core.errors import InputShapeError, PassError
from zoocompiler.core.modules import countable_attention, eval_mode
from zoocompiler.core.text import first_line
from zoocompiler.ir import graph_info

from .unit_rules.states import TensorSpec


@dataclass
class ValueRecord:
    """What one run on the example input recorded (node-keyed; ``x`` is the input it ran on)."""

    x: torch.Tensor
    specs: dict[fx.Node, Any] = field(default_factory=dict)  # TensorSpec / list of them / the Python value
    plain: dict[fx.Node, Any] = field(default_factory=dict)  # values that hold no tensor, unconverted
    holds_tensor: dict[fx.Node, bool] = field(default_factory=dict)  # a tensor, or a tuple/list with one
    flops: dict[fx.Node, int] = field(default_factory=dict)
    act_bytes: dict[fx.Node, int] = field(default_factory=dict)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(int(s) for s in value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return [_spec(v) for v in value]
    return value


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


_SIZE_QUERIES = {  # ops FlopCounterMode leaves to the next handler (its own list)
    torch.ops.aten.sym_is_contiguous.default,
    torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format,
    torch.ops.aten.is_strides_like_format.default,
    torch.ops.aten.is_non_overlapping_and_dense.default,
    torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default,
    torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default,
    torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.dim.default,
    torch.ops.prim.layout.default,
}


class _NeedsFlopCounterMode(Exception):
    """A higher-order op (``cond``, ...) ran: only ``FlopCounterMode`` itself counts those."""


def _decomposes(func: torch._ops.OpOverload) -> bool:
    """Whether ``func.decompose`` would do anything (it has a CompositeImplicitAutograd kernel)."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


class _FlopCount(TorchDispatchMode):
    """``FlopCounterMode``'s counting (its formula registry ``flop_registry``, its decompositions, its list of
    ops passed through) without its per-module bookkeeping: one running total, read before and after a node."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._decomposes: dict[Any, bool] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs if kwargs else {}
        if func in _SIZE_QUERIES:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            raise _NeedsFlopCounterMode
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            decomposes = self._decomposes.get(func)
            if decomposes is None:
                decomposes = self._decomposes[func] = _decomposes(func)
            if decomposes:
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        out = func(*args, **kwargs)
        formula = flop_registry.get(packet)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class _FullCount:
    """``FlopCounterMode`` itself, read like :class:`_FlopCount` (for graphs with higher-order ops)."""

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)

    @property
    def total(self) -> int:
        return sum(self.mode.flop_counts["Global"].values())

    def __enter__(self) -> _FullCount:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


class _Recorder(fx.Interpreter):
    """Interpreter that records, per node, ShapeProp's ``tensor_meta`` and ``type`` (as ``ShapeProp.run_node``
    does, without its traceback print) plus specs, FLOPs and output bytes."""

    def __init__(self, gm: fx.GraphModule, record: ValueRecord, counter: _FlopCount | _FullCount):
        super().__init__(gm)
        self.record = record
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.total
        result = super().run_node(n)
        rec = self.record
        rec.flops[n] = int(self.counter.total - before)
        rec.act_bytes[n] = _tensor_bytes(result) if n.op not in ("get_attr", "output") else 0
        found = False

        def tensor_meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        rec.holds_tensor[n] = isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in result)
        )
        rec.specs[n] = _spec(result)
        if not rec.holds_tensor[n]:
            rec.plain[n] = result  # as computed (torch.Size stays torch.Size): the shape pass keeps these
        return result


def rejects_input(x: torch.Tensor, err: BaseException) -> InputShapeError:
    """The error for a graph (or model) that fails on ``x`` (the same text as ``tracing.check_input``)."""
    return InputShapeError(
        f"model rejects input of shape {tuple(x.shape)} ({first_line(err)})",
        "give an input shape the model accepts (inspect/export: --input-shape C,H,W, e.g. 3,224,224)",
    )


def record_values(gm: fx.GraphModule, *inputs: torch.Tensor) -> ValueRecord:
    """Run ``gm`` once (eval mode, no grad) on ``inputs`` (default: its example input) and record every node.

    Also writes ``node.meta["tensor_meta"]`` and ``["type"]`` as ShapeProp does. A failing run is an
    ``InputShapeError``; a graph without example input a ``PassError``.
    """
    if not inputs:
        x = graph_info(gm).example_input
        if x is None:
            raise PassError("graph has no example input", "trace it with zoocompiler.trace(model, example_input)")
        inputs = (x,)
    for counter in (_FlopCount(), _FullCount()):
        record = ValueRecord(inputs[0])
        try:
            with eval_mode(gm), torch.no_grad(), countable_attention(), counter:
                _Recorder(gm, record, counter).run(*inputs)
            return record
        except _NeedsFlopCounterMode:
            continue
        except Exception as err:  # noqa: BLE001 - any failure here means the input does not fit
            raise rejects_input(inputs[0], err) from err
    raise AssertionError("unreachable: FlopCounterMode handles every op")


class SharedValues:
    """The :class:`ValueRecord` of one graph, recorded on first use and then shared by the passes."""

    def __init__(self) -> None:
        self._gm: fx.GraphModule | None = None
        self._record: ValueRecord | None = None

    def get(self, gm: fx.GraphModule) -> ValueRecord:
        """The record of ``gm`` (recorded now if this holder has none for ``gm`` and its example input)."""
        x = graph_info(gm).example_input
        if self._record is None or self._gm is not gm or self._record.x is not x:
            self._record, self._gm = record_values(gm), gm
        return self._record


def values_of(gm: fx.GraphModule, shared: SharedValues | None) -> ValueRecord:
    """``shared``'s record of ``gm``, or a fresh one when no holder is given."""
    return shared.get(gm) if shared is not None else record_values(gm)


# ----------------------------------------------------------------------------- batch + 1


def _alt_batch(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x[:1]], dim=0)


class _Subset(fx.Interpreter):
    """Runs only the ``needed`` nodes (a set closed under inputs) and keeps their values."""

    def __init__(self, gm: fx.GraphModule, needed: set[fx.Node]):
        super().__init__(gm)
        self.needed = needed
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n not in self.needed:
            return None
        result = super().run_node(n)
        self.values[n] = result
        return result


class _OnMeta(nn.Module):
    """Holds the graph as a submodule so ``torch.func.functional_call`` can swap in meta parameters."""

    def __init__(self, gm: fx.GraphModule, needed: set[fx.Node]):
        super().__init__()
        self.gm = gm
        self.needed = needed

    def forward(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        run = _Subset(self.gm, self.needed)
        run.run(x)
        return run.values


def _needed(wanted: list[fx.Node]) -> set[fx.Node]:
    needed: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    return needed


META_S_PER_NODE = 5e-4  # rough cost of running one node on the meta device (Python shape rules)
REAL_FLOPS_PER_S = 2e10  # rough single-thread CPU speed of a real run


def alt_batch_values(
    gm: fx.GraphModule, x: torch.Tensor, wanted: list[fx.Node], flops: dict[fx.Node, int] | None = None
) -> dict[fx.Node, Any]:
    """Values of the ``wanted`` nodes (and their inputs) with one more sample than ``x`` (eval mode, no grad).

    Runs for real, or on the meta device (shapes only, parameters swapped in by
    ``torch.func.functional_call``) when the FLOPs of the nodes to run (``flops``: per node at ``x``)
    make that the cheaper way; both give the same values, and a graph that cannot run on meta
    (data-dependent ops, constants on another device) runs for real.
    """
    if not wanted:
        return {}
    needed = _needed(wanted)
    alt = _alt_batch(x)
    work = sum((flops or {}).get(n, 0) for n in needed) * alt.shape[0] / max(1, x.shape[0])
    with eval_mode(gm), torch.no_grad():
        if work / REAL_FLOPS_PER_S > META_S_PER_NODE * len(needed):
            try:
                tensors = {f"gm.{k}": v.to("meta") for k, v in gm.named_parameters(remove_duplicate=False)}
                tensors.update({f"gm.{k}": v.to("meta") for k, v in gm.named_buffers(remove_duplicate=False)})
                values = torch.func.functional_call(_OnMeta(gm, needed), tensors, (alt.to("meta"),))
                if all(not isinstance(v, torch.Tensor) or v.device.type == "meta" for v in values.values()):
                    return values
            except Exception:  # noqa: BLE001 - shapes-only run not possible: run for real below
                pass
        run = _Subset(gm, needed)
        try:
            run.run(alt)
        except Exception as err:  # noqa: BLE001 - any failure here means the input does not fit
            raise InputShapeError(
                f"graph fails on input of shape {tuple(alt.shape)}: {first_line(err)}",
                "use an input shape the model accepts",
            ) from err
        return run.values
