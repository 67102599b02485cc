"""Export a trained sliceable model: one verified ONNX model per slice rate plus ``manifest.json``.

Rates come from a list or from MAC budgets (:func:`~zoocompiler.passes.rewrite.slicing.rate_for_budget`,
measured MACs). Every r-subnet is materialised by the prune pass, exported with ONNX Runtime parity
checked at the deployment precision (``DeployOptions``: fp32, fp16, or int8 calibrated on the training
split; docs/deploy.md), timed as written (batch 1, and per sample at ``latency_batch``) and evaluated on
the test split. Only the largest rate gets the per-precision latency table. The manifest is what
:class:`~zoocompiler.exports.elastic.ElasticModel` serves from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zoocompiler.core.budget import Budget
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError
from zoocompiler.core.rates import same_rate
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.exports.deploy import check_deployable, export_deployable, time_report
from zoocompiler.exports.elastic import MANIFEST_NAME, write_manifest
from zoocompiler.exports.latency import measure_latency
from zoocompiler.passes.rewrite.slicing import SliceableModel, rate_for_budget
from zoocompiler.training import evaluate

from ..base import Executor, LocalExecutor, Stages, local_only
from .config import SliceExportConfig
from .train import load_trained, plot_accuracy, requested_rates

PLOT_FILE = "rates.png"


def parse_flops(text: str) -> list[float]:
    """``"10M,20M"`` → MAC budgets (suffixes k/M/G as in ``--budget``); bad items are a ``ZooError``."""
    out = []
    for item in text.split(","):
        try:
            out.append(Budget.parse(f"flops={item.strip()}").macs)
        except ZooError as err:
            raise ZooError(f"bad MAC budget {item.strip()!r}",
                           "pass comma-separated positive MAC counts, e.g. 10M,2.5M (suffixes k, M, G)") from err
    return out


def onnx_name(rate: float) -> str:
    return f"rate_{rate:.4f}.onnx"


def export_rates(
    directory: str | Path,
    out_dir: Path,
    *,
    rates: list[float] | None = None,
    flops: list[float] | None = None,
    latency_batch: int = SliceExportConfig.latency_batch,
    runs: int = SliceExportConfig.runs,
    say: Callable[[str], None] = lambda _msg: None,
    executor: Executor | None = None,
    trust_code: bool = False,
    deploy: DeployOptions | None = None,
) -> dict[str, Any]:
    """Write ``rate_*.onnx``, ``manifest.json`` and ``rates.png`` for the trained ``directory`` into
    ``out_dir`` (a fresh staging directory) and return the manifest. Without ``rates``/``flops``:
    every valid rate ≥ the training lower bound. Each rate is an independent item of ``executor``
    (default: in-process, in order). ``trust_code``: see :func:`~.train.load_trained` (a ``python:``
    spec in ``slice.json`` is refused without it). ``deploy``: the files' precision (default: fp32, the
    latency table at ``latency_batch`` over ``runs``); each row's ``deploy`` is its file's precision result, the
    manifest's ``deploy`` the largest rate's whole report (with the latency table when ``deploy.latency_runs``
    > 0)."""
    deploy = deploy or DeployOptions(latency_batch=latency_batch, latency_runs=runs)
    deploy.check()
    check_deployable(deploy)  # a CUDA provider without a GPU fails before any work
    model, record = load_trained(directory, trust_code=trust_code)
    lb = record["config"]["lb"]
    budgets: dict[float, float] = {}
    if flops:
        for c in flops:
            budgets.setdefault(rate_for_budget(model, flops=c, lb=lb), c)
    chosen = requested_rates(model, record, [*(rates or []), *budgets])
    if not chosen:
        chosen = model.valid_rates(lb)
    data = record["config"]["data"]
    test = load_dataset(data, "test")
    calibration = load_dataset(data, "train").x if deploy.precision == "int8" or deploy.latency_runs else None
    shape = tuple(record["input_shape"])
    executor = executor or LocalExecutor()
    export_one = functools.partial(
        _export_rate, model=model, test=test, say=local_only(executor, say), deploy=deploy, main=max(chosen),
        calibration=calibration,
    )
    stages = Stages()
    with stages("export"):
        rows = executor.map_writing(export_one, chosen, out_dir)
    with stages("latency"):  # on this machine or --latency-node, never on a worker
        for row in rows:
            written = (out_dir / row["onnx"]).read_bytes()  # at its precision
            one = executor.at_target(measure_latency, written, (1, *shape), runs=runs)
            batch = executor.at_target(measure_latency, written, (latency_batch, *shape), runs=max(5, runs // 3))
            row["latency_ms"], row["per_sample_ms"] = one.median_ms, batch.median_ms / latency_batch
        main = next(report for report in [row.pop("deploy_report") for row in rows] if report is not None)
        main_report = time_report(main, deploy, at=executor.at_target, progress=say).to_dict(main.path)
    for row in rows:
        row["budget_macs"] = next((c for q, c in budgets.items() if same_rate(q, row["rate"])), None)
    full = next((row for row in rows if same_rate(row["rate"], 1.0)), None)
    extra = {
        "source": str(directory),
        "spec": record["config"]["spec"],
        "data": data,
        "input_shape": list(shape),
        "groups": model.groups,
        "lb": lb,
        "latency_batch": latency_batch,
        "threads": 1,
        "precision": deploy.precision,
        "io_types": deploy.io_types,
        "deploy": main_report,
        "torch": torch.__version__,
        "full_macs": full["macs"] if full else model.macs_at(1.0),
        "timings": stages.timings,
    }
    plot_accuracy(rows, out_dir / PLOT_FILE, f"{extra['spec']}: exported rates")
    write_manifest(out_dir, rows, extra=extra)
    return read_manifest_doc(out_dir)


def _export_rate(
    r: float,
    folder: Path,
    *,
    model: SliceableModel,
    test: DataSplit,
    say: Callable[[str], None] | None,
    deploy: DeployOptions,
    main: float,
    calibration: torch.Tensor | None,
) -> dict[str, Any]:
    """Slice, export into ``folder`` (parity checked, at ``deploy.precision``) and evaluate one rate; its manifest
    row without latency, with ``deploy_report`` (for the ``main`` rate: its ``DeployReport``, the latency table
    still to time; None for the others)."""
    is_main = same_rate(r, main)
    if say is not None:
        say(f"rate {r:g}: slice, export ({deploy.precision}), evaluate")
    sliced = model.slice(r)
    path = folder / onnx_name(sliced.rate)
    options = deploy if is_main else dataclasses.replace(deploy, latency_runs=0)  # one latency table: the main rate
    report = export_deployable(sliced.module, test.x[:2].clone(), path, options, calibration=calibration,
                               evaluation=(test.x, test.y), time_latency=False)
    report.path = path.name
    accuracy = evaluate(sliced.module, test)
    return {
        "rate": sliced.rate,
        "onnx": path.name,
        "params": sliced.params,
        "macs": sliced.macs,
        "accuracy": accuracy,  # the PyTorch r-subnet (fp32)
        "max_abs_diff": report.export.max_abs_diff,  # the fp32 export against PyTorch
        "precision": report.precision,
        "deploy": report.written(),
        "deploy_report": report if is_main else None,
    }


def read_manifest_doc(directory: Path) -> dict[str, Any]:
    """The whole manifest document (the runtime's ``read_manifest`` returns its rate entries only)."""
    from zoocompiler.core.errors import ExportError
    from zoocompiler.core.schema import load_json
    from zoocompiler.exports.elastic import MANIFEST_SCHEMA

    return load_json(directory / MANIFEST_NAME, MANIFEST_SCHEMA, what="slice manifest", error=ExportError)
