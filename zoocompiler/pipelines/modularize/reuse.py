"""On-demand reuse (paper 004 §3.4): the mixed module of M classes (the union of their modules' kernels)
with an M-class head, against reusing the whole standard model on the same sub-task.

``head="slice"`` keeps the M class rows of the existing classifier (no training); ``head="new"`` appends
a seeded random N→M layer and fine-tunes the sub-model for a few epochs on those classes' training
samples (the paper). The whole model gets the same head and the same fine-tuning. Both are exported to
ONNX at the chosen precision (``export_deployable``: the fp32 export parity-checked, fp16 checked against it,
int8 calibrated on the sub-task's training samples), timed in ONNX Runtime at batch 1 and evaluated on the
sub-task's test samples; the mixed module also gets the per-precision latency table.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.classes import check_classes
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.exports.deploy import check_deployable, export_timed
from zoocompiler.ir import output_value
from zoocompiler.training import evaluate, train

from ..base import Executor, LocalExecutor, Stages, write_report
from .config import ModularizeReuseConfig
from .extract import cut_module, kernel_sets
from .train import TrainedModularization, load_trained

MODULE_ONNX, WHOLE_ONNX = "module.onnx", "whole.onnx"


def slice_head(gm: fx.GraphModule, classes: list[int]) -> fx.GraphModule:
    """A copy of ``gm`` whose output keeps the logits of ``classes`` only: the classifier's rows when the
    output is a Linear module, else an ``index_select`` of the output."""
    new = copy.deepcopy(gm)
    out = output_value(new)
    index = torch.tensor(classes, dtype=torch.long)
    linear = new.get_submodule(out.target) if out.op == "call_module" else None
    if isinstance(linear, nn.Linear) and sum(1 for n in new.graph.nodes if n.target == out.target) == 1:
        linear.weight = nn.Parameter(linear.weight.detach()[index].clone())
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[index].clone())
        linear.out_features = len(classes)
        return new
    new.register_buffer("zc_head_classes", index)
    with new.graph.inserting_after(out):
        idx = new.graph.get_attr("zc_head_classes")
    with new.graph.inserting_after(idx):
        picked = new.graph.call_function(torch.index_select, (out, 1, idx))
    out.replace_all_uses_with(picked, delete_user_cb=lambda u: u is not picked)
    new.recompile()
    return new


class NewHead(nn.Module):
    """``head(body(x))``: a body's N logits mapped to M classes by a fresh linear layer."""

    def __init__(self, body: nn.Module, num_classes: int, classes: int, seed: int):
        super().__init__()
        self.body = body
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(num_classes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def with_head(body: fx.GraphModule, config: ModularizeReuseConfig, num_classes: int, sub_train: DataSplit,
              progress: bool) -> nn.Module:
    """``body`` with the sub-task head of ``config`` (fine-tuned for ``head="new"``), in eval mode."""
    if config.head == "slice":
        return slice_head(body, config.classes).eval()
    net = NewHead(copy.deepcopy(body), num_classes, len(config.classes), config.seed)
    train(net, sub_train, epochs=config.finetune_epochs, lr=config.lr, batch_size=64, seed=config.seed,
          progress=progress, desc="fine-tune")
    return net.eval()


def _measure(net: nn.Module, name: str, out_dir: Path, train_split: DataSplit, test: DataSplit, runs: int,
             deploy: DeployOptions, say: Callable[[str], None] | None = None,
             at: Callable[..., Any] | None = None) -> tuple[dict[str, Any], dict]:
    """Export ``net`` at ``deploy.precision`` to ``out_dir/name``, time the written file at batch 1 (through ``at``,
    an executor's ``at_target``: this machine or ``--latency-node``) and evaluate ``net`` (PyTorch, fp32) on
    ``test``: its report row and the deploy report (as a dict)."""
    shape = tuple(test.x.shape[1:])
    report, latency = export_timed(net, test.x[:2].clone(), out_dir / name, deploy, runs=runs, at=at,
                                   calibration=train_split.x, evaluation=(test.x, test.y), progress=say)
    accuracy = evaluate(net, test)
    row = {
        "onnx": name,
        "accuracy": accuracy,  # the PyTorch (fp32) model's; the written file's: onnx_precision.accuracy
        "macs": count_macs(net, shape, eval=True),
        "params": count_params(net),
        "latency_ms": latency.median_ms,  # the written file
        "onnx_max_abs_diff": report.export.max_abs_diff,  # the fp32 export's parity
        "onnx_precision": report.written(),
    }
    return row, report.to_dict(name)


def mixed_module(trained: TrainedModularization, config: ModularizeReuseConfig) -> tuple[fx.GraphModule, Any, dict]:
    """The mixed module of ``config.classes`` (cut per ``config``), its kernel mask and the layers whose τ
    was lowered."""
    sets = kernel_sets(trained.modular, load_dataset(trained.data, "train"))
    masks = sets.masks(trained.num_classes, config.threshold, trained.points)
    classes = list(config.classes)
    mask = masks.union(classes)
    body = cut_module(trained, mask, config.semantics, residual=config.residual, round_to=config.rounding()[0],
                      scores=masks.scores(classes), scale=masks.scale(classes))
    return body, mask, {str(c): masks.lowered[c] for c in classes if c in masks.lowered}


def reuse_to_dir(directory: str | Path, out_dir: Path, config: ModularizeReuseConfig,
                 say: Callable[[str], None] = lambda _msg: None, progress: bool = True,
                 executor: Executor | None = None) -> dict[str, Any]:
    """Write ``module.onnx``, ``whole.onnx`` and ``report.json`` for the sub-task ``config.classes`` of the
    trained ``directory`` into ``out_dir`` (a fresh staging directory); return the report. Latency is measured
    where ``executor.at_target`` runs (default: here)."""
    at = (executor or LocalExecutor()).at_target
    config.check()
    check_deployable(config.deploy)  # a CUDA provider without a GPU fails before any work
    round_to, round_to_reason = config.rounding()
    stages = Stages(say)
    with stages("load", f"load {directory}"):
        trained = load_trained(directory, trust_code=config.trust_code)
        check_classes(list(config.classes), trained.num_classes)
        sub_train = load_dataset(trained.data, "train", classes=config.classes)
        sub_test = load_dataset(trained.data, "test", classes=config.classes)
    with stages("modularize", f"mixed module of classes {','.join(map(str, config.classes))}"):
        body, mask, lowered = mixed_module(trained, config)
    whole_body = trained.standard if trained.standard is not None else trained.plain
    with stages("head", f"head: {config.head}"):
        module = with_head(body, config, trained.num_classes, sub_train, progress)
        whole = with_head(whole_body, config, trained.num_classes, sub_train, progress)
    with stages("measure", f"export ({config.deploy.precision}), time, evaluate"):
        module_row, deploy = _measure(module, MODULE_ONNX, out_dir, sub_train, sub_test, config.runs, config.deploy,
                                      say, at)
        whole_row, _ = _measure(whole, WHOLE_ONNX, out_dir, sub_train, sub_test, config.runs,
                                dataclasses.replace(config.deploy, latency_runs=0), at=at)
    report = {
        "source": str(directory),
        "spec": trained.record["config"]["spec"],
        "data": trained.data,
        "classes": list(config.classes),
        "head": config.head,
        "semantics": config.semantics,
        "residual": config.residual,
        "round_to": round_to,
        "round_to_reason": round_to_reason,
        "precision": config.deploy.precision,
        "threshold": config.threshold,
        "finetune_epochs": config.finetune_epochs if config.head == "new" else 0,
        "whole_model": "standard" if trained.standard is not None else "modular (no standard model trained)",
        "kernels": int(mask.sum()),
        "total_kernels": trained.points.kernels,
        "krr": float(mask.mean()),
        "lowered": lowered,
        "module": module_row,
        "whole": whole_row,
        "mac_ratio": module_row["macs"] / max(whole_row["macs"], 1),
        "latency_ratio": module_row["latency_ms"] / max(whole_row["latency_ms"], 1e-12),
        "accuracy_delta": module_row["accuracy"] - whole_row["accuracy"],
        "deploy": deploy,  # the mixed module's precisions and latency table
        "timings": stages.timings,
    }
    write_report(out_dir, report)
    return report
