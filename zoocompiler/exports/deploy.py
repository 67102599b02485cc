"""Export at a deployment precision: one verified fp32 export, the fp16/int8 models derived from it, each checked,
and their ONNX Runtime latencies side by side.

``export_deployable`` is what every command that writes ONNX calls:

1. ``export_onnx_bytes``: the fp32 model, checked against PyTorch (``docs/export.md``).
2. The precisions the report compares: the one asked for, plus (with a latency table) the others it can build:
   fp16 always, int8 when there is calibration data. A precision other than the one asked for that fails to
   build is a table row saying why, not an error.
3. Checks per precision. fp16: parity against the fp32 PyTorch model on the export's batches, relative
   tolerance ``DEFAULT_ATOL_FP16`` (1e-2 of the output scale), on ``options.provider``; a failure names the
   first node that leaves fp16's range when there is one. int8: parity, for information only, on up to 64 test (else
   calibration) rows, in-distribution inputs whose ranges the calibration saw; an int8 model losing more than
   ``options.int8_max_drop`` accuracy points is quantized again with its stem and classifier in float; with
   ``evaluation`` data (the task's test split), top-1 accuracy of each precision on ONNX Runtime and the change
   against fp32.
4. Latency (``measure_latency``) per precision × provider × batch (1 and ``options.latency_batch``); the CUDA
   (and, if installed, TensorRT) rows say "not available" without a usable GPU.
5. The chosen precision's model is written atomically to ``path``; nothing is written on any error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..core.atomic import write_bytes_atomic
from ..core.deploy import PRECISIONS, DeployOptions
from ..core.errors import ExportError, ZooError
from ..core.modules import eval_mode
from ..core.text import first_line
from .latency import (
    GPU_PROVIDERS,
    available_providers,
    measure_latency,
    ort_session,
    provider_usable,
    resolve_providers,
    why_unavailable,
)
from .onnx_export import DEFAULT_ATOL_FP16, ExportReport, ParityStats, export_onnx_bytes, parity_stats, second_batch
from .precision import fp16_overflow, quantize_int8, to_fp16

INT8_NEEDS_DATA = (
    "pass --data (digits, mnist5k, npz:PATH or imagefolder:PATH; a seeded sample of its training split calibrates "
    "the activation ranges), or choose --precision fp32|fp16"
)


@dataclass
class PrecisionResult:
    """One precision's model: size, parity against the fp32 PyTorch model, task accuracy when there is data."""

    precision: str
    file_bytes: int | None = None
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    tolerance: float | None = None  # fp16: the absolute bound applied; fp32/int8: None (parity is information)
    rel_tolerance: float | None = None  # fp16: the bound relative to the output scale (DEFAULT_ATOL_FP16)
    provider: str = ""
    accuracy: float | None = None  # top-1 on the evaluation split (ONNX Runtime)
    accuracy_change: float | None = None  # accuracy - fp32 accuracy (points are 100×)
    agreement: float | None = None  # fraction of evaluation rows whose top-1 matches the fp32 model's
    error: str | None = None  # why this precision could not be built (a precision not asked for only)
    notes: dict[str, object] = field(default_factory=dict)


@dataclass
class DeployReport:
    """What ``export_deployable`` wrote and measured."""

    path: str
    precision: str
    io_types: str
    file_bytes: int
    export: ExportReport  # the fp32 export every precision derives from
    precisions: dict[str, PrecisionResult]
    latency: list[dict[str, object]]
    calibration: dict[str, object] | None
    untimed: dict[str, bytes] = field(default_factory=dict, repr=False)  # time_latency=False: what to time later
    input_shape: tuple[int, ...] = ()  # per sample

    @property
    def chosen(self) -> PrecisionResult:
        return self.precisions[self.precision]

    def written(self) -> dict:
        """The written precision's result as a dict: size, parity, accuracy and its change against fp32."""
        return asdict(self.chosen)

    def to_dict(self, name: str | None = None) -> dict:
        """JSON-able; ``name``: the written file's path as the caller's output directory has it (a staged run
        writes elsewhere first), for ``path`` and, when fp32 was written, ``export.path``."""
        d = asdict(dataclasses.replace(self, untimed={}))
        del d["untimed"], d["input_shape"]
        d["export"] = self.export.to_dict()
        if name is not None:
            d["path"] = name
            d["export"]["path"] = name if d["export"]["path"] else ""
        return d


def check_deployable(options: DeployOptions) -> None:
    """What a pipeline checks before any work: the options, and that their provider can run here (a CUDA provider
    without onnxruntime-gpu or without a GPU is a ``ZooError``)."""
    options.check()
    resolve_providers([options.execution_provider])


def calibration_sample(x: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """``size`` rows of ``x`` (all when fewer), chosen by a permutation seeded with ``seed``."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[: min(size, len(x))]]


def _precisions_to_build(options: DeployOptions, has_calibration: bool) -> list[str]:
    """The one asked for first (its failure is the error), then fp32 (the reference of every comparison), then,
    with a latency table, the others that can be built."""
    wanted = [p for p in PRECISIONS if p != "int8" or has_calibration] if options.latency_runs else ["fp32"]
    return [options.precision] + [p for p in wanted if p != options.precision]


def _predictions(data: bytes, x: torch.Tensor, providers: list[str], batch: int = 256) -> np.ndarray:
    session = ort_session(data, threads=torch.get_num_threads(), providers=providers)
    meta = session.get_inputs()[0]
    dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
    rows = []
    for i in range(0, len(x), batch):
        out = session.run(None, {meta.name: x[i : i + batch].numpy().astype(dtype)})[0]
        rows.append(np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1).argmax(axis=1))
    return np.concatenate(rows)


def _verify_fp16(result: PrecisionResult, fp16: bytes, fp32: onnx.ModelProto, model: nn.Module,
                 batches: list[torch.Tensor], providers: list[str]) -> None:
    """Overflow first: the CPU EP runs ops without an fp16 kernel in fp32 and drops the Casts between them, so an
    fp16 overflow that a GPU would hit can pass CPU parity; the fp32 graph's values show it on any machine."""
    overflow = fp16_overflow(fp32, [b.numpy().astype(np.float32) for b in batches])
    if overflow is not None:
        raise ExportError(
            f"fp16 outputs overflow: {overflow.text()}, beyond fp16's ±65504",
            "export in fp32 or int8 (--precision fp32|int8), or rescale the layers feeding that node",
        )
    stats = parity_stats(fp16, model, batches, providers)
    tolerance = DEFAULT_ATOL_FP16 * stats.ref_scale
    _set_parity(result, stats, tolerance)
    result.rel_tolerance = DEFAULT_ATOL_FP16
    if not stats.max_abs_diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"fp16 ONNX output differs from PyTorch: max |Δ|={stats.max_abs_diff:.3g} "
            f"(relative {stats.rel_diff:.3g}) > tolerance {tolerance:.3g}",
            "export in fp32 or int8 (--precision fp32|int8)",
        )


def _set_parity(result: PrecisionResult, stats: ParityStats, tolerance: float | None) -> None:
    result.max_abs_diff, result.rel_diff = stats.max_abs_diff, stats.rel_diff
    result.tolerance, result.provider = tolerance, stats.provider


INT8_PARITY_ROWS = 64


def _build(precision: str, fp32_data: bytes, export: ExportReport, model: nn.Module, batches: list,
           options: DeployOptions, calibration: torch.Tensor | None,
           evaluation: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[bytes, PrecisionResult]:
    """One precision's model and its checks. fp32's parity is the export's own when it ran on ``options.provider``
    (same batches). int8's parity is measured on up to 64 evaluation rows (else calibration rows): the export's
    second batch is noise, outside the calibrated ranges, where int8 clips."""
    result = PrecisionResult(precision)
    providers = [options.execution_provider]
    fp32_proto = onnx.load_from_string(fp32_data) if precision == "fp16" else None
    if precision == "fp32":
        data = fp32_data
        if export.provider == options.execution_provider:  # the export checked these batches there already
            result.max_abs_diff, result.rel_diff = export.max_abs_diff, export.rel_diff
            result.provider = export.provider
        else:
            _set_parity(result, parity_stats(data, model, batches, providers), None)
    elif precision == "fp16":
        data = to_fp16(fp32_proto, io_types=options.io_types).SerializeToString()
        _verify_fp16(result, data, fp32_proto, model, batches, providers)
    else:
        if calibration is None:
            raise ZooError("--precision int8 needs data to calibrate on", INT8_NEEDS_DATA)
        data, result.notes = _guarded_int8(fp32_data, calibration, evaluation, options)
        rows = (evaluation[0] if evaluation is not None else calibration)[:INT8_PARITY_ROWS]
        _set_parity(result, parity_stats(data, model, [rows], providers), None)
        result.notes["parity_rows"] = f"{len(rows)} {'test' if evaluation is not None else 'calibration'} rows"
    result.file_bytes = len(data)
    return data, result


def _guarded_int8(fp32: bytes, calibration: torch.Tensor, evaluation: tuple[torch.Tensor, torch.Tensor] | None,
                  options: DeployOptions) -> tuple[bytes, dict[str, object]]:
    """Full int8; with evaluation data, if it loses more than ``options.int8_max_drop`` accuracy points against
    fp32, int8 again with the stem and classifier in float, keeping the more accurate (full int8 on a tie)."""
    full = quantize_int8(fp32, calibration.numpy())
    notes: dict[str, object] = {"preprocessed": full.preprocessed, "reduce_range": full.reduce_range}
    chosen = full
    if evaluation is not None:
        providers = [options.execution_provider]
        base, quantized = (_accuracy(data, evaluation, providers) for data in (fp32, full.data))
        drop = 100 * (base - quantized)
        notes["full_int8_drop_points"] = drop
        if drop > options.int8_max_drop:
            ends = quantize_int8(fp32, calibration.numpy(), keep_ends_float=True)
            if _accuracy(ends.data, evaluation, providers) > quantized:
                chosen = ends
    notes.update({"quantize_nodes": chosen.quantized_nodes, "float_nodes": list(chosen.float_nodes)})
    return chosen.data, notes


def _accuracy(data: bytes, evaluation: tuple[torch.Tensor, torch.Tensor], providers: list[str]) -> float:
    return float((_predictions(data, evaluation[0], providers) == evaluation[1].numpy()).mean())


def _evaluate(results: dict[str, PrecisionResult], models: dict[str, bytes], evaluation, providers) -> None:
    x, y = evaluation
    labels = y.numpy()
    predicted = {p: _predictions(data, x, providers) for p, data in models.items()}
    base = predicted.get("fp32")
    for precision, pred in predicted.items():
        r = results[precision]
        r.accuracy = float((pred == labels).mean())
        if base is not None:
            r.agreement = float((pred == base).mean())
            r.accuracy_change = r.accuracy - float((base == labels).mean())


def latency_table(models: dict[str, bytes], input_shape: tuple[int, ...], options: DeployOptions,
                  say: Callable[[str], None] | None = None) -> list[dict[str, object]]:
    """The latency rows of ``models`` (precision → ONNX bytes) per provider × precision × batch (1 and
    ``options.latency_batch``) on this machine; ``input_shape`` is per sample."""
    say = say or (lambda _text: None)
    providers = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    providers += [p for p in GPU_PROVIDERS if p in available_providers() and p not in providers]
    rows: list[dict[str, object]] = []
    for provider in providers:
        usable = provider_usable(provider)
        for precision, data in models.items():
            for batch in sorted({1, options.latency_batch}):
                row: dict[str, object] = {"precision": precision, "provider": provider, "batch": batch}
                if not usable:
                    rows.append({**row, "status": "not available", "why": why_unavailable(provider)})
                    continue
                say(f"latency: {precision} on {provider.removesuffix('ExecutionProvider')}, batch {batch}")
                lat = measure_latency(data, (batch, *input_shape), runs=options.latency_runs,
                                      warmup=max(1, options.latency_runs // 5), threads=options.latency_threads,
                                      providers=[provider])
                if lat.provider != provider:  # ONNX Runtime fell back (e.g. TensorRT's libraries missing)
                    rows.append({**row, "status": "not available", "why": f"ONNX Runtime fell back to {lat.provider}"})
                    continue
                rows.append({**row, "status": "ok", "median_ms": lat.median_ms, "p10_ms": lat.p10_ms,
                             "p90_ms": lat.p90_ms, "threads": lat.threads})
    return rows


def export_deployable(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    options: DeployOptions | None = None,
    *,
    calibration: torch.Tensor | None = None,
    evaluation: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    time_latency: bool = True,
) -> DeployReport:
    """Export ``model`` at ``options.precision`` to ``path``, verified, with the other precisions measured.

    ``time_latency=False`` builds everything the latency table needs but leaves it empty, keeping the models in
    ``untimed``: :func:`time_report` times them later, where the target is (a pipeline's workers build, the
    driver or ``--latency-node`` times).
    ``calibration``: float inputs to sample int8 calibration rows from (e.g. the task's training split);
    ``evaluation``: ``(x, y)`` of the task's test split for per-precision accuracy. Raises ``ZooError`` (int8
    without ``calibration``, an unusable provider), ``ExportError`` (fp16 overflow naming the node, a failed
    export); ``path`` is then untouched.
    """
    options = options or DeployOptions()
    check_deployable(options)
    say = progress or (lambda _text: None)
    if options.precision == "int8" and calibration is None:
        raise ZooError("--precision int8 needs data to calibrate on", INT8_NEEDS_DATA)
    sample = None if calibration is None else calibration_sample(calibration, options.calibration_size, options.seed)
    fp32_data, export = export_onnx_bytes(model, example_input)
    batches = [example_input]
    if export.dynamic_batch and len(export.batch_sizes_checked) > 1:
        batches.append(second_batch(example_input, export.batch_sizes_checked[1]))
    models: dict[str, bytes] = {}
    results: dict[str, PrecisionResult] = {}
    with eval_mode(model):
        for precision in _precisions_to_build(options, sample is not None):
            say(f"{precision}: building and checking the model")
            try:
                models[precision], results[precision] = _build(
                    precision, fp32_data, export, model, batches, options, sample, evaluation
                )
            except ZooError as err:
                if precision == options.precision:
                    raise
                results[precision] = PrecisionResult(precision, error=first_line(err, limit=300))
    ran = results[options.precision].provider
    if ran != options.execution_provider:
        raise ExportError(
            f"the {options.precision} model was to be checked on {options.execution_provider}, but ONNX Runtime ran "
            f"it on {ran} (the provider failed to load)",
            "check the CUDA/TensorRT installation (onnxruntime-gpu, CUDA and cuDNN versions), or pass --provider cpu",
        )
    if options.latency_runs and "int8" not in results:
        results["int8"] = PrecisionResult("int8", error="no data to calibrate on (--data)")
    models = {p: models[p] for p in PRECISIONS if p in models}  # reports list precisions in one order
    results = {p: results[p] for p in PRECISIONS if p in results}
    if evaluation is not None:
        say(f"accuracy of {', '.join(models)} on {len(evaluation[0])} test rows")
        _evaluate(results, models, evaluation, [options.execution_provider])
    shape = tuple(example_input.shape[1:])
    timed = options.latency_runs and time_latency
    latency = latency_table(models, shape, options, say) if timed else []
    data = models[options.precision]
    write_bytes_atomic(path, data)
    if options.precision == "fp32":
        export.path = str(path)
    calibration_info = None if sample is None else {"rows": len(sample), "seed": options.seed,
                                                      "method": "minmax", "of_rows": len(calibration)}
    return DeployReport(
        path=str(Path(path)), precision=options.precision, io_types=options.io_types, file_bytes=len(data),
        export=export, precisions=results, latency=latency, calibration=calibration_info,
        untimed=models if options.latency_runs and not time_latency else {}, input_shape=shape,
    )


def _here(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def time_report(report: DeployReport, options: DeployOptions, at: Callable[..., Any] | None = None,
                progress: Callable[[str], None] | None = None) -> DeployReport:
    """Fill ``report.latency`` from its ``untimed`` models (``export_deployable(time_latency=False)``) through
    ``at(latency_table, models, input_shape, options)`` (an executor's ``at_target``: where the target is; default:
    here), and drop the models. ``progress`` is told here, on the caller's side, what is being timed."""
    if report.untimed:
        if progress is not None:
            batches = " and ".join(map(str, sorted({1, options.latency_batch})))
            progress(f"latency table: {', '.join(report.untimed)} at batch {batches}")
        report.latency = (at or _here)(latency_table, report.untimed, report.input_shape, options)
        report.untimed = {}
    return report


def export_timed(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str],
                 options: DeployOptions, *, runs: int, batch: int = 1, at: Callable[..., Any] | None = None,
                 calibration: torch.Tensor | None = None,
                 evaluation: tuple[torch.Tensor, torch.Tensor] | None = None,
                 progress: Callable[[str], None] | None = None):
    """:func:`export_deployable`, then its latency table and the written file's latency at ``batch`` (median of
    ``runs``), both through ``at(fn, *args, **kwargs)`` (an executor's ``at_target``: where the target is;
    default: here). Returns ``(DeployReport, LatencyReport)``."""
    report = export_deployable(model, example_input, path, options, calibration=calibration, evaluation=evaluation,
                               progress=progress, time_latency=False)
    time_report(report, options, at=at, progress=progress)
    shape = (batch, *example_input.shape[1:])
    return report, (at or _here)(measure_latency, Path(path).read_bytes(), shape, runs=runs)
