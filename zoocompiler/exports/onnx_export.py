"""Export a PyTorch module to ONNX and prove it: checker, ONNX Runtime parity, dynamic batch.

Exporter order: the dynamo-based ``torch.onnx.export(..., dynamo=True)`` (torch.export →
onnxscript, the default in torch 2.14), then the TorchScript-based one (``dynamo=False``) as a
fallback. An exporter *fails* if it raises, if the checker or ONNX Runtime rejects its model,
or if its outputs differ from PyTorch beyond the tolerance; the next one is then tried.

With ``dynamic_batch``, the batch is ``torch.export.Dim("batch")``; a one-row example is traced with two rows
(``torch.export`` specialises a dimension of example size 1), and a dynamo export whose batch still came out
fixed counts as failed. Parity is checked on the example input and on a second batch size (when ``dynamic_batch``),
against the fp32 PyTorch model in eval mode. The tolerance is relative to the output's scale: an
output passes when ``max|onnx - torch| <= atol * max|torch|`` (an all-zero output must match exactly), so
outputs of 1e-9 are held to 1e-13, not to ``atol``.

Torch's exporters log (sometimes hundreds of lines of traceback for an attempt that fails before the
fallback succeeds); those records never reach the terminal: they are captured and kept, as plain text,
in the report (``exporter_log``), as is each failed exporter's full error (``exporter_errors``).

Each exported graph first goes through the rewrites of :mod:`.onnx_rewrites` (GroupNorm's affine map as one
BatchNormalization; ``rewrites=False`` keeps the exporter's graph), so the checks cover them.

The file is written only after every check has passed (atomically), so a failed export leaves ``path`` as
it was. A model with NaN/inf weights (e.g. from a diverged training) or NaN/inf reference outputs is
refused before any export.

fp16: the model is cast to half precision in PyTorch and wrapped so the graph takes and
returns float32 (a Cast at each end); weights and all intermediate tensors are fp16.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.atomic import write_bytes_atomic
from ..core.errors import ExportError, InputShapeError
from ..core.logs import captured_logs
from ..core.modules import eval_mode, nonfinite_weights
from ..core.text import first_line, plain_text
from .latency import ORT_INPUT_TYPES, ort_session, resolve_providers
from .onnx_rewrites import groupnorm_affine_as_batchnorm

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_ATOL = 1e-4
DEFAULT_ATOL_FP16 = 1e-2
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class ExportReport:
    """What was written and how it was verified."""

    path: str
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    fp16: bool
    max_abs_diff: float  # over every batch checked, ONNX Runtime vs fp32 PyTorch
    rel_diff: float  # max_abs_diff / max|PyTorch output|
    tolerance: float  # the absolute bound applied: atol * max|PyTorch output|
    batch_sizes_checked: tuple[int, ...]
    onnx_nodes: int  # nodes in the top-level graph
    file_bytes: int
    provider: str
    dynamic_batch: bool
    output_note: str | None = None  # set when the model's output is not a single tensor
    checker: str = "full"  # "full" (strict shape inference) or "basic"
    exporter_errors: dict[str, str] = field(default_factory=dict)  # exporters tried first that failed, full text
    exporter_log: list[str] = field(default_factory=list)  # what torch/onnxscript logged while exporting

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_sizes_checked"] = list(self.batch_sizes_checked)
        return d


@dataclass(frozen=True)
class ParityStats:
    """Largest ONNX-vs-PyTorch difference over a set of inputs, and the reference output scale."""

    max_abs_diff: float
    ref_scale: float  # max |PyTorch output|
    provider: str = ""  # the ONNX Runtime execution provider that ran the model

    @property
    def rel_diff(self) -> float:
        if self.ref_scale > 0:
            return self.max_abs_diff / self.ref_scale
        return 0.0 if self.max_abs_diff == 0 else math.inf


class _ParityMismatch(Exception):
    def __init__(self, stats: ParityStats, tolerance: float):
        self.stats, self.tolerance = stats, tolerance
        super().__init__(f"max |Δ| {stats.max_abs_diff:.3g} > tolerance {tolerance:.3g}")


def first_tensor(output: object) -> tuple[torch.Tensor, int, str | None]:
    """The first tensor among a model output's pytree leaves, its leaf index, and a note if not a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output, 0, None
    leaves = pytree.tree_leaves(output)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            note = f"model returns {type(output).__name__} with {len(leaves)} leaves; exported tensor leaf {i} only"
            return leaf, i, note
    raise ExportError(
        f"model output of type {type(output).__name__} contains no tensor",
        "export a module whose forward returns a tensor",
    )


class _SelectLeaf(nn.Module):
    """Wraps a model whose output is a container: returns its ``leaf``-th pytree leaf."""

    def __init__(self, model: nn.Module, leaf: int):
        super().__init__()
        self.model = model
        self.leaf = leaf
        self.training = False  # this wrapper only: the wrapped model keeps the mode it was given

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pytree.tree_leaves(self.model(x))[self.leaf]


class _HalfPrecision(nn.Module):
    """An fp16 copy of a model with float32 I/O: casts a floating input to half and the output back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()
        self.training = False  # this wrapper only: the copy keeps the mode it was given

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.half()
        return self.model(x).float()


def _export_dynamo(module: nn.Module, x: torch.Tensor, opset: int | None, dynamic_batch: bool) -> onnx.ModelProto:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    # The math attention backend: only the fake (shape) runs see it, the graph keeps aten SDPA. With the CPU flash
    # backend, torch.onnx's decomposition sees SDPA outputs in (B, N, H, D) memory order and lowers
    # ``out.transpose(1, 2).reshape(B, N, C)`` to a ``view``, which its type-promotion pass, re-running SDPA as
    # (B, H, N, D), then cannot view (BEiT, whose attention has a bias mask: "Cannot view a tensor with shape").
    with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
        # export_onnx puts the model in eval mode; torch.export's .module() reports training=True regardless.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(
            module,
            (x,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    proto = program.model_proto
    if dynamic_batch:
        _check_symbolic_batch(proto)
    return proto


def _check_symbolic_batch(proto: onnx.ModelProto) -> None:
    """Raise if the exported graph fixed dim 0 of its input: when ``torch.export`` finds the batch specialised,
    ``torch.onnx.export`` retries with the size it suggests and returns a static-batch model without a word.
    (The output is not checked: a model may legitimately reduce over the batch.)"""
    dims = proto.graph.input[0].type.tensor_type.shape.dim if proto.graph.input else ()
    if dims and dims[0].HasField("dim_value"):
        raise ExportError(
            f"torch.export specialised the batch dimension: the ONNX input has a fixed batch of {dims[0].dim_value} "
            "(the model's code makes the batch size a constant, e.g. an int() of a shape or a reshape with a "
            "literal batch)",
            "make the batch size symbolic in the model, or export with dynamic_batch=False",
        )


def _trace_example(x: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The input the exporters trace with: ``x``, or its row twice when the batch is dynamic and ``x`` has one row.

    ``torch.export`` specialises a dimension whose example size is 1 (its "0/1 specialisation"; torch.onnx's
    size-oblivious mode only partly lifts it): with a 1-row example, a dynamic batch either fails ("Invalid
    ranges [2:1]", "specialized it to be a constant (1)") or, after torch.onnx's retry, comes out fixed at 1.
    The TorchScript tracer likewise bakes sizes of the traced input. Parity is still checked on ``x`` itself.
    """
    if dynamic_batch and x.dim() > 0 and x.shape[0] == 1:
        return x.repeat(2, *([1] * (x.dim() - 1)))
    return x


def _export_torchscript(module: nn.Module, x: torch.Tensor, opset: int | None, dynamic_batch: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its retirement
        torch.onnx.export(
            module,
            (x,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


_EXPORT_FNS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


_LOG_LINES = 400  # exporter log lines kept in the report at most


def _check_model(proto: onnx.ModelProto) -> str:
    """ONNX checker with strict shape inference; falls back to the basic check. Returns which passed."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return "full"
    except onnx.shape_inference.InferenceError:
        onnx.checker.check_model(proto)
        return "basic"


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def second_batch(example: torch.Tensor, size: int) -> torch.Tensor:
    """An input like ``example`` with ``size`` rows: fresh noise at the same mean/std (floats), else cycled rows."""
    if example.is_floating_point():
        gen = torch.Generator().manual_seed(1234)
        noise = torch.randn((size, *example.shape[1:]), generator=gen, dtype=example.dtype)
        std = example.std() if example.numel() > 1 else torch.tensor(1.0, dtype=example.dtype)
        return noise * std + example.mean()
    return example[torch.arange(size) % example.shape[0]]


NONFINITE_FIX = "retrain with a lower learning rate, or check the training data for NaN/inf values"


def _check_finite_weights(module: nn.Module, fp16: bool) -> None:
    """Refuse NaN/inf parameters or buffers (before the fp16 cast), or values the fp16 cast overflows (after)."""
    where = nonfinite_weights(module)
    if where is None:
        return
    if fp16:
        raise ExportError(
            f"model weights overflow fp16 ({where} become inf in half precision)", "export in fp32 (fp16=False)"
        )
    raise ExportError(f"model has non-finite weights ({where}): refusing to export NaN/inf", NONFINITE_FIX)


def _check_finite_refs(refs: Sequence[np.ndarray], batches: Sequence[torch.Tensor]) -> None:
    """Refuse a model whose PyTorch output is NaN/inf: parity against it is meaningless."""
    for i, (ref, x) in enumerate(zip(refs, batches)):
        bad = int((~np.isfinite(ref)).sum())
        if bad:
            what = "the example input" if i == 0 else f"a second batch of {x.shape[0]} (the dynamic-batch check)"
            nan_input = x.is_floating_point() and not bool(torch.isfinite(x).all())
            fix = (
                "pass an example input without NaN/inf"
                if nan_input
                else "check the model for ops that overflow or produce NaN (log, division, exp) on such inputs"
            )
            raise ExportError(f"the PyTorch output on {what} has {bad:,} non-finite values of {ref.size:,}", fix)


def _run_eager(model: nn.Module, x: torch.Tensor, what: str = "example input") -> object:
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, AssertionError, TypeError) as err:
        fix = (
            "pass dynamic_batch=False, or trace/export the model with a dynamic batch dimension"
            if what != "example input"
            else "pass an example input (batch first) that the model accepts in eval mode"
        )
        cause = f"model rejects {what} of shape {tuple(x.shape)} ({first_line(err, limit=300)})"
        raise InputShapeError(cause, fix) from err


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _reference_outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """PyTorch outputs (first tensor leaf, as float32 numpy) for each batch."""
    return [_as_numpy(first_tensor(_run_eager(model, x, "input"))[0]) for x in batches]


def _compare(
    onnx_model: str | os.PathLike[str] | bytes,
    batches: Sequence[torch.Tensor],
    refs: Sequence[np.ndarray],
    providers: list[str] | None,
) -> ParityStats:
    session = ort_session(onnx_model, threads=torch.get_num_threads(), providers=providers)
    input_name = session.get_inputs()[0].name
    input_type = ORT_INPUT_TYPES.get(session.get_inputs()[0].type)  # e.g. float16 for an fp16-I/O model
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing run is reported by its exception, not also logged to stderr
    max_abs, scale = 0.0, 0.0
    for x, ref in zip(batches, refs):
        try:
            feed = x.detach().cpu().numpy()
            if input_type is not None and feed.dtype.kind == "f":
                feed = feed.astype(input_type)
            got = session.run(None, {input_name: feed}, quiet)[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ExportError(
                f"ONNX Runtime cannot run the model on input {tuple(x.shape)} ({first_line(err, limit=300)})",
                "export with dynamic_batch=True for other batch sizes, and feed the dtype the model was exported with",
            ) from err
        if got.shape != ref.shape:
            raise ExportError(
                f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape} for input {tuple(x.shape)}",
                "export with dynamic_batch=True, or feed the batch size the model was exported with",
            )
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
        scale = max(scale, float(np.abs(ref).max(initial=0.0)))
    return ParityStats(max_abs_diff=max_abs, ref_scale=scale, provider=session.get_providers()[0])


def parity_stats(
    onnx_model: str | os.PathLike[str] | bytes,
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    providers: list[str] | None = None,
) -> ParityStats:
    """Run ONNX Runtime and ``model`` (as given; call ``.eval()`` first) on each input batch and compare.

    ``onnx_model`` is a path or serialised bytes with one input; a container output from ``model``
    is compared through its first tensor leaf. Raises ``ExportError`` if ONNX Runtime rejects an
    input or the output shapes differ, ``InputShapeError`` if ``model`` rejects one.
    """
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    return _compare(onnx_model, batches, _reference_outputs(model, batches), providers)


def onnx_parity(
    onnx_model: str | os.PathLike[str] | bytes,
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    providers: list[str] | None = None,
) -> float:
    """Max absolute difference between ONNX Runtime and ``model`` over ``inputs`` (see ``parity_stats``)."""
    return parity_stats(onnx_model, model, inputs, providers).max_abs_diff


@dataclass
class _Verified:
    data: bytes
    proto: onnx.ModelProto
    stats: ParityStats
    tolerance: float
    checker: str


def _exported(
    exporter: str, module: nn.Module, x: torch.Tensor, opset: int | None, dynamic_batch: bool, rewrites: bool
) -> onnx.ModelProto:
    """``exporter``'s model of ``module``, with the graph rewrites of :mod:`.onnx_rewrites` unless ``rewrites`` is
    off."""
    proto = _EXPORT_FNS[exporter](module, _trace_example(x, dynamic_batch), opset, dynamic_batch)
    if rewrites:
        groupnorm_affine_as_batchnorm(proto)
    return proto


def _export_and_verify(
    exporter: str,
    module: nn.Module,
    batches: list[torch.Tensor],
    refs: list[np.ndarray],
    *,
    opset: int | None,
    dynamic_batch: bool,
    atol: float,
    providers: list[str] | None,
    rewrites: bool,
) -> _Verified:
    proto = _exported(exporter, module, batches[0], opset, dynamic_batch, rewrites)
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError(
            f"ONNX model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit",
            "export a smaller block of the model",
        )
    checker = _check_model(proto)
    data = proto.SerializeToString()
    stats = _compare(data, batches, refs, providers)
    tolerance = atol * stats.ref_scale
    if not stats.max_abs_diff <= tolerance:  # also catches NaN
        raise _ParityMismatch(stats, tolerance)
    return _Verified(data, proto, stats, tolerance, checker)


def _export_unverified(
    exporter: str, module: nn.Module, x: torch.Tensor, opset: int | None, dynamic_batch: bool, rewrites: bool
) -> _Verified:
    proto = _exported(exporter, module, x, opset, dynamic_batch, rewrites)
    unchecked = ParityStats(math.nan, math.nan, provider="none")
    return _Verified(proto.SerializeToString(), proto, unchecked, math.nan, "none")


def _failure(errors: dict[str, BaseException], fp16: bool) -> ExportError:
    mismatches = {name: e for name, e in errors.items() if isinstance(e, _ParityMismatch)}
    precision = "fp16" if fp16 else "fp32"
    if mismatches:
        name, worst = min(mismatches.items(), key=lambda kv: kv[1].stats.max_abs_diff)
        s = worst.stats
        fix = (
            "export in fp32 (fp16=False) or pass a larger atol="
            if fp16
            else "look for export-unsafe ops (value-dependent control flow, in-place ops on views), "
            "or pass a larger atol= if the difference is expected"
        )
        return ExportError(
            f"{precision} ONNX output differs from PyTorch: max |Δ|={s.max_abs_diff:.3g} (relative {s.rel_diff:.3g}) "
            f"> tolerance {worst.tolerance:.3g} (best exporter: {name})",
            fix,
        )
    summary = "; ".join(f"{name}: {first_line(e, limit=300)}" for name, e in errors.items())
    fix = (
        "if the fp32 export (fp16=False) works, run the fp16 model on a provider with fp16 kernels "
        "(e.g. CUDAExecutionProvider) or keep fp32"
        if fp16
        else "make the failing module export-friendly or export a smaller block; "
        "pass exporters=('dynamo',) to see one exporter's full error"
    )
    return ExportError(f"ONNX export ({precision}) failed with every exporter — {summary}", fix)


def export_onnx_bytes(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    fp16: bool = False,
    opset: int | None = None,
    dynamic_batch: bool = True,
    atol: float | None = None,
    check: bool = True,
    providers: list[str] | None = None,
    exporters: Sequence[str] = EXPORTERS,
    rewrites: bool = True,
) -> tuple[bytes, ExportReport]:
    """Export ``model`` (run in eval mode; its mode is restored) and verify it, in memory: the serialised
    ONNX model and its report (``path`` empty). Arguments and errors as :func:`export_onnx`.

    ``opset=None`` lets each exporter choose. ``atol`` defaults to 1e-4 (fp32) or 1e-2 (fp16)
    and scales with the output magnitude (see the module docstring). ``check=False`` skips the
    checker and parity runs (the report then has NaN diffs). Raises ``ExportError`` if the model has
    NaN/inf weights (or, with ``check``, NaN/inf outputs), or if no exporter yields a checked model
    within tolerance.
    """
    unknown = [e for e in exporters if e not in EXPORTERS]
    if unknown or not exporters:
        raise ExportError(f"unknown exporters {unknown or list(exporters)}", f"use some of: {', '.join(EXPORTERS)}")
    atol = atol if atol is not None else (DEFAULT_ATOL_FP16 if fp16 else DEFAULT_ATOL)
    resolve_providers(providers)  # fail fast, with the install hint, on an unavailable provider
    _check_finite_weights(model, fp16=False)
    with eval_mode(model):
        first_out, leaf, note = first_tensor(_run_eager(model, example_input))
        batches = [example_input]
        if dynamic_batch:
            batches.append(second_batch(example_input, 3 if example_input.shape[0] != 3 else 2))
        refs = [_as_numpy(first_out), *_reference_outputs(model, batches[1:])] if check else []
        _check_finite_refs(refs, batches)
        module: nn.Module = model if note is None else _SelectLeaf(model, leaf)
        if fp16:
            module = _HalfPrecision(module)
            _check_finite_weights(module, fp16=True)
        errors: dict[str, BaseException] = {}
        with captured_logs(warnings_too=True) as log:
            verified, exporter = _first_that_works(
                exporters, errors, module, batches, refs, check, opset=opset, dynamic_batch=dynamic_batch, atol=atol,
                providers=providers, rewrites=rewrites,
            )
        if verified is None:
            raise _failure(errors, fp16) from errors[exporters[-1]]
    return verified.data, ExportReport(
        path="",
        opset=_opset(verified.proto),
        exporter=exporter,
        fp16=fp16,
        max_abs_diff=verified.stats.max_abs_diff,
        rel_diff=verified.stats.rel_diff,
        tolerance=verified.tolerance,
        batch_sizes_checked=tuple(int(b.shape[0]) for b in batches) if check else (),
        onnx_nodes=len(verified.proto.graph.node),
        file_bytes=len(verified.data),
        provider=verified.stats.provider,
        dynamic_batch=dynamic_batch,
        output_note=note,
        checker=verified.checker,
        exporter_errors={name: plain_text(e) for name, e in errors.items()},
        exporter_log=log[-_LOG_LINES:],
    )


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    fp16: bool = False,
    opset: int | None = None,
    dynamic_batch: bool = True,
    atol: float | None = None,
    check: bool = True,
    providers: list[str] | None = None,
    exporters: Sequence[str] = EXPORTERS,
    rewrites: bool = True,
) -> ExportReport:
    """Export ``model`` (run in eval mode; its mode is restored) to ``path`` and verify it.

    ``opset=None`` lets each exporter choose. ``atol`` defaults to 1e-4 (fp32) or 1e-2 (fp16)
    and scales with the output magnitude (see the module docstring). ``check=False`` skips the
    checker and parity runs (the report then has NaN diffs). Raises ``ExportError`` if the model has
    NaN/inf weights (or, with ``check``, NaN/inf outputs), or if no exporter yields a checked model
    within tolerance; ``path`` is then left untouched.
    """
    data, report = export_onnx_bytes(
        model, example_input, fp16=fp16, opset=opset, dynamic_batch=dynamic_batch, atol=atol, check=check,
        providers=providers, exporters=exporters, rewrites=rewrites,
    )
    write_bytes_atomic(path, data)
    report.path = str(path)
    return report


def _first_that_works(
    exporters: Sequence[str], errors: dict[str, BaseException], module: nn.Module, batches: list[torch.Tensor],
    refs: list[np.ndarray], check: bool, **options,
) -> tuple[_Verified | None, str]:
    """The first exporter whose model passes (``errors`` collects the ones that fail), or (None, last tried)."""
    for exporter in exporters:
        try:
            if check:
                return _export_and_verify(exporter, module, batches, refs, **options), exporter
            unchecked = {k: options[k] for k in ("opset", "dynamic_batch", "rewrites")}
            return _export_unverified(exporter, module, batches[0], **unchecked), exporter
        except Exception as err:  # noqa: BLE001 - any exporter failure moves on to the next exporter
            errors[exporter] = err
    return None, exporters[-1]
