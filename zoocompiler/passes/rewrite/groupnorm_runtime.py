"""GroupNorm in the form ONNX Runtime runs fastest (issue 19, measured in docs/bench_slice.md).

``torch.onnx`` writes an affine ``nn.GroupNorm`` as Reshape → InstanceNormalization → Reshape → Mul → Add: the
per-channel affine map costs two passes over the activation. ONNX Runtime (1.32) has no CPU kernel for
opset-18/21 ``GroupNormalization``; it expands that function into about ten elementwise ops, which measured
slower still. :func:`runtime_groupnorm` rewrites every affine GroupNorm module of a graph into
:class:`GroupNormThenAffine`: the statistics without affine (Reshape → InstanceNormalization → Reshape) and the
affine map as one inference ``BatchNormalization`` with mean 0, variance 1 and epsilon 0 (γ·x̂ + β, one pass,
NCHWc-capable). The function is the same up to float rounding; GroupNorm's statistics depend on the input, so
they cannot be folded into the convolution the way BatchNorm's are.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class GroupNormThenAffine(nn.Module):
    """``gn`` (an affine ``nn.GroupNorm`` or timm ``GroupNormAct``) as group_norm without affine followed by the
    affine map written as an inference batch_norm. Shares ``gn``'s weight and bias (same state-dict keys) and
    keeps a timm activation/dropout."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = gn.num_groups, gn.eps
        self.weight, self.bias = gn.weight, gn.bias
        channels = gn.weight.shape[0]
        self.register_buffer("zero", torch.zeros(channels, dtype=gn.weight.dtype), persistent=False)
        self.register_buffer("one", torch.ones(channels, dtype=gn.weight.dtype), persistent=False)
        self.drop = getattr(gn, "drop", nn.Identity())
        self.act = getattr(gn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.num_groups, eps=self.eps)
        y = F.batch_norm(y, self.zero, self.one, self.weight, self.bias, False, 0.0, 0.0)
        return self.act(self.drop(y))


def _affine_groupnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.GroupNorm) and module.affine and module.weight is not None


def runtime_groupnorm(gm: fx.GraphModule) -> int:
    """Replace, in place, every affine GroupNorm module ``gm`` calls by :class:`GroupNormThenAffine` (same function,
    same parameters); returns how many. Modules without affine are left alone (there is no map to move)."""
    paths = dict.fromkeys(str(n.target) for n in gm.graph.nodes
                          if n.op == "call_module" and _affine_groupnorm(gm.get_submodule(str(n.target))))
    for path in paths:
        owner, _, attr = path.rpartition(".")
        parent = gm.get_submodule(owner) if owner else gm
        setattr(parent, attr, GroupNormThenAffine(gm.get_submodule(path)).train(parent.training))
    return len(paths)
