"""Benchmark of the fuse pass: graph size and ONNX Runtime CPU latency before vs after fusion.

Usage: ``python bench/fuse.py [--only ID,...] [--image-size 64] [--runs 10] [--rounds 3] [--threads 1]``.
For each model (random weights; architecture ids from ``tests/helpers/architectures.py``): fx nodes and
parameters before/after ``fuse``, ONNX nodes of both exports (parity-checked), and the median
ONNX Runtime latency at batch 1 and 32 (``measure_latency``: warm-up, then ``--runs`` timed runs,
intra-op threads fixed), in ``--rounds`` alternating before/after rounds; the median of the round
medians is reported. Prints a table and writes ``bench/results/fuse.json``. A script, not a
timed test: latency depends on the machine and its load, so read ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.architectures import ARCH_BY_ID  # noqa: E402

from zoocompiler.core.atomic import write_json_atomic  # noqa: E402
from zoocompiler.exports.latency import measure_latency  # noqa: E402
from zoocompiler.exports.onnx_export import export_onnx  # noqa: E402
from zoocompiler.passes.analysis import trace  # noqa: E402
from zoocompiler.passes.rewrite.fuse import fuse, fuse_report  # noqa: E402
from zoocompiler.sources import load_model  # noqa: E402

DEFAULT_MODELS = (
    "tv_resnet18",
    "tv_mobilenet_v3_small",
    "tv_efficientnet_b0",
    "tv_convnext_tiny",
    "timm_resnet18",
    "timm_vit_tiny",
)


def _input_shape(arch_id: str, image_size: int) -> tuple[int, int, int]:
    channels = ARCH_BY_ID[arch_id].input_shape[0]
    if arch_id.endswith("vit_tiny"):  # the ViT is built for its spec's img_size (32)
        return ARCH_BY_ID[arch_id].input_shape
    return channels, image_size, image_size


def bench_model(
    arch_id: str, image_size: int, batches: list[int], runs: int, warmup: int, threads: int, rounds: int
) -> dict:
    torch.manual_seed(0)
    model = load_model(ARCH_BY_ID[arch_id].spec).eval()
    shape = _input_shape(arch_id, image_size)
    x = torch.randn(2, *shape)
    gm = trace(model, x)
    t0 = time.perf_counter()
    fused = fuse(gm, analyze=False)
    fuse_s = time.perf_counter() - t0
    report = fuse_report(gm, fused)
    row = {"model": arch_id, "input": list(shape), "fuse_s": round(fuse_s, 3), **report.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for tag, module in (("before", gm), ("after", fused)):
            paths[tag] = Path(tmp) / f"{tag}.onnx"
            exported = export_onnx(module, x, paths[tag])
            row[f"onnx_nodes_{tag}"] = exported.onnx_nodes
            row[f"onnx_max_abs_diff_{tag}"] = exported.max_abs_diff
        ops = {tag: [n.op_type for n in onnx.load(path).graph.node] for tag, path in paths.items()}
        row["onnx_same_ops"] = ops["before"] == ops["after"]  # then ORT runs the same kernels either way
        for batch in batches:
            medians: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(rounds):  # alternate before/after so load changes hit both alike
                for tag in ("before", "after"):
                    lat = measure_latency(paths[tag], (batch, *shape), runs=runs, warmup=warmup, threads=threads)
                    medians[tag].append(lat.median_ms)
            for tag in ("before", "after"):
                row[f"ms_b{batch}_{tag}"] = round(statistics.median(medians[tag]), 3)
                row[f"ms_b{batch}_{tag}_rounds"] = [round(m, 3) for m in medians[tag]]
            row[f"speedup_b{batch}"] = round(row[f"ms_b{batch}_before"] / row[f"ms_b{batch}_after"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated architecture ids (default: the fuse test set)")
    parser.add_argument("--image-size", type=int, default=64, help="square input side for the CNNs")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating before/after rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", default="bench/results/fuse.json")
    args = parser.parse_args()
    ids = args.only.split(",") if args.only else list(DEFAULT_MODELS)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for arch_id in ids:
        rows.append(bench_model(arch_id, args.image_size, batches, args.runs, args.warmup, args.threads, args.rounds))
        print(f"done {arch_id}", file=sys.stderr)
    title = f"fuse: before → after (ORT CPU, {args.threads} thread(s), median of {args.rounds}×{args.runs} runs)"
    table = Table(title=title)
    for col in ("model", "input", "fx nodes", "params", "ONNX nodes", "same ONNX ops"):
        table.add_column(col)
    for b in batches:
        table.add_column(f"ms b={b}")
        table.add_column(f"speedup b={b}")
    for r in rows:
        cells = [
            r["model"],
            "×".join(map(str, r["input"])),
            f"{r['nodes_before']} → {r['nodes_after']}",
            f"{r['params_before']:,} → {r['params_after']:,}",
            f"{r['onnx_nodes_before']} → {r['onnx_nodes_after']}",
            "yes" if r["onnx_same_ops"] else "no",
        ]
        for b in batches:
            cells += [f"{r[f'ms_b{b}_before']:.2f} → {r[f'ms_b{b}_after']:.2f}", f"{r[f'speedup_b{b}']:.2f}×"]
        table.add_row(*cells)
    Console(width=200).print(table)
    meta = {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "runs": args.runs,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "image_size": args.image_size,
    }
    write_json_atomic(Path(args.out), {"rows": rows, "meta": meta})


if __name__ == "__main__":
    main()
