"""Run-time choice of the slice rate over per-rate ONNX models (Model Slicing §4).

One physically smaller ONNX model is exported per slice rate r; ``ElasticModel`` holds one ONNX
Runtime session per rate and the measured per-sample time t(r) of each on this machine.

System degradation (§4.1): queries are collected into a mini-batch every T/2 seconds and the
other T/2 is spent processing it, so a batch of n samples runs at the largest r with
n·t(r) ≤ T/2 (``choose_rate``). The paper models t(r) as r²·t(1); here t(r) is measured per rate.

Cascade ranking (§4.2): stages at increasing rates each run on the items the previous stage
kept and keep the top k by score (``cascade_rank``); the r-subnets of one sliced model give
consistent rankings across stages.

A slice directory holds ``manifest.json`` (``MANIFEST_FORMAT``) naming one ONNX file per rate,
relative to the directory, with optional costs (``params``, ``macs``, ``latency_ms``,
``per_sample_ms``, ``accuracy``). Rates are compared with :func:`zoocompiler.core.rates.same_rate`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Context, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..core.atomic import write_json_atomic
from ..core.errors import ExportError, InputShapeError, LatencyBudgetError, UnknownRateError, ZooError
from ..core.rates import RATE_TOLERANCE, same_rate
from ..core.schema import NUMBER, ListOf, OneOf, load_json
from ..core.text import first_line
from .latency import ORT_INPUT_TYPES, measure_latency, ort_session

MANIFEST_FORMAT = "zoocompiler.slice-manifest/1"
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = {"format": OneOf((MANIFEST_FORMAT,)), "rates": ListOf({"rate": NUMBER, "onnx": str}, 1)}
# Budgets are compared in exact decimal arithmetic on the numbers as written (their shortest repr),
# so n·t(r) == T/2 is a tie whether t and T are binary (2**-10) or decimal (0.004) values.
_EXACT = Context(prec=80)

_ORT_TYPE_TO_NUMPY = {**ORT_INPUT_TYPES, "tensor(bool)": np.bool_}


@dataclass
class ElasticResult:
    """One ``ElasticModel.run``: first model output, the rate used, predicted and measured seconds.

    ``predicted_s`` is n·t(rate), or None when per-sample times are unknown.
    """

    outputs: np.ndarray
    rate: float
    predicted_s: float | None
    seconds: float


@dataclass
class CascadeStage:
    """One cascade stage: ran the ``rate`` model on ``n_in`` items and kept ``n_kept`` of them."""

    rate: float
    n_in: int
    n_kept: int
    seconds: float
    predicted_s: float | None


@dataclass
class CascadeResult:
    """Outcome of ``cascade_rank``.

    ``ranking``: indices into ``items``, best first (the last stage's survivors sorted by its score);
    ``scores``: the last stage's score of each ranked item. ``predicted_s`` = Σ n_in·t(rate) over the
    stages and ``baseline_s`` = len(items)·t(last rate) (None without per-sample times); ``macs`` and
    ``baseline_macs`` likewise from per-sample MACs (None without them).
    """

    ranking: np.ndarray
    scores: np.ndarray
    stages: list[CascadeStage] = field(default_factory=list)
    predicted_s: float | None = None
    baseline_s: float | None = None
    macs: float | None = None
    baseline_macs: float | None = None


def _check_rate(rate: object, where: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise ZooError(f"slice rate {rate!r} in {where} is not a number", "use rates in (0, 1], e.g. 0.25, 0.5, 1.0")
    r = float(rate)
    if not (0.0 < r <= 1.0 + RATE_TOLERANCE):
        raise ZooError(f"slice rate {r} in {where} is outside (0, 1]", "use rates in (0, 1], e.g. 0.25, 0.5, 1.0")
    return min(r, 1.0)


def _check_count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ZooError(f"batch size n must be an integer >= 1, got {n!r}", "pass the number of samples in the batch")
    return int(n)


def _check_budget(budget_s: object) -> float:
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float, np.integer, np.floating)):
        raise ZooError(f"latency budget must be a number of seconds, got {budget_s!r}", "pass e.g. budget_s=0.1")
    t = float(budget_s)
    if math.isnan(t) or t <= 0:
        raise ZooError(f"latency budget must be > 0 seconds, got {t}", "pass a positive budget, e.g. budget_s=0.1")
    return t


def _decimal(x: float) -> Decimal:
    """``x`` as the decimal its shortest repr names (0.1 → Decimal('0.1')), for exact budget comparisons."""
    return Decimal(repr(float(x)))


def _ceil_significant(x: Decimal, digits: int = 4) -> str:
    """``x`` rounded up to ``digits`` significant digits, as text (never below ``x``)."""
    return format(Context(prec=digits, rounding=ROUND_CEILING).plus(x).normalize(), "f")


def _find_rate(rates: Sequence[float], rate: float) -> float | None:
    for r in rates:
        if same_rate(r, rate):
            return r
    return None


def _rate_text(rates: Sequence[float]) -> str:
    return ", ".join(f"{r:g}" for r in rates)


class ElasticModel:
    """One ONNX Runtime session per slice rate, and the rule that picks a rate for a batch.

    ``paths`` maps rate → ONNX file. Every file must exist and all models must take one input
    of the same rank, dtype and fixed dimensions. ``providers`` (default CPU) and ``threads``
    configure each session as ``latency.ort_session`` does. ``per_sample`` (seconds per sample,
    per rate) may be given here, set later, loaded from a manifest, or measured with ``measure``.
    """

    def __init__(
        self,
        paths: Mapping[float, str | os.PathLike[str]],
        *,
        providers: list[str] | tuple[str, ...] | None = None,
        threads: int = 1,
        per_sample: Mapping[float, float] | None = None,
        metadata: Mapping[float, Mapping[str, Any]] | None = None,
    ):
        if not paths:
            raise ExportError("no slice-rate models given", "pass {rate: onnx_path} for at least one rate")
        checked: dict[float, Path] = {}
        for rate, path in paths.items():
            r = _check_rate(rate, "paths")
            if _find_rate(list(checked), r) is not None:
                raise ExportError(f"slice rate {r:g} is given twice", "pass one ONNX file per rate")
            file = Path(path)
            if not file.is_file():
                raise ExportError(
                    f"ONNX file for rate {r:g} not found: {file}", "export the r-subnet first or fix the path"
                )
            checked[r] = file
        self.rates: list[float] = sorted(checked)
        self.paths: dict[float, Path] = {r: checked[r] for r in self.rates}
        self.providers = providers
        self.threads = threads
        self._sessions = {r: self._open(r) for r in self.rates}
        self._input_name, self._input_shape, self._input_dtype = self._common_input()
        self._per_sample: dict[float, float] | None = None
        if per_sample is not None:
            self.per_sample = per_sample
        self.metadata: dict[float, dict[str, Any]] = {r: {} for r in self.rates}
        for rate, info in (metadata or {}).items():
            self.metadata[self._rate(rate)] = dict(info)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_manifest(
        cls,
        directory: str | os.PathLike[str],
        *,
        measure: bool = False,
        batch: int = 32,
        repeats: int = 20,
        providers: list[str] | tuple[str, ...] | None = None,
        threads: int = 1,
    ) -> ElasticModel:
        """The models listed in ``directory/manifest.json`` (paths relative to ``directory``).

        Per-sample times come from the manifest's ``per_sample_ms`` unless ``measure`` is true or
        any rate lacks one; then every rate is measured (``measure(batch, repeats)``). Each rate's
        manifest entry is kept in ``metadata``. Raises ``ExportError`` for a missing or malformed
        manifest or a missing ONNX file.
        """
        root = Path(directory)
        entries = read_manifest(root)
        paths = {e["rate"]: root / e["onnx"] for e in entries}
        metadata = {e["rate"]: e for e in entries}
        model = cls(paths, providers=providers, threads=threads, metadata=metadata)
        recorded = [e.get("per_sample_ms") for e in entries]
        if measure or any(not _positive_number(v) for v in recorded):
            model.measure(batch=batch, repeats=repeats)
        else:
            model.per_sample = {e["rate"]: e["per_sample_ms"] / 1e3 for e in entries}
        return model

    def _open(self, rate: float) -> ort.InferenceSession:
        try:
            return ort_session(self.paths[rate], threads=self.threads, providers=self.providers)
        except ZooError:
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            first = first_line(err, limit=200)
            raise ExportError(
                f"ONNX Runtime cannot load the rate-{rate:g} model {self.paths[rate]} ({first})",
                "re-export the r-subnet with zoocompiler.exports.export_onnx",
            ) from err

    def _common_input(self) -> tuple[str, tuple[int | str | None, ...], np.dtype]:
        """Input name, declared shape and dtype shared by every rate's model (fixed dims must agree)."""
        signatures = {}
        for r, s in self._sessions.items():
            inputs = s.get_inputs()
            if len(inputs) != 1:
                raise ExportError(
                    f"the rate-{r:g} model has {len(inputs)} inputs", "export each r-subnet with one input tensor"
                )
            if inputs[0].type not in _ORT_TYPE_TO_NUMPY:
                raise ExportError(
                    f"the rate-{r:g} model takes {inputs[0].type}", "export r-subnets with a float or integer input"
                )
            signatures[r] = (inputs[0].name, tuple(inputs[0].shape), inputs[0].type)
        first_rate = self.rates[0]
        name, shape, onnx_type = signatures[first_rate]
        for r, (_, other_shape, other_type) in signatures.items():
            clash = len(other_shape) != len(shape) or other_type != onnx_type
            clash = clash or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, other_shape)
            )
            if clash:
                raise ExportError(
                    f"rate {r:g} takes {other_type} {list(other_shape)} but rate {first_rate:g} takes "
                    f"{onnx_type} {list(shape)}",
                    "export every r-subnet of one sliced model with the same input shape and dtype",
                )
        merged = tuple(
            next((s[1][i] for s in signatures.values() if isinstance(s[1][i], int)), shape[i])
            for i in range(len(shape))
        )
        return name, merged, np.dtype(_ORT_TYPE_TO_NUMPY[onnx_type])

    # -- lookup -----------------------------------------------------------------------------------

    def _rate(self, rate: float) -> float:
        found = _find_rate(self.rates, float(rate))
        if found is None:
            raise UnknownRateError(f"no model for slice rate {rate!r}", f"use one of: {_rate_text(self.rates)}")
        return found

    def session(self, rate: float) -> ort.InferenceSession:
        """The ONNX Runtime session of ``rate`` (matched by ``same_rate``); ``UnknownRateError`` otherwise."""
        return self._sessions[self._rate(rate)]

    @property
    def input_shape(self) -> tuple[int | str | None, ...]:
        """Declared input shape, batch first; symbolic dimensions are names (or None)."""
        return self._input_shape

    @property
    def input_dtype(self) -> np.dtype:
        return self._input_dtype

    # -- per-sample times -------------------------------------------------------------------------

    @property
    def per_sample(self) -> dict[float, float] | None:
        """Seconds per sample at each rate (None until measured or set)."""
        return None if self._per_sample is None else dict(self._per_sample)

    @per_sample.setter
    def per_sample(self, times: Mapping[float, float]) -> None:
        checked: dict[float, float] = {}
        for rate, t in times.items():
            r = self._rate(rate)
            if not _positive_number(t):
                raise ZooError(f"per-sample time {t!r} for rate {r:g} is not a positive number", "pass seconds > 0")
            checked[r] = float(t)
        missing = [r for r in self.rates if r not in checked]
        if missing:
            raise ZooError(
                f"no per-sample time for rates {_rate_text(missing)}", "give one for every rate, or measure()"
            )
        self._per_sample = checked

    def _require_per_sample(self) -> dict[float, float]:
        if self._per_sample is None:
            raise ZooError("per-sample times are unknown", "call measure() or load a manifest with per_sample_ms first")
        return self._per_sample

    def measure(self, batch: int = 32, repeats: int = 20, *, warmup: int = 5) -> dict[float, float]:
        """Measure t(r) = median latency at ``batch`` / ``batch`` seconds for every rate; stores and returns it.

        Uses ``latency.measure_latency`` with this model's providers and threads. Symbolic non-batch
        input dimensions cannot be measured (``InputShapeError``); a fixed batch dimension must equal ``batch``.
        """
        batch = _check_count(batch)
        declared = self._input_shape
        if not declared:
            raise InputShapeError("the models take a scalar input", "export r-subnets with a batch dimension first")
        if isinstance(declared[0], int) and declared[0] != batch:
            raise InputShapeError(
                f"the models have a fixed batch of {declared[0]}, got batch={batch}",
                f"pass batch={declared[0]} or export with a dynamic batch dimension",
            )
        symbolic = [d for d in declared[1:] if not isinstance(d, int)]
        if symbolic:
            raise InputShapeError(
                f"input {list(declared)} has symbolic non-batch dimensions {symbolic}",
                "export r-subnets with fixed sample shapes, or set per_sample from your own measurements",
            )
        shape = (batch, *(int(d) for d in declared[1:]))
        times = {}
        for r in self.rates:
            report = measure_latency(
                self.paths[r], shape, runs=repeats, warmup=warmup, threads=self.threads, providers=self.providers
            )
            times[r] = report.median_ms / 1e3 / batch
        self.per_sample = times
        return dict(times)

    def predicted_seconds(self, n: int, rate: float) -> float:
        """n·t(rate): the predicted time to process ``n`` samples at ``rate``."""
        return _check_count(n) * self._require_per_sample()[self._rate(rate)]

    # -- the rate rule ------------------------------------------------------------------------------

    def choose_rate(self, n: int, budget_s: float) -> float:
        """The largest rate r with n·t(r) ≤ T/2 (T = ``budget_s``); ``LatencyBudgetError`` if none fits.

        The error names the smallest T that works for this n and the largest n that fits this T.
        """
        n, budget = _check_count(n), _check_budget(budget_s)
        times = self._require_per_sample()
        if math.isinf(budget):
            return self.rates[-1]
        half = _EXACT.divide(_decimal(budget), 2)
        fitting = [r for r in self.rates if _EXACT.multiply(n, _decimal(times[r])) <= half]
        if fitting:
            return max(fitting)
        fastest = min(self.rates, key=lambda r: times[r])
        t_fast = _decimal(times[fastest])
        needed = _EXACT.multiply(2 * n, t_fast)
        max_samples = int(_EXACT.divide_int(half, t_fast))
        needed_text = _ceil_significant(needed)
        split = f", or send at most {max_samples} samples per batch" if max_samples >= 1 else ""
        raise LatencyBudgetError(
            f"no slice rate processes {n} samples within budget T={budget:g} s: the fastest, rate "
            f"{fastest:g} at {times[fastest]:.3g} s/sample, needs T >= {needed_text} s",
            f"allow a latency budget of at least {needed_text} s for {n} samples{split}",
            needed_s=float(needed),
            max_samples=max_samples,
        )

    # -- running -------------------------------------------------------------------------------------

    def check_input(self, x: object) -> np.ndarray:
        """``x`` if it has the models' input dtype, rank and fixed dims and ≥ 1 sample; else ``InputShapeError``."""
        expected = f"{self._input_dtype.name} {list(self._input_shape)}"
        if not isinstance(x, np.ndarray):
            raise InputShapeError(f"expected a numpy array ({expected}), got {type(x).__name__}", "pass np.asarray(x)")
        got = f"{x.dtype.name} {list(x.shape)}"
        if x.dtype != self._input_dtype:
            raise InputShapeError(
                f"input dtype mismatch: expected {expected}, got {got}", f"pass x.astype(np.{self._input_dtype.name})"
            )
        bad_dims = len(x.shape) != len(self._input_shape) or any(
            isinstance(d, int) and d != s for d, s in zip(self._input_shape, x.shape)
        )
        if bad_dims:
            raise InputShapeError(
                f"input shape mismatch: expected {expected}, got {got}",
                "pass a batch (batch first) with the models' sample shape",
            )
        if x.shape[0] < 1:
            raise InputShapeError(f"empty batch: expected {expected}, got {got}", "pass at least one sample")
        return x

    def run(self, x: np.ndarray, budget_s: float | None = None, rate: float | None = None) -> ElasticResult:
        """Run the batch ``x`` at ``rate``, or at ``choose_rate(len(x), budget_s)``, or (neither) at the largest rate.

        Passing both ``budget_s`` and ``rate`` is an error. ``outputs`` is the model's first output.
        """
        x = self.check_input(x)
        if budget_s is not None and rate is not None:
            raise ZooError("both budget_s and rate given", "pass budget_s to choose the rate, or rate to fix it")
        n = int(x.shape[0])
        if rate is not None:
            chosen = self._rate(rate)
        elif budget_s is not None:
            chosen = self.choose_rate(n, budget_s)
        else:
            chosen = self.rates[-1]
        session = self._sessions[chosen]
        start = time.perf_counter()
        outputs = session.run(None, {self._input_name: x})[0]
        seconds = time.perf_counter() - start
        predicted = n * self._per_sample[chosen] if self._per_sample is not None else None
        return ElasticResult(outputs=np.asarray(outputs), rate=chosen, predicted_s=predicted, seconds=seconds)


def _positive_number(v: object) -> bool:
    ok_type = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return ok_type and math.isfinite(float(v)) and float(v) > 0


# -- manifest ---------------------------------------------------------------------------------------


def _manifest_error(path: Path, cause: str) -> ExportError:
    return ExportError(f"slice manifest {path}: {cause}", f"write it with write_manifest ({MANIFEST_FORMAT})")


def read_manifest(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rate entries of ``directory/manifest.json`` (each with float ``rate`` and str ``onnx``), ascending.

    Raises ``ExportError`` if the manifest is missing, not JSON, of another format, or lists no
    valid rates; ONNX files are not opened here.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"no {MANIFEST_NAME} in {Path(directory)}",
            "point to the directory the slice export wrote (it holds manifest.json and one ONNX file per rate)",
        )
    doc = load_json(path, MANIFEST_SCHEMA, what="slice manifest", error=ExportError,
                    fix=f"write it with write_manifest ({MANIFEST_FORMAT})")
    entries = doc["rates"]
    checked = []
    for i, entry in enumerate(entries):
        try:
            rate = _check_rate(entry["rate"], f"rates[{i}]")
        except ZooError as err:
            raise _manifest_error(path, err.cause) from err
        checked.append({**entry, "rate": rate})
    return sorted(checked, key=lambda e: e["rate"])


def write_manifest(
    directory: str | os.PathLike[str], entries: Sequence[Mapping[str, Any]], *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``directory/manifest.json`` atomically; returns its path.

    ``entries``: one mapping per rate with ``rate`` and ``onnx`` (a path relative to ``directory``,
    which must exist) plus any costs. ``extra`` adds top-level keys (``format`` and ``rates`` are reserved).
    """
    root = Path(directory)
    rates = []
    for entry in entries:
        if "rate" not in entry or not isinstance(entry.get("onnx"), str):
            raise ExportError("a manifest entry lacks 'rate' or a string 'onnx'", "give each entry both")
        if not (root / entry["onnx"]).is_file():
            raise ExportError(f"ONNX file {root / entry['onnx']} not found", "write the ONNX files before the manifest")
        rates.append({**entry, "rate": _check_rate(entry["rate"], "manifest entries")})
    reserved = {"format", "rates"} & set(extra or {})
    if reserved:
        raise ExportError(f"extra manifest keys {sorted(reserved)} are reserved", "rename them")
    doc = {"format": MANIFEST_FORMAT, "rates": sorted(rates, key=lambda e: e["rate"]), **(extra or {})}
    return write_json_atomic(root / MANIFEST_NAME, doc)


# -- cascade ranking ------------------------------------------------------------------------------------


def max_softmax_score(outputs: np.ndarray) -> np.ndarray:
    """Default cascade score: the output itself for (n,) or (n, 1) outputs, else the max softmax probability."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        return out
    flat = out.reshape(out.shape[0], -1)
    if flat.shape[1] == 1:
        return flat[:, 0]
    shifted = flat - flat.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).max(axis=1)


def _check_stages(model: ElasticModel, stages: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    if not stages:
        raise ZooError("cascade has no stages", "pass stages=[(rate, keep), ...] with increasing rates")
    checked: list[tuple[float, int]] = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, (tuple, list)) or len(stage) != 2:
            raise ZooError(f"stage {i} is {stage!r}, not (rate, keep)", "pass stages=[(rate, keep), ...]")
        rate, keep = model._rate(stage[0]), stage[1]
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
            raise ZooError(f"stage {i} keeps {keep!r} items", "keep an integer >= 1 per stage")
        if checked and rate <= checked[-1][0]:
            raise ZooError(
                f"stage {i} rate {rate:g} does not increase on stage {i - 1} rate {checked[-1][0]:g}",
                "order stages by strictly increasing slice rate (cheap filters first)",
            )
        if checked and keep > checked[-1][1]:
            raise ZooError(
                f"stage {i} keeps {int(keep)} items but stage {i - 1} passes on only {checked[-1][1]}",
                "make keep non-increasing along the cascade",
            )
        checked.append((rate, int(keep)))
    return checked


def _run_batched(model: ElasticModel, x: np.ndarray, rate: float, batch_size: int | None) -> np.ndarray:
    step = batch_size or len(x)
    return np.concatenate([model.run(x[i : i + step], rate=rate).outputs for i in range(0, len(x), step)])


def _scores(score: Callable[[np.ndarray], np.ndarray], outputs: np.ndarray, rate: float) -> np.ndarray:
    values = np.asarray(score(outputs), dtype=np.float64)
    if values.shape != (len(outputs),):
        raise ZooError(
            f"score returned shape {values.shape} for {len(outputs)} items at rate {rate:g}",
            "make score map outputs (n, ...) to one relevance value per item, shape (n,)",
        )
    if not np.isfinite(values).all():
        raise ZooError(f"score returned NaN or inf at rate {rate:g}", "make score finite for every item")
    return values


def cascade_rank(
    model: ElasticModel,
    items: np.ndarray,
    stages: Sequence[tuple[float, int]],
    score: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    batch_size: int | None = None,
) -> CascadeResult:
    """Cascade ranking (§4.2): stage i runs the rate-r_i model on the surviving items and keeps the top k_i.

    ``stages``: (rate, keep) with strictly increasing rates and non-increasing keeps (``ZooError``
    otherwise); a stage given fewer items than its keep keeps them all. ``score`` maps a stage's
    outputs (n, ...) to relevance (n,), higher is better (default ``max_softmax_score``). Ties are
    broken by the lower item index. ``batch_size`` splits each stage's run (default: one batch).
    """
    stage_list = _check_stages(model, stages)
    items = model.check_input(items)
    score_fn = score or max_softmax_score
    if batch_size is not None:
        batch_size = _check_count(batch_size)
    alive = np.arange(len(items))
    last_scores = np.empty(0)
    done: list[CascadeStage] = []
    for rate, keep in stage_list:
        start = time.perf_counter()
        values = _scores(score_fn, _run_batched(model, items[alive], rate, batch_size), rate)
        order = np.lexsort((alive, -values))[: min(keep, len(alive))]
        seconds = time.perf_counter() - start
        predicted = len(alive) * model.per_sample[rate] if model.per_sample is not None else None
        done.append(CascadeStage(rate, len(alive), len(order), seconds, predicted))
        alive, last_scores = alive[order], values[order]
    times = model.per_sample
    last_rate = stage_list[-1][0]
    macs = {r: model.metadata[r].get("macs") for r in model.rates}
    have_macs = all(_positive_number(macs[s.rate]) for s in done)
    return CascadeResult(
        ranking=alive,
        scores=last_scores,
        stages=done,
        predicted_s=sum(s.predicted_s for s in done) if times is not None else None,
        baseline_s=len(items) * times[last_rate] if times is not None else None,
        macs=float(sum(s.n_in * macs[s.rate] for s in done)) if have_macs else None,
        baseline_macs=float(len(items) * macs[last_rate]) if have_macs else None,
    )
