"""Deployment benchmark (issue 17): fp32 / fp16 / int8 ONNX models side by side on the CPU: size on disk,
accuracy (task models) or parity (random-weight architectures), and ONNX Runtime latency.

Usage::

    python bench/deploy.py                  # full run (~5-8 min on 2 shared cores; see docs/bench_deploy.md)
    python bench/deploy.py --quick          # smoke (< 2 min): mobilenet_v3_small at 64×64 and zoo:resnet_s, 3 runs
    python bench/deploy.py --models resnet18,zoo:vit_t --size 96 --runs 5
    python bench/deploy.py --assembly out/assembly   # the demo assembly from a `make demo` out dir
    python bench/deploy.py --render-only    # re-print the tables and redraw the plot from the JSON
    python bench/deploy.py --render-only --markdown  # the tables of docs/bench_deploy.md

Every model goes through ``export_deployable`` (``zoocompiler.exports.deploy``) once, with
``DeployOptions(precision="int8", latency_batch=32, latency_runs=--runs, latency_threads=--threads)``: the
verified fp32 export, the fp16 and int8 models derived from it (fp16 parity-checked against PyTorch, int8
QDQ calibrated on a seeded sample), their accuracy on the evaluation rows, and the ONNX Runtime CPU latency
table of all three at batch 1 and 32, measured in the same call. The int8 file it writes is also opened
with ORT's graph optimisations to count how many Conv/MatMul/Gemm kernels became int8 kernels.

Models:

* **architectures** (random weights, no task): torchvision ``resnet18``, ``resnet50``, ``mobilenet_v3_small``
  and timm ``vit_tiny_patch16_224`` (built with ``img_size=--size``), at 3×``--size``×``--size`` (default
  112), each original and pruned 50 % the way ``zoocompile prune`` does (``run_analysis(...,
  layernorm_streams="auto")``, ``plan_by_importance(gm, 0.5, importance="l1", strategy="union",
  scope="group", round_to=--round-to)`` (default 16: the CPU target's, ``core.deploy.round_to_for("int8")``),
  ``passes.rewrite.prune.prune``). Made realistic: norm affines randomised (γ ~ U(0.5, 1.5), β ~ N(0, 0.1))
  and BatchNorm running statistics re-estimated on 128 images (again after pruning, as fine-tuning would), so
  activations have a trained network's scale and the top-1 varies between inputs. Data: mnist5k images
  repeated to 3 channels and resized (bilinear) to the input size: int8 calibration from a seeded 1024-row
  sample of the train split, evaluation on the first ``--eval-rows`` test rows, scored against the PyTorch
  fp32 model's top-1, so "accuracy" is top-1 agreement with fp32 (and int8's accuracy guard is off for them:
  ``int8_max_drop=inf``; there is no task accuracy to guard).
* **task models**: the demo assembly (``assemble()`` on ``digits``, flops=3M as ``make demo``, small
  settings; or ``--assembly DIR`` of an earlier run) and the demo zoo's models (``zoo:NAME``, trained on
  mnist5k, shipped weights) on their own test split; int8 calibrated on their training split, with the
  accuracy guard of every command (``--int8-max-drop`` 1.0 point).

Targets (issue 17): int8 accuracy within 1 point of fp32 on every task model; int8 latency ≤ 0.6× fp32 at
batch 32 on the CPU CNNs (resnet18, resnet50, mobilenet_v3_small, original and pruned). Prints rich tables
(or ``--json``), writes ``bench/results/deploy.json`` and ``bench/results/deploy.png`` atomically.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn
import torch.nn.functional as F
from _measured import markdown_table, rich_table  # bench/_measured.py (this script's folder is on sys.path)
from rich.console import Console

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.deploy import PRECISIONS, DeployOptions, round_to_for
from zoocompiler.core.modules import count_macs, count_params

RESULTS = Path(__file__).resolve().parent / "results"
ARCHITECTURES = {
    "resnet18": "torchvision:resnet18",
    "resnet50": "torchvision:resnet50",
    "mobilenet_v3_small": "torchvision:mobilenet_v3_small",
    "vit_tiny": "timm:vit_tiny_patch16_224",
}
CPU_CNNS = ("resnet18", "resnet50", "mobilenet_v3_small")  # the latency target's models
ZOO_DEMO = ("resnet_s", "vgg_s", "vit_t", "convnext_t", "mobilenetv3_s", "densenet_s_0to4", "regnet_s_5to9")
TARGET_ACCURACY_DROP = 0.01  # int8 accuracy >= fp32 - 1 point on the task models
TARGET_LATENCY_RATIO = 0.6  # int8 latency <= 0.6 × fp32 at batch 32 on the CPU CNNs
DATA = "mnist5k"  # the image sample of the random-weight architectures
CALIBRATION_POOL = 1024  # rows of the train split the architectures' int8 calibration sample is drawn from
BN_ROWS = 128  # images the architectures' BatchNorm running statistics are re-estimated on
QUANTIZED_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "QAttention",
                     "DynamicQuantizeMatMul")
FLOAT_KERNELS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")
Log = Callable[[str], None]


@dataclass
class Case:
    """One model to deploy: what it is, its example input, calibration data and evaluation rows."""

    model: str  # e.g. resnet18, zoo:vit_t, assembly
    variant: str  # "original" or "pruned 50%"
    kind: str  # "architecture" (random weights, scored against fp32's top-1) or "task"
    module: nn.Module
    example: torch.Tensor
    calibration: torch.Tensor
    evaluation: tuple[torch.Tensor, torch.Tensor]
    facts: dict[str, Any]


# ----------------------------------------------------------------------------- building the models


def image_sample(size: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration pool, test images) of mnist5k as ``channels``×size×size: a seeded ``CALIBRATION_POOL``-row
    sample of the train split and the test split, channels repeated, resized bilinearly (normalised as
    ``load_dataset`` does; resizing commutes with the per-channel normalisation)."""
    from zoocompiler.data import load_dataset

    train, test = load_dataset(DATA, "train"), load_dataset(DATA, "test")
    order = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(0))[:CALIBRATION_POOL]

    def shaped(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if x.shape[-1] != size else x
        return x.repeat(1, channels // x.shape[1], 1, 1).contiguous()

    return shaped(train.x[order]), shaped(test.x)


def make_realistic(model: nn.Module, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """Randomised norm affines and BatchNorm running statistics re-estimated on ``images``
    (:func:`reestimate_batchnorm`), so activations are normalised as in a trained network; eval mode after."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():  # zero-initialised heads
                m.weight.normal_(0.0, 0.05, generator=gen)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.1, generator=gen)
    return reestimate_batchnorm(model, images)


def reestimate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics recomputed on the first ``BN_ROWS`` of ``images`` (cumulative average in
    train mode, no gradient; weights untouched); eval mode after. Models without BatchNorm are only put in
    eval mode."""
    batchnorms = [m for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batchnorms:
        momenta = [m.momentum for m in batchnorms]
        for m in batchnorms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches below
        model.train()
        with torch.no_grad():
            for batch in images[:BN_ROWS].split(32):
                model(batch)
        for m, momentum in zip(batchnorms, momenta):
            m.momentum = momentum
    return model.eval()


def prune_half(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None) -> tuple[nn.Module, dict]:
    """``model`` pruned as ``zoocompile prune --ratio R`` does (LayerNorm streams "auto", L1, union, group
    scope), with the pruned-vs-masked check; (pruned module, facts)."""
    from zoocompiler.passes.analysis import run_analysis, trace
    from zoocompiler.passes.analysis.plans import plan_by_importance
    from zoocompiler.passes.rewrite.prune import masked_reference, prune

    gm = run_analysis(trace(copy.deepcopy(model), x, analyze=False), layernorm_streams="auto")
    plan = plan_by_importance(gm, ratio, importance="l1", round_to=round_to, strategy="union", seed=0, scope="group")
    result = prune(gm, plan)
    with torch.no_grad():
        diff = float((result.module.eval()(x) - masked_reference(gm, plan).eval()(x)).abs().max())
    return result.module.eval(), {"ratio": ratio, "round_to": round_to, "pruned_vs_masked_max_abs_diff": diff}


def architecture_cases(name: str, size: int, ratio: float | None, round_to: int | None, eval_rows: int,
                       log: Log) -> list[Case]:
    """The random-weight architecture ``name`` at 3×size×size, original and (``ratio``) pruned."""
    from zoocompiler.sources import load_model

    spec = ARCHITECTURES[name] + (f",img_size={size}" if name == "vit_tiny" else "")
    torch.manual_seed(0)
    calibration, test = image_sample(size)
    model = make_realistic(load_model(spec), calibration)
    example, evaluation = test[:2].clone(), test[:eval_rows].clone()
    facts = {"spec": spec, "weights": "random (seed 0), norms randomised, BatchNorm statistics re-estimated"}
    variants = [("original", model, facts)]
    if ratio:
        log(f"{name}: pruning {ratio:.0%}")
        pruned, prune_facts = prune_half(model, example, ratio, round_to)
        # as fine-tuning would, re-centre the pruned network's BatchNorms (otherwise one class wins every input)
        pruned = reestimate_batchnorm(pruned, calibration)
        prune_facts["batchnorm_reestimated"] = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                   for m in pruned.modules())
        variants.append((f"pruned {ratio:.0%}", pruned, {**facts, "prune": prune_facts}))
    cases = []
    for variant, module, variant_facts in variants:
        with torch.no_grad():
            logits = torch.cat([module(b) for b in evaluation.split(64)])
        top2 = logits.topk(2, dim=1).values
        margin = float(((top2[:, 0] - top2[:, 1]) / logits.std(dim=1)).median())
        cases.append(Case(name, variant, "architecture", module, example, calibration, (evaluation, logits.argmax(1)),
                          {**variant_facts, "eval_classes_predicted": int(logits.argmax(1).unique().numel()),
                           "eval_top1_margin": round(margin, 4)}))
    return cases


def zoo_case(name: str) -> Case:
    """Demo-zoo model ``name`` (shipped weights) on its own task: mnist5k restricted to its classes."""
    from zoocompiler.data import load_dataset
    from zoocompiler.zoo import get_entry, load_zoo_model

    entry = get_entry(name)
    train = load_dataset(entry.dataset, "train", classes=entry.classes)
    test = load_dataset(entry.dataset, "test", classes=entry.classes)
    facts = {"spec": entry.spec, "data": entry.dataset, "classes": list(entry.classes),
             "zoo_test_accuracy": entry.test_accuracy}
    return Case(f"zoo:{name}", "original", "task", load_zoo_model(name).eval(), test.x[:2].clone(), train.x,
                (test.x, test.y), facts)


def _quiet_config(cls, **kw):
    """``cls(**kw)`` plus, when the config has a ``deploy`` field (issue 17), no latency table of its own."""
    if any(f.name == "deploy" for f in fields(cls)):
        kw["deploy"] = DeployOptions(latency_runs=0)
    return cls(**kw)


def assembly_case(directory: Path | None, epochs: int, log: Log) -> Case:
    """The demo assembly, tuned: from ``directory`` (a ``zoocompile assemble`` out dir: plan.json +
    assembly.safetensors), else ``assemble()`` on the ``make demo`` task with small settings into a scratch
    directory. Evaluated on the task's test split, calibrated on its fit split."""
    from safetensors.torch import load_file

    from zoocompiler.core.budget import Budget
    from zoocompiler.pipelines.assemble.config import AssembleConfig
    from zoocompiler.pipelines.assemble.pipeline import assemble, read_plan, rebuild
    from zoocompiler.pipelines.assemble.task import load_task

    facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zc_bench_deploy_") as tmp:
        if directory is None:
            config = _quiet_config(AssembleConfig, budget=Budget.parse("flops=3M"), restarts=50, top=5, tune_top=1,
                                   baselines=False, tune="full", epochs=epochs, latency_runs=3)
            log(f"assembly: running assemble() (flops=3M, {epochs} epochs of full tuning, no baselines)")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                report = assemble(config, Path(tmp))
            directory = Path(tmp)
            facts = {"source": "assemble() (budget flops=3M, restarts 50, top 5, tune_top 1, no baselines, "
                               f"full tuning {epochs} epochs)", "assemble_seconds": round(time.perf_counter() - t0, 1),
                     "pipeline_accuracy": report["accuracy"], "chosen_source": report.get("chosen_source"),
                     "blocks": [f"{b['model']}[{b['positions'][0]}:{b['positions'][1]}]" for b in report["chosen"]]}
        else:
            facts = {"source": str(directory)}
        plan = read_plan(directory / "plan.json")
        net = rebuild(plan)
        net.load_state_dict(load_file(str(directory / "assembly.safetensors")))
        net.eval()
    task = load_task(plan["data"], **plan["task"])
    facts.update(data=plan["data"], test_rows=len(task.test))
    return Case("assembly", "original", "task", net, task.test.x[:2].clone(), task.fit.x, (task.test.x, task.test.y),
                facts)


# ----------------------------------------------------------------------------- measuring


def int8_kernels(path: Path) -> dict[str, int]:
    """Conv/MatMul/Gemm kernels of the int8 model after ONNX Runtime's graph optimisations (what the latency
    sessions run, ``ORT_ENABLE_ALL``): int8 kernels (QLinearConv, QGemm, ...) against float ones left between
    Q/DQ pairs."""
    with tempfile.TemporaryDirectory(prefix="zc_int8_") as tmp:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp, "opt.onnx"))
        options.log_severity_level = 3
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {"int8": sum(ops[k] for k in QUANTIZED_KERNELS), "float": sum(ops[k] for k in FLOAT_KERNELS),
            "ops": {k: v for k, v in sorted(ops.items()) if k in QUANTIZED_KERNELS + FLOAT_KERNELS}}


def deploy_case(case: Case, options: DeployOptions, tmp: Path, log: Log) -> dict[str, Any]:
    """``export_deployable`` of one case (int8 written; fp32 written instead when int8 cannot be built) and the
    row of results: sizes, parity, accuracy/agreement, CPU latency per precision and batch, ratios to fp32."""
    from zoocompiler.core.errors import ZooError
    from zoocompiler.exports.deploy import export_deployable

    label = f"{case.model} ({case.variant})"
    row: dict[str, Any] = {"model": case.model, "variant": case.variant, "kind": case.kind,
                           "input": list(case.example.shape[1:]), "params": count_params(case.module),
                           "macs": count_macs(case.module, case.example[:1]), **case.facts}
    path = tmp / f"{case.model.replace(':', '_')}_{case.variant.split()[0]}.onnx"
    t0 = time.perf_counter()
    kwargs = dict(calibration=case.calibration, evaluation=case.evaluation,
                  progress=lambda text: log(f"{label}: {text}"))
    if case.kind == "architecture":  # no task: its labels are fp32's own top-1, so the accuracy guard is off
        options = replace(options, int8_max_drop=math.inf)
    try:
        report = export_deployable(case.module, case.example, path, options, **kwargs)
    except ZooError as err:  # int8 cannot be built for this model: keep fp32 and fp16, int8's error in its row
        log(f"{label}: int8 failed ({err}); measuring fp32 and fp16")
        report = export_deployable(case.module, case.example, path, replace(options, precision="fp32"), **kwargs)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    deploy = report.to_dict()
    row["export"] = {k: deploy["export"].get(k) for k in ("exporter", "opset", "max_abs_diff", "tolerance",
                                                           "onnx_nodes", "dynamic_batch")}
    row["calibration"] = deploy["calibration"]
    row["precisions"] = deploy["precisions"]
    row["latency"] = deploy["latency"]
    if report.precision == "int8":
        row["int8_kernels"] = int8_kernels(path)
    return with_ratios(row)


def cpu_latency(row: dict[str, Any], key: str = "median_ms") -> dict[str, dict[str, float]]:
    """{precision: {batch: ms}} of the CPU rows measured (``key``: median_ms, p10_ms or p90_ms)."""
    out: dict[str, dict[str, float]] = {}
    for r in row.get("latency", []):
        if r["provider"] == "CPUExecutionProvider" and r.get("status") == "ok":
            out.setdefault(r["precision"], {})[str(r["batch"])] = r[key]
    return out


def _ratios(lat: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    base = lat.get("fp32", {})
    return {p: {b: ms / base[b] for b, ms in per.items() if base.get(b)} for p, per in lat.items()}


def with_ratios(row: dict[str, Any]) -> dict[str, Any]:
    """Latency and size ratios of every precision to fp32, and the CUDA rows' status."""
    row["latency_ms"] = cpu_latency(row)
    row["latency_ratio"] = _ratios(row["latency_ms"])
    # the same ratio of the 10th percentiles: the runs least disturbed by other processes on a shared machine
    row["latency_ratio_p10"] = _ratios(cpu_latency(row, "p10_ms"))
    sizes = {p: r.get("file_bytes") for p, r in row["precisions"].items()}
    row["size_ratio"] = {p: s / sizes["fp32"] for p, s in sizes.items() if s and sizes.get("fp32")}
    row["cuda"] = sorted({str(r.get("status")) for r in row["latency"] if r["provider"] != "CPUExecutionProvider"})
    return row


# ----------------------------------------------------------------------------- targets, tables, plot


def targets(rows: list[dict], large_batch: str) -> list[dict]:
    """The issue's two targets, one entry per model they apply to, each met or missed."""
    out = []
    for r in rows:
        p = r.get("precisions", {})
        if r["kind"] == "task":
            change = (p.get("int8") or {}).get("accuracy_change")
            out.append({"target": f"int8 accuracy within {TARGET_ACCURACY_DROP * 100:.0f} point of fp32",
                        "model": r["model"], "variant": r["variant"],
                        "value": None if change is None else round(100 * change, 2), "unit": "points",
                        "met": None if change is None else change >= -TARGET_ACCURACY_DROP - 1e-12})
        if r["model"] in CPU_CNNS:
            ratio = r.get("latency_ratio", {}).get("int8", {}).get(large_batch)
            p10 = r.get("latency_ratio_p10", {}).get("int8", {}).get(large_batch)
            out.append({"target": f"int8 latency <= {TARGET_LATENCY_RATIO}x fp32 at batch {large_batch}",
                        "model": r["model"], "variant": r["variant"],
                        "value": None if ratio is None else round(ratio, 3), "unit": "x fp32",
                        "p10_value": None if p10 is None else round(p10, 3),
                        "met": None if ratio is None else ratio <= TARGET_LATENCY_RATIO})
    return out


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("MET" if met else "MISSED")


def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one line per model × precision."""
    batches = [str(b) for b in doc["setup"]["batches"]]
    header = ["model", "variant", "input", "params", "precision", "size MB", "parity (rel)", "accuracy",
              "Δ pts", "top-1 = fp32", *[f"b{b} ms" for b in batches], f"b{batches[-1]} ×fp32"]
    cells = []
    for r in doc["rows"]:
        shape = "×".join(map(str, r.get("input", [])))
        if "error" in r:
            cells.append([r["model"], r["variant"], shape, "-", "-", f"failed: {r['error'][:90]}"]
                         + ["-"] * (len(header) - 6))
            continue
        for precision in PRECISIONS:
            p = r["precisions"].get(precision)
            if p is None:
                continue
            first = precision == next(iter(r["precisions"]))
            lead = [r["model"], r["variant"], shape, f"{r['params'] / 1e6:.2f}M"] if first else ["", "", "", ""]
            if p.get("error"):
                cells.append([*lead, precision, "not built (1)"] + ["-"] * (len(header) - 6))
                continue
            task = r["kind"] == "task"
            change = p.get("accuracy_change")
            lat = r["latency_ms"].get(precision, {})
            ratio = r["latency_ratio"].get(precision, {}).get(batches[-1])
            cells.append([
                *lead, precision, _mb(p.get("file_bytes")),
                "-" if p.get("rel_diff") is None else f"{p['rel_diff']:.1e}",
                _pct(p.get("accuracy")) if task else "-",
                ("-" if change is None else f"{100 * change:+.2f}") if task else "-",
                _pct(p.get("agreement")),
                *["-" if b not in lat else f"{lat[b]:.2f}" for b in batches],
                "-" if ratio is None else f"{ratio:.2f}",
            ])
    return header, cells


def notes(doc: dict) -> list[str]:
    """Why a precision was not built, numbered as the main table refers to them."""
    return [f"(1) {r['model']} ({r['variant']}) {precision} not built: {p['error']}"
            for r in doc["rows"] if "error" not in r
            for precision, p in r["precisions"].items() if p.get("error")]


def architecture_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """What the random-weight architectures' agreement numbers rest on: MACs, classes the fp32 model predicts
    on the evaluation rows, the median top-1 margin (top-1 minus top-2 logit over the logits' std)."""
    header = ["model", "variant", "MACs", "classes predicted", "median top-1 margin", "pruned vs masked"]
    cells = []
    for r in doc["rows"]:
        if r.get("kind") != "architecture" or "error" in r:
            continue
        diff = (r.get("prune") or {}).get("pruned_vs_masked_max_abs_diff")
        cells.append([r["model"], r["variant"], f"{r['macs'] / 1e6:.1f}M", str(r["eval_classes_predicted"]),
                      f"{r['eval_top1_margin']:.3f}", "-" if diff is None else f"{diff:.1e}"])
    return header, cells


def target_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["target", "model", "variant", "value (median)", "value (p10)", "verdict"]
    cells = [[t["target"], t["model"], t["variant"], "-" if t["value"] is None else f"{t['value']:g} {t['unit']}",
              "-" if t.get("p10_value") is None else f"{t['p10_value']:g} {t['unit']}", _verdict(t["met"])]
             for t in doc["targets"]]
    return header, cells


def kernel_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "variant", "int8 kernels", "float kernels left", "ops after ORT optimisation"]
    cells = []
    for r in doc["rows"]:
        k = r.get("int8_kernels")
        if k:
            cells.append([r["model"], r["variant"], str(k["int8"]), str(k["float"]),
                          ", ".join(f"{op} {n}" for op, n in k["ops"].items())])
    return header, cells


def title(doc: dict) -> str:
    s = doc["setup"]
    return (f"deploy benchmark: ORT CPU, {s['threads']} intra-op thread(s), median of {s['runs']} runs; "
            f"architectures at 3×{s['size']}×{s['size']} (pruned {s['ratio']:.0%}, round_to {s['round_to']}), "
            f"int8 calibrated on {s['calibration_size']} rows")


TABLES = (("main", table_rows), ("architectures", architecture_rows), ("targets", target_rows),
          ("kernels", kernel_rows))
TEXT_COLUMNS = ("model", "variant", "precision", "target", "verdict", "ops after ORT optimisation")


def render(doc: dict, console: Console) -> None:
    titles = {"main": title(doc), "targets": "targets (issue 17)",
              "architectures": "random-weight architectures: what their top-1 agreement rests on",
              "kernels": "int8 models after ONNX Runtime's graph optimisations"}
    for name, rows_of in TABLES:
        header, cells = rows_of(doc)
        console.print(rich_table(titles[name], header, cells, TEXT_COLUMNS))
        if name == "main":
            for line in notes(doc):
                console.print(line)
    if "seconds" in doc:
        console.print(f"measured in {doc['seconds']:.0f} s")


def markdown(doc: dict) -> str:
    out = []
    for name, rows_of in TABLES:
        header, cells = rows_of(doc)
        out += markdown_table(header, cells, TEXT_COLUMNS)
        if name == "main" and notes(doc):
            out += [line.replace("|", "/") for line in notes(doc)] + [""]
    return "\n".join(out)


def plot(doc: dict, path: Path) -> None:
    """Three panels: latency ratio to fp32 at the large batch (fp16, int8) with the 0.6 target; int8 accuracy
    change on the task models with the -1 point bound; size on disk per precision. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "error" not in r]
    large = str(doc["setup"]["batches"][-1])
    labels = [r["model"] + (" p" if r["variant"] != "original" else "") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    x = np.arange(len(rows))
    for offset, precision in ((-0.2, "fp16"), (0.2, "int8")):
        ax.bar(x + offset, [r["latency_ratio"].get(precision, {}).get(large, np.nan) for r in rows], 0.4,
               label=precision)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET_LATENCY_RATIO, color="r", ls=":", lw=1, label=f"int8 target ({TARGET_LATENCY_RATIO}×, CPU CNNs)")
    ax.set(title=f"ORT CPU latency / fp32, batch {large}", ylabel="ratio to fp32")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    tasks = [r for r in rows if r["kind"] == "task"]
    xt = np.arange(len(tasks))
    for offset, precision in ((-0.2, "fp16"), (0.2, "int8")):
        ax.bar(xt + offset, [100 * ((r["precisions"].get(precision) or {}).get("accuracy_change") or 0.0)
                             for r in tasks], 0.4, label=precision)
    ax.axhline(-100 * TARGET_ACCURACY_DROP, color="r", ls=":", lw=1, label="int8 target (-1 point)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(title="task accuracy change vs fp32", ylabel="points")
    ax.set_xticks(xt, [r["model"] for r in tasks], rotation=60, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    for offset, precision in ((-0.27, "fp32"), (0.0, "fp16"), (0.27, "int8")):
        ax.bar(x + offset, [((r["precisions"].get(precision) or {}).get("file_bytes") or np.nan) / 1e6 for r in rows],
               0.27, label=precision)
    ax.set_yscale("log")
    ax.set(title="size on disk", ylabel="MB")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*ARCHITECTURES, "assembly", "zoo", *(f"zoo:{n}" for n in ZOO_DEMO)]
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: mobilenet_v3_small (original + pruned) at 64×64 and zoo:resnet_s, 3 runs")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(names)} (zoo: every zoo:NAME)")
    parser.add_argument("--size", type=int, help="architectures' input is 3×SIZE×SIZE (default 112; --quick 64)")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of the pruned variants (0: none)")
    parser.add_argument("--round-to", type=int, default=round_to_for("int8", None, None)[0],
                        help="channel multiple of the pruned variants (default: the CPU target's, 16)")
    parser.add_argument("--batch", type=int, default=32, help="the large batch of the latency table (and 1)")
    parser.add_argument("--runs", type=int, help="timed runs per latency cell (default 10; --quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (and torch's)")
    parser.add_argument("--calibration-size", type=int, default=DeployOptions.calibration_size,
                        help="int8 calibration rows (seeded sample)")
    parser.add_argument("--eval-rows", type=int, help="test rows the architectures are scored on (default 256)")
    parser.add_argument("--assembly", type=Path, metavar="DIR",
                        help="use the assembly in this zoocompile assemble out dir instead of running assemble()")
    parser.add_argument("--assembly-epochs", type=int, default=3, help="full-tuning epochs of the assemble() run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--out", type=Path, default=RESULTS / "deploy.json", help="JSON results path")
    parser.add_argument("--render-only", action="store_true", help="re-render the tables and plot from --out")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: the tables as markdown")
    args = parser.parse_args(argv)
    default = "mobilenet_v3_small,zoo:resnet_s" if args.quick else ",".join([*ARCHITECTURES, "assembly", "zoo"])
    chosen = []
    for name in (args.models or default).split(","):
        if name not in names:
            parser.error(f"unknown model {name!r}; use some of: {', '.join(names)}")
        chosen += [f"zoo:{n}" for n in ZOO_DEMO] if name == "zoo" else [name]
    args.models = list(dict.fromkeys(chosen))
    args.size = args.size or (64 if args.quick else 112)
    args.runs = args.runs or (3 if args.quick else 10)
    args.eval_rows = args.eval_rows or (64 if args.quick else 256)
    if args.ratio and not 0 < args.ratio < 1:
        parser.error("--ratio must be 0 (no pruned variants) or strictly between 0 and 1")
    return args


def run(args: argparse.Namespace, log: Log) -> dict:
    options = DeployOptions(precision="int8", calibration_size=args.calibration_size, latency_batch=args.batch,
                            latency_runs=args.runs, latency_threads=args.threads)
    options.check()
    rows: list[dict] = []
    started = time.perf_counter()
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="zc_bench_deploy_"))
    try:
        for name in args.models:
            t0 = time.perf_counter()
            try:
                if name in ARCHITECTURES:
                    cases = architecture_cases(name, args.size, args.ratio, args.round_to, args.eval_rows, log)
                elif name == "assembly":
                    cases = [assembly_case(args.assembly, args.assembly_epochs, log)]
                else:
                    cases = [zoo_case(name.removeprefix("zoo:"))]
            except Exception as err:  # noqa: BLE001 - a model that cannot be built is a failed row, not a lost run
                log(f"{name}: could not be built: {_one_line(err)}")
                rows.append({"model": name, "variant": "original", "kind": "?", "error": _one_line(err)})
                continue
            for case in cases:
                try:
                    rows.append(deploy_case(case, options, tmp, log))
                except Exception as err:  # noqa: BLE001 - recorded and reported
                    log(f"{case.model} ({case.variant}): failed: {_one_line(err)}")
                    rows.append({"model": case.model, "variant": case.variant, "kind": case.kind,
                                 "input": list(case.example.shape[1:]), "error": _one_line(err)})
            log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    setup = {
        "size": args.size, "batches": sorted({1, args.batch}), "runs": args.runs,
        "warmup": max(1, args.runs // 5), "threads": args.threads, "ratio": args.ratio, "round_to": args.round_to,
        "calibration_size": args.calibration_size, "eval_rows": args.eval_rows, "data": DATA,
        "provider": "CPUExecutionProvider", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores", "load_average_start": round(load, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    doc = {"setup": setup, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    doc["targets"] = targets(rows, str(max(setup["batches"])))
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.render_only:
        doc = json.loads(args.out.read_text())
        if args.markdown:
            print(markdown(doc))
            return 0
    else:
        torch.set_num_threads(args.threads)
        log_console = Console(stderr=True)
        doc = run(args, lambda text: log_console.log(text))
        write_json_atomic(args.out, doc)
    plot(doc, args.out.with_suffix(".png"))
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        render(doc, console)
        if not args.render_only:
            console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
