"""NASWOT, the training-free proxy DeRy ranks assembled candidates with (Mellor et al. 2021, DeRy §3.3).

Each sample of a batch gets a binary code: the sign pattern (x > 0) of every activation's input, i.e. of
its pre-activation. For ReLU-like activations the sign of the input is exactly which linear region the
sample lies in (and equals ``output > 0`` for ReLU/ReLU6); for smooth activations (GELU, SiLU, ...) it is
the same sign pattern, as NASWOT's own hooks read the ReLU *input*. The kernel
``K_H[i, j] = D − Hamming(c_i, c_j)`` counts agreeing bits and the score is ``log|det K_H|``: the more
distinct the codes of a batch, the larger the score. A batch with two identical codes gives a singular
kernel and the score ``-inf``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core.errors import SolverError
from ..core.modules import eval_mode

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
_CHUNK = 1 << 20  # feature columns per kernel matmul: bounds the float32 copy of a large activation


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


def hamming_kernel(codes: np.ndarray) -> np.ndarray:
    """``K_H[i, j] = D − Hamming(codes[i], codes[j])`` for (N, D) codes of 0/1 or bool, as float64."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, D), got shape {codes.shape}")
    if codes.dtype != np.bool_ and not np.isin(codes, (0, 1)).all():
        raise ValueError("codes must hold only 0 and 1")
    return _agreement(torch.from_numpy(codes.astype(np.bool_))).numpy()


def naswot_score(codes: np.ndarray) -> float:
    """``log|det K_H|`` of the codes' Hamming kernel; ``-inf`` when it is singular (e.g. two equal codes)."""
    return _log_det(torch.from_numpy(hamming_kernel(codes)))


def binary_codes(activations: Sequence[torch.Tensor]) -> np.ndarray:
    """Per-sample sign codes: each (N, ...) tensor becomes (x > 0) flattened, concatenated along features."""
    if not activations:
        raise ValueError("no activations to encode")
    batch = {a.shape[0] for a in activations}
    if len(batch) != 1:
        raise ValueError(f"activations disagree on the batch size: {sorted(batch)}")
    return torch.cat([(a.detach() > 0).flatten(1) for a in activations], dim=1).cpu().numpy()


def activation_codes(model: nn.Module, batch: torch.Tensor, *, layers: str = "relu") -> np.ndarray:
    """The (N, D) codes ``naswot`` scores for one batch, in execution order (for inspection and tests)."""
    parts: list[torch.Tensor] = []
    _run(model, batch, layers, lambda x: parts.append((x > 0).cpu()))
    return torch.cat(parts, dim=1).numpy()


def naswot(model: nn.Module, batches: Iterable[torch.Tensor], *, layers: str = "relu") -> float:
    """Mean NASWOT score over ``batches`` (the paper: 5 batches of 32).

    layers="relu": codes from every activation module (``ACTIVATION_MODULES`` and timm's) via forward
    pre-hooks, plus the functional activations (``F.relu``, ``torch.relu``, ``x.relu()``, the aten ops of
    ``torch.export``, ...) of an ``fx.GraphModule``; all use the sign of the activation's input.
    layers="outputs": the model output only.
    Runs in eval mode without gradients and restores every module's training flag; -inf if any batch is.
    """
    scores = []
    for batch in batches:
        kernel = torch.zeros(batch.shape[0], batch.shape[0], dtype=torch.float64)

        def accumulate(x: torch.Tensor, kernel: torch.Tensor = kernel) -> None:
            kernel += _agreement((x > 0).cpu())

        _run(model, batch, layers, accumulate)
        scores.append(_log_det(kernel))
    if not scores:
        raise SolverError("naswot got no batches", "pass at least one batch of inputs (the paper uses 5 of 32)")
    return float(np.mean(scores))


def _agreement(bits: torch.Tensor) -> torch.Tensor:
    """Number of agreeing bits between rows of a bool (N, D) tensor, float64 (N, N).

    With signs s = ±1, s·sᵀ = agree − disagree, so agree = (s·sᵀ + D) / 2. The matmul runs in float32 on
    column chunks of at most 2^20: every partial sum is an integer below 2^24, hence exact.
    """
    n, d = bits.shape
    total = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, _CHUNK):
        signs = bits[:, start : start + _CHUNK].to(torch.float32) * 2 - 1
        total += (signs @ signs.T).to(torch.float64)
    return (total + d) / 2


def _log_det(kernel: torch.Tensor) -> float:
    """log|det| of a PSD integer kernel; -inf when rank-deficient (slogdet alone can miss exact singularity)."""
    if torch.linalg.matrix_rank(kernel) < kernel.shape[0]:
        return float("-inf")
    return float(torch.linalg.slogdet(kernel).logabsdet)


def _run(model: nn.Module, batch: torch.Tensor, layers: str, record: Callable[[torch.Tensor], None]) -> None:
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
