"""Pre-activations of a model run: what NASWOT's binary codes are read from.

``record_preactivations(model, batch, layers, record)`` runs ``batch`` once in eval mode and calls
``record`` with every activation's *input* as (N, D): via forward pre-hooks on activation modules
(torch's and timm's) and, for every ``fx.GraphModule`` in the model (top-level or nested), via an
interpreter that sees the functional activations (``F.relu``, ``torch.relu``, ``x.relu()``, the aten
ops of ``torch.export``). ``layers="outputs"`` records the model output only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from zoocompiler.core.errors import SolverError
from zoocompiler.core.modules import eval_mode

# Activation modules hooked by layers="relu". Gates (Sigmoid, Hardsigmoid, Tanh) are not activations
# of a layer's units here: they scale other tensors (squeeze-excite), so their sign codes are skipped.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
)  # fmt: skip
_ATEN_ACTIVATIONS = (  # what torch.export leaves of them (ReLU6 becomes hardtanh)
    "relu", "relu_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "elu", "elu_",
    "celu", "selu", "gelu", "silu", "silu_", "mish", "hardswish", "hardswish_",
)  # fmt: skip
ACTIVATION_FUNCTIONS: frozenset = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.leaky_relu_, F.prelu,
     F.rrelu, F.elu, F.elu_, F.celu, F.selu, F.gelu, F.silu, F.mish, F.hardswish}
    | {getattr(torch.ops.aten, name).default for name in _ATEN_ACTIVATIONS}
)  # fmt: skip
ACTIVATION_METHODS: frozenset[str] = frozenset({"relu", "relu_"})  # x.relu() in a traced graph


def _timm_activation_modules() -> tuple[type[nn.Module], ...]:
    """timm's own activation classes (not subclasses of torch's), when timm is installed."""
    try:
        from timm.layers import activations, activations_me
    except ImportError:  # timm is a dependency, but the proxy does not need it
        return ()
    names = ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardMish")
    found = [getattr(activations, n) for n in names if hasattr(activations, n)]
    found += [getattr(activations_me, n) for n in ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe")
              if hasattr(activations_me, n)]  # fmt: skip
    return tuple(found)


def activation_codes(model: nn.Module, batch: torch.Tensor, *, layers: str = "relu") -> np.ndarray:
    """The (N, D) codes ``naswot`` scores for one batch, in execution order (for inspection and tests)."""
    parts: list[torch.Tensor] = []
    record_preactivations(model, batch, layers, lambda x: parts.append((x > 0).cpu()))
    return torch.cat(parts, dim=1).numpy()


def record_preactivations(
    model: nn.Module, batch: torch.Tensor, layers: str, record: Callable[[torch.Tensor], None]
) -> None:
    """Forward ``batch`` once in eval mode, calling ``record`` on each pre-activation (or the output) as (N, D).

    A hooked tensor whose first dimension is not the batch (e.g. windows folded into it) is an error, not a
    guess at which rows belong to which sample.
    """
    if layers not in ("relu", "outputs"):
        raise SolverError(f"unknown naswot layers {layers!r}", "use layers='relu' or layers='outputs'")
    calls = 0

    def counted(x: torch.Tensor) -> None:
        nonlocal calls
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch.shape[0]:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SolverError(
                f"an activation input of shape {shape} does not start with the batch dimension {batch.shape[0]}",
                "use layers='outputs' for this model",
            )
        calls += 1
        record(x.reshape(x.shape[0], -1))

    with eval_mode(model), torch.no_grad():
        if layers == "outputs":
            output = model(batch)
            if not isinstance(output, torch.Tensor):
                raise SolverError(
                    f"model output is a {type(output).__name__}, not a tensor", "score a model that returns one tensor"
                )
            counted(output)
            return
        types = ACTIVATION_MODULES + _timm_activation_modules()
        handles = [
            m.register_forward_pre_hook(lambda _m, args: counted(args[0]) if args else None)
            for m in model.modules()
            if isinstance(m, types)
        ]
        # every GraphModule, top-level or nested (e.g. a Sequential of blocks), runs through the interpreter
        # so its functional activations (F.relu, F.gelu, ...) are seen too
        graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
        for gm in graphs:
            gm.forward = functools.partial(_interpret, gm, counted)
        try:
            model(batch)
        finally:
            for gm in graphs:
                del gm.forward
            for handle in handles:
                handle.remove()
    if calls == 0:
        raise SolverError(
            f"{type(model).__name__} ran no activation naswot can hook (no activation modules, not an fx graph)",
            "trace it with torch.fx (functional activations are then seen) or use layers='outputs'",
        )


def _interpret(gm: fx.GraphModule, record: Callable[[torch.Tensor], None], *args: torch.Tensor) -> object:
    return _ActivationInterpreter(gm, record).run(*args)


class _ActivationInterpreter(fx.Interpreter):
    """Runs a GraphModule, reporting the input of each functional activation node before it executes."""

    def __init__(self, gm: fx.GraphModule, record: Callable[[torch.Tensor], None]):
        super().__init__(gm)
        self.record = record

    def call_function(self, target, args, kwargs):
        if target in ACTIVATION_FUNCTIONS:
            self.record(args[0] if args else kwargs["input"])
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in ACTIVATION_METHODS:
            self.record(args[0])
        return super().call_method(target, args, kwargs)
