"""Rewrite benchmark: channel pruning by magnitude, zoocompiler vs Torch-Pruning, measured in ONNX Runtime.

Usage::

    python bench/rewrite.py                 # full run (see docs/bench_rewrite.md for sizes and timings)
    python bench/rewrite.py --quick         # resnet18 + mobilenet_v3_small, 50 %, 64×64: a few minutes
    python bench/rewrite.py --models resnet18 --ratios 0.3,0.5 --size 112 --batches 1,32
    python bench/rewrite.py --models vit_tiny,convnext_atto --layernorm-streams pin,prune \
        --out bench/results/rewrite_ln.json   # LayerNorm-coupled residual streams pruned too

For each model and ratio these variants go through the same path (``export_onnx`` with parity
check and the same exporter, then ONNX Runtime CPU latency with fixed intra-op threads): the
original (once per model), the masked reference (removed units zeroed, same shapes), the model
pruned by ``zoocompiler.passes.rewrite.prune`` from an L1 plan (``zoocompiler``; and ``zoocompiler+round``
with ``round_to=16``, ORT's NCHWc block on AVX-512), and the model pruned by Torch-Pruning
(``MagnitudeImportance(p=1)``, same ratio per layer, final classifier ignored). With
``--layernorm-streams pin,prune`` the zoocompiler rows are built for each analysis mode; ``prune``
rows are named ``zoocompiler+ln`` / ``zoocompiler+ln+round`` (residual streams normalised by a
LayerNorm pruned too; pruned == masked-LN reference, docs/prune.md). The variants of one
model are timed round-robin (``interleaved_latency``) so load from other processes hits them
alike. MACs are counted for every variant with ``torch.utils.flop_counter`` at batch 1. Prints a
rich table, writes ``bench/results/rewrite.json`` and ``bench/results/rewrite.png`` (MAC ratio vs
latency ratio per method), both atomically. Torch-Pruning is the bench-only extra
(``pip install -e .[bench]``); without it its rows are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.passes.analysis import trace
from zoocompiler.sources import load_model

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "resnet18": "torchvision:resnet18",
    "resnet50": "torchvision:resnet50",
    "mobilenet_v3_small": "torchvision:mobilenet_v3_small",
    "vit_tiny": "timm:vit_tiny_patch16_224",
    "convnext_atto": "timm:convnext_atto",
}
METHODS = (
    "original",
    "masked",
    "zoocompiler",
    "zoocompiler+round",
    "zoocompiler+ln",
    "zoocompiler+ln+round",
    "torch-pruning",
)
OURS = tuple(m for m in METHODS if m.startswith("zoocompiler"))
LN_SUFFIX = {"pin": "", "prune": "+ln"}  # method-name suffix per layernorm_streams mode
TARGET_RATIO, TARGET_FACTOR = 0.5, 0.8  # at 50 %: speedup >= 0.8 × MAC reduction on the large batch


@dataclass(frozen=True)
class Setup:
    """What every measurement shares."""

    size: int  # input is 3×size×size
    batches: tuple[int, ...]  # batch sizes timed; the first is used for export and MACs
    runs: int
    warmup: int
    threads: int
    exporters: tuple[str, ...]  # export_onnx exporters, the same for every variant
    round_to: int  # channel multiple of the "zoocompiler+round" rows (ORT CPU NCHWc block: 16 on AVX-512)


# ----------------------------------------------------------------------------- building variants


def _spec(name: str, size: int) -> str:
    spec = MODELS[name]
    return f"{spec},img_size={size}" if name == "vit_tiny" and size != 224 else spec


def _classifier(model: nn.Module) -> nn.Module:
    """The final classifier: the last ``nn.Linear`` in module order (torchvision fc/classifier[-1], timm head)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _timm_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm's Attention forward with ``-1`` for the width after pruning (Torch-Pruning's documented ViT patch)."""
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(self.norm(x)))


def torch_pruning_variant(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning: L1 magnitude, ``ratio`` per layer, classifier ignored."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    kwargs: dict[str, Any] = {}
    attention = []
    try:
        from timm.models.vision_transformer import Attention

        attention = [m for m in model.modules() if isinstance(m, Attention)]
    except ImportError:
        pass
    if attention:  # Torch-Pruning's ViT recipe: heads declared, forward patched, num_heads written back
        for m in attention:
            m.forward = _timm_attention_forward.__get__(m, type(m))
        kwargs = {
            "num_heads": {m.qkv: m.num_heads for m in attention},
            "prune_num_heads": True,
            "prune_head_dims": False,
            "head_pruning_ratio": ratio,
        }
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[_classifier(model)],
        **kwargs,
    )
    pruner.step()
    for m in attention:
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    return model


def zoocompiler_variants(
    model: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None = None, layernorm_streams: str = "pin"
) -> tuple[nn.Module, nn.Module, dict]:
    """(masked reference, pruned module, facts) for an L1 plan at ``ratio`` computed on a fresh trace
    analysed with ``layernorm_streams`` ("prune": LayerNorm-coupled streams are pruned too)."""
    from zoocompiler.passes.analysis import run_analysis
    from zoocompiler.passes.analysis.plans import plan_by_importance
    from zoocompiler.passes.rewrite.prune import masked_reference, prune

    gm = run_analysis(trace(model, x, analyze=False), layernorm_streams=layernorm_streams)
    # group scope: every producer of a residual stream keeps the same units, as Torch-Pruning does
    plan = plan_by_importance(gm, ratio, importance="l1", round_to=round_to, scope="group")
    result = prune(gm, plan)
    masked = masked_reference(gm, plan)
    with torch.no_grad():
        diff = float((result.module(x) - masked(x)).abs().max())
    report = {k: v for k, v in result.report.to_dict().items() if k != "per_group"}
    facts = {"pruned_vs_masked_max_abs_diff": diff, "prune_report": report, "layernorm_streams": layernorm_streams}
    return masked, result.module, facts


# ----------------------------------------------------------------------------- measuring


def export_variant(module: nn.Module, x: torch.Tensor, path: Path, exporters: tuple[str, ...]) -> dict[str, Any]:
    """Params, MACs (batch 1) and the parity-checked ONNX export of ``module`` at ``path``."""
    module = module.eval()
    t0 = time.perf_counter()
    export = export_onnx(module, x, path, exporters=exporters)
    return {
        "params": count_params(module),
        "macs": count_macs(module, x[:1]),
        "onnx_max_abs_diff": export.max_abs_diff,
        "onnx_nodes": export.onnx_nodes,
        "export_s": round(time.perf_counter() - t0, 1),
    }


def timing_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """A CPU session with ``ort_session``'s settings plus ``allow_spinning=0`` (see ``interleaved_latency``)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: list[Path], shape: tuple[int, ...], setup: Setup) -> list[dict[str, float]]:
    """Median/p10/p90 ms per model, timed round-robin (run i of every model, then run i+1, ...).

    The sessions are set up like ``measure_latency``'s (CPU provider, fixed intra-op threads, one
    inter-op thread, sequential, all graph optimisations) and, because several live side by side, with
    thread spinning off so an idle session's pool does not steal cores from the one being timed. The
    round-robin order (rotated every run) spreads load from other processes evenly over the models compared.
    """
    sessions = [timing_session(path, setup.threads) for path in paths]
    feed = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: feed} for s in sessions]
    for session, f in zip(sessions, feeds):
        for _ in range(setup.warmup):
            session.run(None, f)
    times = np.empty((len(sessions), setup.runs))
    for run in range(setup.runs):
        for i in np.roll(np.arange(len(sessions)), -run):  # rotated: no model always runs first
            session, f = sessions[i], feeds[i]
            start = time.perf_counter_ns()
            session.run(None, f)
            times[i, run] = (time.perf_counter_ns() - start) / 1e6
    return [
        {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90))}
        for t in times
    ]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def bench_model(
    name: str,
    ratios: list[float],
    setup: Setup,
    use_tp: bool,
    log: Callable[[str], None],
    ln_modes: tuple[str, ...] = ("pin",),
) -> list[dict]:
    """Every row (original once, then zoocompiler [per LayerNorm mode] / masked / torch-pruning per ratio)
    for one model. Masked rows are timed for the ``pin`` mode only (same shapes as the original).

    All variants are built and exported first, then timed together (``interleaved_latency``).
    """
    torch.manual_seed(0)
    model = load_model(_spec(name, setup.size)).eval()
    x = torch.randn(setup.batches[0], 3, setup.size, setup.size, generator=torch.Generator().manual_seed(0))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="zc_bench_") as tmp:
        paths: dict[int, Path] = {}

        def add(method: str, ratio: float | None, build: Callable[[], nn.Module]) -> None:
            row: dict[str, Any] = {"model": name, "ratio": ratio, "method": method}
            path = Path(tmp) / f"{method}_{ratio}.onnx"
            try:
                row.update(export_variant(build(), x, path, setup.exporters))
                paths[len(rows)] = path
            except Exception as err:  # noqa: BLE001 - a failing variant is a result, recorded and reported
                row["error"] = _one_line(err)
            log(f"{name} {ratio} {method}: " + (row.get("error") or f"exported in {row['export_s']} s"))
            rows.append(row)

        add("original", None, lambda: model)
        for ratio in ratios:
            for mode in ln_modes:
                built: dict[str, Any] = {}
                suffix = LN_SUFFIX[mode]

                def ours(ratio: float = ratio, built: dict = built, mode: str = mode) -> nn.Module:
                    built["masked"], pruned, built["facts"] = zoocompiler_variants(model, x, ratio, None, mode)
                    return pruned

                add(f"zoocompiler{suffix}", ratio, ours)
                if "facts" in built:
                    rows[-1].update(built["facts"])
                    if mode == "pin":
                        add("masked", ratio, lambda built=built: built["masked"])

                def rounded(ratio: float = ratio, built: dict = built, mode: str = mode) -> nn.Module:
                    _, pruned, built["rounded"] = zoocompiler_variants(model, x, ratio, setup.round_to, mode)
                    return pruned

                add(f"zoocompiler{suffix}+round", ratio, rounded)
                if "rounded" in built:
                    rows[-1].update(built["rounded"])
            if use_tp:
                add("torch-pruning", ratio, lambda ratio=ratio: torch_pruning_variant(model, x, ratio))
        for batch in setup.batches:
            t0 = time.perf_counter()
            stats = interleaved_latency(list(paths.values()), (batch, *x.shape[1:]), setup)
            for index, s in zip(paths, stats):
                rows[index].setdefault("latency_ms", {})[str(batch)] = s["median"]
                rows[index].setdefault("latency_p10_p90_ms", {})[str(batch)] = [s["p10"], s["p90"]]
            log(f"{name}: timed {len(paths)} models at batch {batch} in {time.perf_counter() - t0:.0f} s")
    return _with_ratios(rows)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Add MAC and latency ratios relative to the model's original row."""
    base = next((r for r in rows if r["method"] == "original" and "error" not in r), None)
    for row in rows:
        if base is None or "error" in row:
            continue
        row["mac_ratio"] = row["macs"] / base["macs"]
        row["param_ratio"] = row["params"] / base["params"]
        row["latency_ratio"] = {b: row["latency_ms"][b] / base["latency_ms"][b] for b in row["latency_ms"]}
    return rows


# ----------------------------------------------------------------------------- verdicts, table, plot


def verdicts(rows: list[dict], large_batch: str) -> list[dict]:
    """Per model and zoocompiler method: is the 50 % target met on the large batch (speedup >= 0.8 × MAC
    reduction); is each pruned model no slower than Torch-Pruning's at the same ratio and batch (absolute
    latency: Torch-Pruning removes more MACs at the same nominal ratio, see docs/bench_rewrite.md); and is
    its latency per MAC (latency ratio / MAC ratio) no worse than Torch-Pruning's?"""
    ok = [r for r in rows if "error" not in r]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        tp_rows = {r["ratio"]: r for r in ok if r["model"] == model and r["method"] == "torch-pruning"}
        for method in OURS:
            ours = {r["ratio"]: r for r in ok if r["model"] == model and r["method"] == method}
            if not ours:
                continue
            entry: dict[str, Any] = {"model": model, "method": method}
            at_target = ours.get(TARGET_RATIO)
            if at_target is not None:
                speedup = 1 / at_target["latency_ratio"][large_batch]
                mac_reduction = 1 / at_target["mac_ratio"]
                entry["speedup_at_50"] = round(speedup, 3)
                entry["mac_reduction_at_50"] = round(mac_reduction, 3)
                entry["target_met"] = speedup >= TARGET_FACTOR * mac_reduction
            entry["not_slower_than_tp"] = {
                f"{ratio}@b{batch}": ours[ratio]["latency_ms"][batch] <= tp_rows[ratio]["latency_ms"][batch]
                for ratio in ours
                if ratio in tp_rows
                for batch in ours[ratio]["latency_ms"]
            }
            entry["latency_per_mac_not_worse_than_tp"] = {
                f"{ratio}@b{batch}": _per_mac(ours[ratio], batch) <= _per_mac(tp_rows[ratio], batch)
                for ratio in ours
                if ratio in tp_rows
                for batch in ours[ratio]["latency_ms"]
            }
            out.append(entry)
    return out


def _per_mac(row: dict, batch: str) -> float:
    """Latency ratio over MAC ratio: 1.0 when latency falls exactly with MACs, > 1 when it falls less."""
    return row["latency_ratio"][batch] / row["mac_ratio"]


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(console: Console, rows: list[dict], setup: Setup) -> None:
    batches = [str(b) for b in setup.batches]
    table = Table(
        title=f"rewrite benchmark: 3×{setup.size}×{setup.size}, ORT CPU, {setup.threads} threads, "
        f"median of {setup.runs} runs",
        title_justify="left",
    )
    for column in ["model", "ratio", "method", "params", "MACs", "MAC ratio"]:
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    for b in batches:
        table.add_column(f"b{b} ms", justify="right")
        table.add_column(f"b{b} ratio", justify="right")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.0%}"
        if "error" in r:
            table.add_row(r["model"], ratio, r["method"], f"failed: {r['error'][:80]}")
            continue
        cells = [f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e6:.1f}M", _fmt_ratio(r.get("mac_ratio"))]
        for b in batches:
            cells += [f"{r['latency_ms'][b]:.2f}", _fmt_ratio(r.get("latency_ratio", {}).get(b))]
        table.add_row(r["model"], ratio, r["method"], *cells)
    console.print(table)


def plot(rows: list[dict], batches: list[str], path: Path) -> None:
    """Scatter of MAC ratio vs latency ratio, one panel per batch size, one colour per method; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method, marker in (
            ("masked", "s"),
            ("zoocompiler", "o"),
            ("zoocompiler+round", "D"),
            ("zoocompiler+ln", "P"),
            ("zoocompiler+ln+round", "X"),
            ("torch-pruning", "^"),
        ):
            pts = [
                (r["mac_ratio"], r["latency_ratio"][batch]) for r in rows if r["method"] == method and "mac_ratio" in r
            ]
            if pts:
                ax.scatter(*zip(*pts), label=method, marker=marker, alpha=0.8)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="latency ∝ MACs")
        ax.plot(
            [0, 1], [0, 1 / TARGET_FACTOR], "k:", lw=0.8, label=f"target bound (speedup = {TARGET_FACTOR}× MAC cut)"
        )
        ax.set(xlabel="MAC ratio (pruned / original)", ylabel="latency ratio", title=f"batch {batch}", xlim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 + mobilenet_v3_small, 50 %%, 64×64, b1/b8")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--ratios", help="comma-separated pruning ratios (default 0.3,0.5,0.7)")
    parser.add_argument("--size", type=int, help="input is 3×SIZE×SIZE (default 112)")
    parser.add_argument("--batches", help="batch sizes timed, first is the export batch (default 1,32)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--exporter", default="torchscript", help="export_onnx exporters for every variant (dynamo: ~3× slower)"
    )
    parser.add_argument("--round-to", type=int, default=16, help="channel multiple of the zoocompiler+round rows")
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning rows")
    parser.add_argument(
        "--layernorm-streams",
        default="pin",
        help="comma-separated analysis modes for the zoocompiler rows: pin (LayerNorm streams kept whole), "
        "prune (pruned too; rows named zoocompiler+ln...), e.g. pin,prune",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "rewrite.json", help="JSON results path")
    parser.add_argument(
        "--render-only", action="store_true", help="re-render table, verdicts and plot from an existing --out JSON"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = (args.models or ("resnet18,mobilenet_v3_small" if quick else ",".join(MODELS))).split(",")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; use some of: {', '.join(MODELS)}")
    args.ratios = [float(r) for r in (args.ratios or ("0.5" if quick else "0.3,0.5,0.7")).split(",")]
    args.size = args.size or (64 if quick else 112)
    args.batches = tuple(int(b) for b in (args.batches or ("1,8" if quick else "1,32")).split(","))
    args.layernorm_streams = tuple(dict.fromkeys(args.layernorm_streams.split(",")))
    bad = [m for m in args.layernorm_streams if m not in LN_SUFFIX]
    if bad:
        parser.error(f"unknown --layernorm-streams {bad}; use pin, prune or pin,prune")
    return args


def rerender(path: Path) -> int:
    """Recompute verdicts, rewrite the JSON and the plot, and print the table of an earlier run."""
    result = json.loads(path.read_text())
    s = result["setup"]
    setup = Setup(s["input"][1], tuple(s["batches"]), s["runs"], s["warmup"], s["threads"], (), s.get("round_to", 0))
    result["verdicts"] = verdicts(result["rows"], str(max(setup.batches)))
    write_json_atomic(path, result)
    plot(result["rows"], [str(b) for b in setup.batches], path.with_suffix(".png"))
    console = Console(width=None if sys.stdout.isatty() else 160)
    render(console, result["rows"], setup)
    console.print(result["verdicts"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return rerender(args.out)
    setup = Setup(
        size=args.size,
        batches=args.batches,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        exporters=tuple(args.exporter.split(",")),
        round_to=args.round_to,
    )
    torch.set_num_threads(args.threads)
    use_tp = not args.no_torch_pruning
    if use_tp:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("torch-pruning is not installed (pip install -e .[bench]): its rows are skipped", file=sys.stderr)
            use_tp = False
    log = Console(stderr=True)
    started = time.perf_counter()
    rows: list[dict] = []
    for name in args.models:
        rows += bench_model(name, args.ratios, setup, use_tp, lambda text: log.log(text), args.layernorm_streams)
    large = str(max(setup.batches))
    result = {
        "setup": {
            "input": [3, setup.size, setup.size],
            "batches": list(setup.batches),
            "runs": setup.runs,
            "warmup": setup.warmup,
            "threads": setup.threads,
            "exporters": list(setup.exporters),
            "round_to": setup.round_to,
            "layernorm_streams": list(args.layernorm_streams),
            "provider": "CPUExecutionProvider",
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch_pruning": _tp_version() if use_tp else None,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
        "verdicts": verdicts(rows, large),
    }
    write_json_atomic(args.out, result)
    plot(rows, [str(b) for b in setup.batches], args.out.with_suffix(".png"))
    console = Console(width=None if sys.stdout.isatty() else 160)
    render(console, rows, setup)
    console.print(result["verdicts"])
    return 0


def _tp_version() -> str:
    import torch_pruning

    return getattr(torch_pruning, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
