"""Graph passes. Analysis passes annotate a GraphModule in place (idempotent);
rewrite passes return a new module and leave their input untouched.

``run_analysis(gm)`` runs the analysis pipeline in dependency order:
shapes → costs → cut points → unit groups.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager


def analysis_passes() -> list:
    """The analysis passes, in the order they must run."""
    from .costs import CostPass
    from .cut_points import CutPointPass
    from .shapes import ShapePass
    from .unit_groups import UnitGroupPass

    return [ShapePass(), CostPass(), CutPointPass(), UnitGroupPass()]


def run_analysis(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate ``gm`` with every analysis pass (needs ``gm.meta['zc'].example_input``)."""
    PassManager(passes=analysis_passes())(gm)
    return gm
