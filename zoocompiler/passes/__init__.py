"""Graph passes. Analysis passes annotate a GraphModule in place (idempotent);
rewrite passes return a new module and leave their input untouched.

``run_analysis(gm)`` runs the analysis pipeline in dependency order:
shapes → costs → cut points → unit groups. ``layernorm_streams="prune"`` makes residual streams
normalised by a LayerNorm prunable (docs/prune.md, "LayerNorm streams"); the default pins them.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager


def analysis_passes(*, layernorm_streams: str = "pin") -> list:
    """The analysis passes, in the order they must run."""
    from .costs import CostPass
    from .cut_points import CutPointPass
    from .shapes import ShapePass
    from .unit_groups import UnitGroupPass

    return [ShapePass(), CostPass(), CutPointPass(), UnitGroupPass(layernorm_streams)]


def run_analysis(gm: fx.GraphModule, *, layernorm_streams: str = "pin") -> fx.GraphModule:
    """Annotate ``gm`` with every analysis pass (needs ``gm.meta['zc'].example_input``).

    ``layernorm_streams``: ``"pin"`` (default) or ``"prune"``, see :class:`.unit_groups.UnitGroupPass`.
    """
    PassManager(passes=analysis_passes(layernorm_streams=layernorm_streams))(gm)
    return gm
