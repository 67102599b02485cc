"""Trace a model to an fx GraphModule (the analysis passes run on top: ``passes.analysis.trace``).

Tracer order: (1) torch.fx symbolic tracing with the leaf modules and auto-wrapped
functions that timm registers for its FX feature extraction (torchvision's ops wrap
themselves with ``torch.fx.wrap``); (2) ``torch.export`` (non-strict) as a fallback for
models whose Python control flow depends on values, giving an ATen-level graph.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .core.errors import InputShapeError, TraceError
from .core.logs import captured_logs
from .core.text import first_line
from .ir import graph_info


def _timm_registries() -> tuple[set[type], list]:
    try:
        from timm.models import _features_fx as tfx
    except ImportError:  # timm is a dependency, but keep tracing usable without it
        return set(), []
    return set(tfx.get_notrace_modules()), list(tfx.get_notrace_functions())


class ZooTracer(fx.Tracer):
    """``fx.Tracer`` that keeps torch.nn modules and timm's registered no-trace modules as leaves."""

    def __init__(self, extra_leaf_modules: tuple[type, ...] = ()):
        leaf_types, functions = _timm_registries()
        super().__init__(autowrap_functions=tuple(functions))
        self.leaf_types = tuple(leaf_types) + tuple(extra_leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _optional_forward_args(model: nn.Module) -> dict[str, Any]:
    """Forward parameters after the first that have defaults (e.g. timm's ``attn_mask=None``)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """Remove placeholders fixed by ``concrete_args`` and the guard nodes fx adds for them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        dependents: list[fx.Node] = []
        frontier = [ph]
        while frontier:
            for user in frontier.pop().users:
                if user not in dependents:
                    dependents.append(user)
                    frontier.append(user)
        if any(d.op == "output" for d in dependents):
            continue
        for d in sorted(dependents, key=lambda n: -list(graph.nodes).index(n)):
            graph.erase_node(d)
        graph.erase_node(ph)


def _symbolic_trace(model: nn.Module, extra_leaf_modules: tuple[type, ...]) -> fx.GraphModule:
    tracer = ZooTracer(extra_leaf_modules)
    graph = tracer.trace(model, concrete_args=_optional_forward_args(model) or None)
    _drop_specialised_inputs(graph)
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.graph.lint()
    return gm


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Keep the graph dumps torch.export logs and prints when a trace attempt fails off the terminal."""
    with captured_logs(), contextlib.redirect_stderr(io.StringIO()):  # torch.export also prints failing graphs
        yield


def _export_trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """ATen-level graph from ``torch.export`` (dynamic batch dimension when possible)."""
    with _quiet_torch_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = next(iter(inspect.signature(model.forward).parameters))
        try:
            batch = torch.export.Dim("batch", min=1)
            exported = torch.export.export(
                model, (example_input,), dynamic_shapes={name: {0: batch}}, strict=False
            )
        except Exception:  # noqa: BLE001 - models that specialise the batch size export statically
            exported = torch.export.export(model, (example_input,), strict=False)
    gm = exported.module()
    # Drop the runtime guard call torch.export inserts; shapes are re-checked by our own passes.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _failing_module(model: nn.Module, err: BaseException) -> str:
    """Best effort: the module path whose forward raised during tracing."""
    tb = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        self_obj = frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module):
            for path, mod in model.named_modules():
                if mod is self_obj:
                    return path or "<root>"
    return "<unknown>"


def check_input(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run the model once; a shape/dtype mismatch becomes an ``InputShapeError``."""
    try:
        with torch.no_grad():
            model(example_input)
    except (RuntimeError, ValueError, AssertionError, TypeError) as err:
        raise InputShapeError(
            f"model rejects input of shape {tuple(example_input.shape)} ({first_line(err)})",
            "give an input shape the model accepts (inspect/export: --input-shape C,H,W, e.g. 3,224,224)",
        ) from err


def trace_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    extra_leaf_modules: tuple[type, ...] = (),
    allow_export_fallback: bool = True,
    check_first: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) to a GraphModule without annotations.

    Returns a GraphModule sharing the model's parameters; ``gm.meta["zc"].tracer`` records
    ``"fx"`` or ``"export"`` and ``.example_input`` the input. Raises ``InputShapeError`` if the
    model rejects the input and ``TraceError`` (naming the module path and op) if no tracer
    succeeds. ``check_first=False`` skips the model run that checks the input when fx tracing
    succeeds (for callers that run the graph on it next and raise ``InputShapeError`` themselves, as
    :func:`zoocompiler.passes.analysis.trace` does); the check still precedes the export fallback.
    """
    model = model.eval()
    if check_first:
        check_input(model, example_input)
    try:
        gm = _symbolic_trace(model, extra_leaf_modules)
        tracer_name = "fx"
    except Exception as fx_err:  # noqa: BLE001 - any tracing failure goes to the fallback
        if not check_first:
            check_input(model, example_input)  # a rejected input is an InputShapeError, not a TraceError
        if not allow_export_fallback:
            raise _trace_error(model, fx_err) from fx_err
        try:
            gm = _export_trace(model, example_input)
            tracer_name = "export"
        except Exception as export_err:  # noqa: BLE001
            raise _trace_error(model, fx_err) from export_err
    info = graph_info(gm)
    info.tracer = tracer_name
    info.example_input = example_input.detach().clone()
    return gm


def _trace_error(model: nn.Module, err: BaseException) -> TraceError:
    path = _failing_module(model, err)
    return TraceError(
        f"cannot trace module '{path}': {first_line(err)}",
        f"make it a leaf: zc.trace(model, x, extra_leaf_modules=(type(model.get_submodule('{path}')),))"
        if path not in ("<unknown>", "<root>")
        else "make the failing module a leaf via extra_leaf_modules=(...)",
    )
