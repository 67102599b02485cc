"""A model to train on a dataset: loaded from a spec (optionally a local checkpoint or re-initialised)
and checked against the data's image shape and class count before any training starts."""

from __future__ import annotations

import torch
import torch.nn as nn

from zoocompiler.core.errors import DataError, InputShapeError
from zoocompiler.sources import load_model
from zoocompiler.tracing import check_input

TRACE_BATCH = 2


def example_input(shape: tuple[int, ...]) -> torch.Tensor:
    """The seeded example input (batch ``TRACE_BATCH``) a trained model is traced with, so a rebuilt model's
    trace (and its structure fingerprint) is the trained one's."""
    return torch.randn(TRACE_BATCH, *shape, generator=torch.Generator().manual_seed(0))


def reset_parameters(model: nn.Module) -> nn.Module:
    """Re-initialise every submodule that has ``reset_parameters`` (training from scratch)."""
    for m in model.modules():
        if m is not model and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    return model


def check_classifier(model: nn.Module, shape: tuple[int, ...], num_classes: int, spec: str) -> None:
    """Raise ``DataError`` unless ``model`` maps ``shape`` images to ``[B, num_classes]`` logits."""
    x = torch.zeros(TRACE_BATCH, *shape)
    try:
        check_input(model, x)
    except InputShapeError as err:
        raise DataError(f"model '{spec}' does not accept the dataset's {'×'.join(map(str, shape))} images "
                        f"({err.cause})", "build the model for this input (e.g. in_chans=1 in the spec)") from err
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"model '{spec}' outputs {got}, the dataset has {num_classes} classes",
                        f"build the model with {num_classes} outputs (e.g. num_classes={num_classes} in the spec)")


def load_trainable(
    spec: str,
    input_shape: tuple[int, ...],
    *,
    from_scratch: bool = False,
    checkpoint: str | None = None,
    allow_pickle: bool = False,
    num_classes: int | None = None,
) -> nn.Module:
    """``load_model(spec)`` (``checkpoint`` weights, or re-initialised from seed 0 with ``from_scratch``),
    checked against ``input_shape`` and ``num_classes`` when given."""
    model = load_model(spec, checkpoint=checkpoint, allow_pickle=allow_pickle)
    if from_scratch:
        torch.manual_seed(0)
        reset_parameters(model)
    if num_classes is not None:
        check_classifier(model, tuple(input_shape), num_classes, spec)
    return model
