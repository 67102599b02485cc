"""Analysis passes: annotate a GraphModule in place (idempotent).

``run_analysis(gm)`` runs them in dependency order: shapes → costs → cut points → unit groups.
``layernorm_streams="prune"`` makes residual streams normalised by a LayerNorm prunable
(docs/prune.md, "LayerNorm streams"); the default pins them. ``trace(model, x)`` is
:func:`zoocompiler.tracing.trace_graph` followed by ``run_analysis``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.tracing import trace_graph


def analysis_passes(*, layernorm_streams: str = "pin") -> list:
    """The analysis passes, in the order they must run; those that need concrete values share one run
    of the example input (:class:`.values.SharedValues`, recorded by the first of them)."""
    from .costs import CostPass
    from .cut_points import CutPointPass
    from .shapes import ShapePass
    from .unit_groups import UnitGroupPass
    from .values import SharedValues

    shared = SharedValues()
    return [ShapePass(shared), CostPass(shared), CutPointPass(), UnitGroupPass(layernorm_streams, shared)]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic garbage collection (restored on exit): the analyses allocate many small objects
    (fx nodes, unit-member index lists), and collections triggered by them re-scan every live object."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_analysis(gm: fx.GraphModule, *, layernorm_streams: str = "pin") -> fx.GraphModule:
    """Annotate ``gm`` with every analysis pass (needs ``gm.meta['zc'].example_input``).

    ``layernorm_streams``: ``"pin"`` (default) or ``"prune"``, see :class:`.unit_groups.UnitGroupPass`.
    Errors raised by a pass (``PassError``, ``InputShapeError``) propagate with their own type.
    """
    with gc_paused():
        for analysis_pass in analysis_passes(layernorm_streams=layernorm_streams):
            # not torch.fx's PassManager: it re-raises every failure as a bare Exception, and a
            # PassError must reach the CLI as itself (one line, exit 2)
            analysis_pass(gm)
    return gm


def trace(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    analyze: bool = True,
    layernorm_streams: str = "pin",
    extra_leaf_modules: tuple[type, ...] = (),
    allow_export_fallback: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) and annotate it with every analysis pass.

    Returns a GraphModule sharing the model's parameters. ``gm.meta["zc"].tracer`` records
    ``"fx"`` or ``"export"``. Raises ``InputShapeError`` if the model rejects the input and
    ``TraceError`` (naming the module path and op) if no tracer succeeds. ``layernorm_streams``
    ("pin" or "prune") is passed to the unit-group analysis (see docs/prune.md).
    """
    with gc_paused():
        # with the analysis, the shape pass's run of the graph checks the input (same InputShapeError)
        gm = trace_graph(
            model,
            example_input,
            extra_leaf_modules=extra_leaf_modules,
            allow_export_fallback=allow_export_fallback,
            check_first=not analyze,
        )
        if analyze:
            run_analysis(gm, layernorm_streams=layernorm_streams)
    return gm
