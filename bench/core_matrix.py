"""Per-architecture report of the core analysis: nodes, cut points, unit groups, FLOPs, ONNX parity.

Usage: ``python bench/core_matrix.py [--only ID,...] [--no-onnx]``. Prints a table and writes
``bench/results/core_matrix.json``. Not a timed benchmark: it records what the analysis finds.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.architectures import ARCHS, block_output_nodes, traced  # noqa: E402

from zoocompiler.core.atomic import write_json_atomic  # noqa: E402
from zoocompiler.core.modules import count_macs  # noqa: E402
from zoocompiler.ir import graph_info  # noqa: E402
from zoocompiler.passes.analysis.costs import total_cost  # noqa: E402


def _reason_kind(reason: str) -> str:
    return reason.split(" (node ")[0].split(" at ")[0].split(":")[0][:60]


def analyse(case, onnx: bool) -> dict:
    t0 = time.perf_counter()
    model, x, gm = traced(case.id)
    seconds = time.perf_counter() - t0
    info = graph_info(gm)
    ref = 2 * count_macs(model, x)  # FLOPs per torch.utils.flop_counter
    ours = total_cost(gm).flops
    groups = info.unit_groups
    pinned = [g for g in groups if g.pinned]
    reasons = collections.Counter(_reason_kind(r) for g in pinned for r in g.reasons)
    cuts = set(info.cut_points)
    block_cuts = sum(1 for node in block_output_nodes(gm, case.block_types).values() if node in cuts)
    row = {
        "arch": case.id,
        "spec": case.spec,
        "input": list(x.shape),
        "tracer": info.tracer,
        "nodes": len(gm.graph.nodes),
        "cut_points": len(info.cut_points),
        "block_cuts": block_cuts,
        "blocks": case.blocks,
        "groups": len(groups),
        "prunable_groups": len(groups) - len(pinned),
        "head_groups": sum(1 for g in groups if g.kind == "head"),
        "pinned_groups": len(pinned),
        "pinned_reasons": dict(reasons.most_common()),
        "flops": ours,
        "flop_counter": ref,
        "flops_rel_diff": abs(ours - ref) / ref if ref else 0.0,
        "analysis_s": round(seconds, 2),
    }
    if onnx:
        from zoocompiler.exports.onnx_export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            report = export_onnx(gm, x, Path(tmp) / "m.onnx")
        row["onnx_max_abs_diff"] = report.max_abs_diff
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="comma-separated architecture ids")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX parity column")
    parser.add_argument("--out", default="bench/results/core_matrix.json")
    args = parser.parse_args()
    cases = [c for c in ARCHS if not args.only or c.id in args.only.split(",")]
    rows = [analyse(c, not args.no_onnx) for c in cases]
    table = Table(title="zoocompiler core analysis per architecture")
    for col in ("arch", "tracer", "nodes", "cuts", "block cuts", "groups", "prunable", "heads", "pinned", "FLOPs Δ",
                "ONNX max diff"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["arch"], r["tracer"], str(r["nodes"]), str(r["cut_points"]), f"{r['block_cuts']}/{r['blocks']}",
            str(r["groups"]), str(r["prunable_groups"]), str(r["head_groups"]), str(r["pinned_groups"]),
            f"{100 * r['flops_rel_diff']:.2f}%",
            f"{r['onnx_max_abs_diff']:.1e}" if "onnx_max_abs_diff" in r else "-",
        )
    Console().print(table)
    reasons = collections.Counter()
    for r in rows:
        reasons.update(r["pinned_reasons"])
    Console().print("pinned-group reasons over all architectures:", dict(reasons.most_common(15)))
    write_json_atomic(Path(args.out), {"rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
