"""Modularizing-while-Training benchmark (paper 004, issue 12): Tables 2, 4, 5–7's shape plus measured latency.

Usage::

    python bench/modularize.py                    # full run (~18 min on 2 cores; see docs/bench_modularize.md)
    python bench/modularize.py --quick            # smoke version (< 1 min)
    python bench/modularize.py --models vgg --datasets digits --epochs 10
    python bench/modularize.py --models vgg,resnet,mobilenet   # + the MobileNetV2-style net (depthwise convs)
    python bench/modularize.py --render-only      # re-print the tables, verdicts and plot from the JSON

For every dataset × model, everything goes through the product's pipeline code: ``train_to_dir`` trains the
modular model (CE + α·L_ch + β·L_cp) and the standard model (CE) from the same seeded initial weights, for
the same epochs, learning rate and batch size (1 torch thread each). Then, on the training split, kernel sets
and module masks at τ (``kernel_sets``, ``ModuleMasks``): Table 2 (standard / modular accuracy, KRR, cohesion,
coupling; plus the same rule applied to the standard model's non-zero outputs) and Table 4 (seconds per
epoch, modularizing time, extraction time per module). Sub-tasks (Tables 5–7): for M = 2..9 classes,
``--draws`` distinct random class sets (seeded); each gets its mixed module (union of the M modules, cut by
the prune pass): KRR, MACs of the ``static`` and ``gated`` module vs the whole model, and accuracy on the
sub-task's test samples for both heads against reusing the whole standard model the same way:
``slice`` (keep the M rows of the classifier, no training; gated, calibrated and union8 modules) and ``new``
(random N→M layer, fine-tuned ``--finetune-epochs`` on the M classes' training samples; gated module, and
static module as in the paper; the first ``--new-draws`` draws per M); ``union8`` is the calibrated module
with ``--residual union --round-to 8`` (no scatter ops, channel counts in multiples of 8). Latency: for the
2-class draws, the sliced-head static (pad), union8 and gated modules and the whole model are exported to ONNX
(parity checked) and timed by ONNX Runtime at batch 1 (1 thread), interleaved over ``--rounds`` rounds; the
ratio is of the medians. ``--tau-draws`` 2-class draws are also cut at every ``--taus`` threshold. Writes
``bench/results/modularize.json`` and ``bench/results/modularize.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.modules import count_macs
from zoocompiler.data import load_dataset
from zoocompiler.exports.latency import measure_latency
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.pipelines.modularize.config import ModularizeReuseConfig, ModularizeTrainConfig
from zoocompiler.pipelines.modularize.extract import cut_module, kernel_sets, standard_kernel_sets
from zoocompiler.pipelines.modularize.metrics import module_table
from zoocompiler.pipelines.modularize.reuse import with_head
from zoocompiler.pipelines.modularize.train import load_trained, train_to_dir
from zoocompiler.training import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "vgg": "zoo:vgg_s",
    "resnet": "zoo:resnet_s",
    "mobilenet": "timm:mobilenetv2_050,in_chans=1,num_classes=10",
}
TARGETS = {
    "accuracy_gap": 1.5,  # points: modular accuracy within 1.5 of standard
    "krr": 0.25,
    "cohesion": 0.9,
    "coupling": 0.3,
    "two_class_macs": 0.35,  # mixed 2-class module MACs / model MACs
    "two_class_accuracy": 1.0,  # points below whole-model reuse, at most
    "time_ratio": 2.0,  # modular / standard seconds per epoch
    "two_class_latency": 0.5,  # module / model ONNX Runtime latency
}


def _draws(rng: np.random.Generator, n: int, m: int, count: int) -> list[tuple[int, ...]]:
    """Up to ``count`` distinct sorted class sets of size ``m`` (all of them when there are fewer)."""
    combos = list(itertools.combinations(range(n), m))
    picked = rng.choice(len(combos), size=min(count, len(combos)), replace=False)
    return [combos[i] for i in sorted(picked)]


def _latency(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, runs: int) -> dict[str, float]:
    """Median of per-round ONNX Runtime medians (batch 1), models interleaved in every round."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in models.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            export_onnx(model, x[:2].clone(), paths[name])
        medians: dict[str, list[float]] = {name: [] for name in models}
        for r in range(rounds):
            names = list(models)
            for name in names[r % len(names):] + names[: r % len(names)]:
                medians[name].append(measure_latency(paths[name], (1, *x.shape[1:]), runs=runs).median_ms)
    return {name: float(np.median(v)) for name, v in medians.items()}


def _tau_sweep(trained, sets, classes: list[int], sub_test, whole_slice, shape, whole_macs: int,
               args: argparse.Namespace) -> list[dict[str, Any]]:
    """The 2-class mixed module of ``classes`` at every ``--taus`` threshold: KRR, MAC ratio, slice-head accuracy."""
    n, out = trained.num_classes, []
    sliced = ModularizeReuseConfig(classes=classes, head="slice")
    for tau in args.taus:
        masks = sets.masks(n, tau, trained.points)
        mask = masks.union(classes)
        gated = cut_module(trained, mask, "gated")
        calibrated = cut_module(trained, mask, "calibrated", scale=masks.scale(classes))
        out.append({
            "tau": tau, "classes": classes, "krr": float(mask.mean()),
            "mac_ratio": count_macs(cut_module(trained, mask, "static"), shape, eval=True) / whole_macs,
            "acc_gated": evaluate(with_head(gated, sliced, n, None, False), sub_test),
            "acc_calibrated": evaluate(with_head(calibrated, sliced, n, None, False), sub_test),
            "acc_whole": evaluate(whole_slice, sub_test),
        })
    return out


def run_case(dataset: str, model: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    spec = MODELS[model]
    work = Path(tempfile.mkdtemp(prefix="zc_mwt_"))  # the trained directory, kept for inspection (printed)
    config = ModularizeTrainConfig(spec, data=dataset, alpha=args.alpha, beta=args.beta, epochs=args.epochs, lr=args.lr,
                                   from_scratch=True, seed=0)
    console.print(f"[bold]{dataset} · {model}[/]: training modular and standard, {args.epochs} epochs → {work}")
    record = train_to_dir(config, work, progress=False)
    trained = load_trained(work)
    n = trained.num_classes
    train_split, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    shape = tuple(test.x.shape[1:])

    start = time.perf_counter()
    sets = kernel_sets(trained.modular, train_split)
    masks = sets.masks(n, args.threshold, trained.points)
    modularize_s = time.perf_counter() - start
    table = module_table(masks.masks, sets.by_class(n))
    std_sets = standard_kernel_sets(trained, train_split)
    std_table = module_table(std_sets.masks(n, args.threshold, trained.points).masks, std_sets.by_class(n))
    start = time.perf_counter()
    for c in range(n):
        cut_module(trained, masks.masks[c], "static")
    extract_s = (time.perf_counter() - start) / n
    whole_macs = count_macs(trained.standard, shape, eval=True)

    rng = np.random.default_rng(args.seed)
    rows, latency_rows, tau_rows = [], [], []
    console.print(f"  sub-tasks: M = {args.sizes[0]}..{args.sizes[-1]}, {args.draws} draws each")
    for m in args.sizes:
        for d, classes in enumerate(_draws(rng, n, m, args.draws)):
            classes = list(classes)
            mask = masks.union(classes)
            static, gated = cut_module(trained, mask, "static"), cut_module(trained, mask, "gated")
            scale = masks.scale(classes)
            calibrated = cut_module(trained, mask, "calibrated", scale=scale)
            aligned = cut_module(trained, mask, "calibrated", residual="union", round_to=8,
                                 scores=masks.scores(classes), scale=scale)
            sub_train = load_dataset(dataset, "train", classes=classes)
            sub_test = load_dataset(dataset, "test", classes=classes)
            sliced = ModularizeReuseConfig(classes=classes, head="slice")
            module_slice = with_head(gated, sliced, n, sub_train, False)
            static_slice = with_head(static, sliced, n, sub_train, False)
            whole_slice = with_head(trained.standard, sliced, n, sub_train, False)
            aligned_slice = with_head(aligned, sliced, n, sub_train, False)
            calibrated_slice = with_head(calibrated, sliced, n, sub_train, False)
            row = {
                "m": m, "classes": classes, "krr": float(mask.mean()),
                "macs_static": count_macs(static, shape, eval=True), "macs_gated": count_macs(gated, shape, eval=True),
                "macs_aligned": count_macs(aligned, shape, eval=True),
                "acc_slice_aligned": evaluate(aligned_slice, sub_test),
                "acc_slice_module": evaluate(module_slice, sub_test),
                "acc_slice_static": evaluate(static_slice, sub_test),
                "acc_slice_calibrated": evaluate(calibrated_slice, sub_test),
                "acc_slice_whole": evaluate(whole_slice, sub_test),
            }
            if d < args.new_draws:
                new = ModularizeReuseConfig(classes=classes, head="new", finetune_epochs=args.finetune_epochs, seed=d)
                row["acc_new_module"] = evaluate(with_head(gated, new, n, sub_train, False), sub_test)
                row["acc_new_static"] = evaluate(with_head(static, new, n, sub_train, False), sub_test)
                row["acc_new_whole"] = evaluate(with_head(trained.standard, new, n, sub_train, False), sub_test)
            rows.append(row)
            if m == 2 and d < args.latency_draws:
                lat = _latency({"static": static_slice, "aligned": aligned_slice, "gated": module_slice,
                                "whole": whole_slice}, test.x, args.rounds, args.runs)
                latency_rows.append({"classes": classes, **{f"{k}_ms": v for k, v in lat.items()}})
            if m == 2 and d < args.tau_draws:
                tau_rows.extend(_tau_sweep(trained, sets, classes, sub_test, whole_slice, shape, whole_macs, args))
    modular, standard = record["modular"], record["standard"]
    return {
        "dataset": dataset, "model": model, "spec": spec, "kernels": trained.points.kernels,
        "skipped": trained.points.skipped, "whole_macs": whole_macs,
        "standard_accuracy": standard["accuracy"], "modular_accuracy": modular["accuracy"],
        "modules": {k: v for k, v in table.items() if k not in ("overlap", "per_module")},
        "standard_modules": {k: v for k, v in std_table.items() if k not in ("overlap", "per_module")},
        "lowered_layers": sum(len(v) for v in masks.lowered.values()),
        "seconds_per_epoch": {"modular": modular["seconds_per_epoch"], "standard": standard["seconds_per_epoch"]},
        "modularize_s": modularize_s, "extract_s_per_module": extract_s,
        "history": {"modular": modular["history"], "standard": standard["history"]},
        "subtasks": rows, "latency": latency_rows, "tau_sweep": tau_rows,
    }


# ----------------------------------------------------------------------------- summaries


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else float("nan")


def by_size(case: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in sorted({r["m"] for r in case["subtasks"]}):
        rows = [r for r in case["subtasks"] if r["m"] == m]
        macs = _mean(rows, "macs_static") / case["whole_macs"]
        out.append({
            "m": m, "draws": len(rows), "krr": _mean(rows, "krr"), "mac_ratio_static": macs,
            "mac_ratio_gated": _mean(rows, "macs_gated") / case["whole_macs"],
            "mac_ratio_aligned": _mean(rows, "macs_aligned") / case["whole_macs"],
            "acc_slice_aligned": _mean(rows, "acc_slice_aligned"),
            "macs_static_m": _mean(rows, "macs_static") / 1e6,
            "acc_slice_module": _mean(rows, "acc_slice_module"), "acc_slice_static": _mean(rows, "acc_slice_static"),
            "acc_slice_calibrated": _mean(rows, "acc_slice_calibrated"),
            "acc_new_static": _mean(rows, "acc_new_static"),
            "acc_slice_whole": _mean(rows, "acc_slice_whole"),
            "acc_new_module": _mean(rows, "acc_new_module"), "acc_new_whole": _mean(rows, "acc_new_whole"),
            "new_draws": sum("acc_new_module" in r for r in rows),
        })
    return out


def targets(case: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every target of the issue for one case: measured value, bound, met."""
    two = next((s for s in by_size(case) if s["m"] == 2), None)
    lat = case["latency"]
    ratio = lambda k: float(np.median([r[f"{k}_ms"] for r in lat])) / float(np.median([r["whole_ms"] for r in lat]))  # noqa: E731
    values = {
        "accuracy_gap": (100 * (case["standard_accuracy"] - case["modular_accuracy"]), "<="),
        "krr": (case["modules"]["krr"], "<="),
        "cohesion": (case["modules"]["cohesion"], ">="),
        "coupling": (case["modules"]["coupling"], "<="),
        "time_ratio": (case["seconds_per_epoch"]["modular"] / case["seconds_per_epoch"]["standard"], "<="),
    }
    if two is not None:
        values["two_class_macs"] = (two["mac_ratio_static"], "<=")
        values["two_class_accuracy"] = (100 * (two["acc_new_whole"] - two["acc_new_module"]), "<=")
        values["two_class_accuracy_slice"] = (100 * (two["acc_slice_whole"] - two["acc_slice_module"]), "<=")
        values["two_class_accuracy_static"] = (100 * (two["acc_new_whole"] - two["acc_new_static"]), "<=")
        values["two_class_accuracy_calibrated"] = (100 * (two["acc_slice_whole"] - two["acc_slice_calibrated"]), "<=")
    if lat:
        values["two_class_latency"] = (ratio("static"), "<=")
        values["two_class_latency_gated"] = (ratio("gated"), "<=")
        values["two_class_latency_aligned"] = (ratio("aligned"), "<=")
    out = {}
    for key, (value, op) in values.items():
        base = key
        for suffix in ("_slice", "_gated", "_aligned", "_static", "_calibrated"):
            base = base.removesuffix(suffix)
        bound = TARGETS[base]
        value = round(value, 9)  # 100 * (0.99 - 0.98) is 1.0000000000000009: not a miss
        met = value <= bound if op == "<=" else value >= bound
        out[key] = {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}
    return out


def render(doc: dict[str, Any], console: Console) -> None:
    cases = doc["cases"]
    t2 = Table(title=f"Table 2 shape: standard vs modular training, modules at τ = {doc['args']['threshold']:g}")
    for col in ("data", "model", "#kernels", "std acc", "mod acc", "KRR", "cohesion", "coupling",
                "std-rule KRR", "std-rule coup."):
        t2.add_column(col, justify="right")
    for c in cases:
        m, s = c["modules"], c["standard_modules"]
        t2.add_row(c["dataset"], c["model"], str(c["kernels"]), f"{100 * c['standard_accuracy']:.2f}",
                   f"{100 * c['modular_accuracy']:.2f}", f"{100 * m['krr']:.1f}%", f"{m['cohesion']:.3f}",
                   f"{m['coupling']:.3f}", f"{100 * s['krr']:.1f}%", f"{s['coupling']:.3f}")
    console.print(t2)
    t4 = Table(title="Table 4 shape: time (s)")
    for col in ("data", "model", "standard s/epoch", "modular s/epoch", "ratio", "modularizing", "extract/module"):
        t4.add_column(col, justify="right")
    for c in cases:
        sp = c["seconds_per_epoch"]
        t4.add_row(c["dataset"], c["model"], f"{sp['standard']:.2f}", f"{sp['modular']:.2f}",
                   f"{sp['modular'] / sp['standard']:.2f}×", f"{c['modularize_s']:.2f}",
                   f"{c['extract_s_per_module']:.2f}")
    console.print(t4)
    for c in cases:
        t5 = Table(title=f"Tables 5–7 shape, {c['dataset']} · {c['model']} (model {c['whole_macs'] / 1e6:.2f} M MACs)")
        for col in ("M", "draws", "KRR", "MACs (M)", "MAC red.", "gated MAC red.", "union8 MAC red.", "slice: gated",
                    "slice: calib.", "slice: union8", "slice: whole", "new: gated", "new: static", "new: whole",
                    "new draws"):
            t5.add_column(col, justify="right")
        for s in by_size(c):
            t5.add_row(str(s["m"]), str(s["draws"]), f"{100 * s['krr']:.1f}%", f"{s['macs_static_m']:.3f}",
                       f"{100 * (1 - s['mac_ratio_static']):.1f}%", f"{100 * (1 - s['mac_ratio_gated']):.1f}%",
                       f"{100 * (1 - s['mac_ratio_aligned']):.1f}%", f"{100 * s['acc_slice_module']:.2f}",
                       f"{100 * s['acc_slice_calibrated']:.2f}", f"{100 * s['acc_slice_aligned']:.2f}",
                       f"{100 * s['acc_slice_whole']:.2f}", f"{100 * s['acc_new_module']:.2f}",
                       f"{100 * s['acc_new_static']:.2f}", f"{100 * s['acc_new_whole']:.2f}", str(s["new_draws"]))
        console.print(t5)
        sweep = c.get("tau_sweep") or []
        if sweep:
            tt_ = Table(title=f"2-class mixed modules against τ, {c['dataset']} · {c['model']} (slice head, "
                              f"{len({tuple(r['classes']) for r in sweep})} draws)")
            for col in ("τ", "KRR", "MACs / model", "gated acc", "calibrated acc", "whole acc"):
                tt_.add_column(col, justify="right")
            for tau in sorted({r["tau"] for r in sweep}, reverse=True):
                rs = [r for r in sweep if r["tau"] == tau]
                tt_.add_row(f"{tau:g}", f"{100 * _mean(rs, 'krr'):.1f}%", f"{_mean(rs, 'mac_ratio'):.3f}",
                            f"{100 * _mean(rs, 'acc_gated'):.2f}", f"{100 * _mean(rs, 'acc_calibrated'):.2f}",
                            f"{100 * _mean(rs, 'acc_whole'):.2f}")
            console.print(tt_)
    tt = Table(title="Targets (issue 12)")
    for col in ("data", "model", "target", "measured", "bound", "met"):
        tt.add_column(col, justify="right")
    for c in cases:
        for key, t in targets(c).items():
            tt.add_row(c["dataset"], c["model"], key, f"{t['value']:.3f}", t["target"], "met" if t["met"] else "MISSED")
    console.print(tt)


def plot(doc: dict[str, Any], path: Path) -> None:
    from zoocompiler.core.plots import pyplot

    fig, axes = pyplot().subplots(2, 2, figsize=(10, 7))
    for c in doc["cases"]:
        label = f"{c['dataset']}·{c['model']}"
        sizes = by_size(c)
        line = axes[0, 0].plot([r["epoch"] for r in c["history"]["modular"]],
                               [r["coupling"] for r in c["history"]["modular"]], "-", label=f"{label} modular")[0]
        standard = c["history"]["standard"]
        axes[0, 0].plot([r["epoch"] for r in standard], [r["coupling"] for r in standard], "--", color=line.get_color())
        axes[0, 1].plot([s["m"] for s in sizes], [100 * s["krr"] for s in sizes], "o-", label=label)
        axes[1, 0].plot([s["m"] for s in sizes], [100 * (1 - s["mac_ratio_static"]) for s in sizes], "o-", label=label)
        axes[1, 1].plot([s["m"] for s in sizes], [100 * (s["acc_slice_whole"] - s["acc_slice_module"]) for s in sizes],
                        "o-", label=f"{label} slice")
        axes[1, 1].plot([s["m"] for s in sizes], [100 * (s["acc_new_whole"] - s["acc_new_module"]) for s in sizes],
                        "s--", color=axes[1, 1].lines[-1].get_color(), label=f"{label} new")
    titles = ("batch coupling per epoch (solid modular, dashed standard)", "KRR of mixed modules (%)",
              "MAC reduction vs whole model (%)", "accuracy loss vs whole-model reuse (points)")
    for ax, title in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes.flat[1:]:
        ax.set_xlabel("classes in the sub-task (M)")
    axes[0, 0].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="mnist5k,digits")
    parser.add_argument("--models", default="vgg,resnet")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=3.0)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--new-draws", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--latency-draws", type=int, default=5)
    parser.add_argument("--tau-draws", type=int, default=5)
    parser.add_argument("--taus", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "modularize.json")
    args = parser.parse_args(argv)
    console = Console(width=170)
    if args.render_only:
        doc = json.loads(args.out.read_text())
        doc["targets"] = {f"{c['dataset']}·{c['model']}": targets(c) for c in doc["cases"]}
        write_json_atomic(args.out, doc)
        render(doc, console)
        plot(doc, args.out.with_suffix(".png"))
        return 0
    args.sizes = [2, 5] if args.quick else list(range(2, 10))
    args.taus = [float(t) for t in str(args.taus).split(",")]
    if args.quick:
        args.epochs, args.draws, args.new_draws, args.finetune_epochs = 2, 2, 1, 1
        args.latency_draws, args.rounds, args.runs, args.tau_draws = 1, 2, 20, 1
    start = time.perf_counter()
    cases = [run_case(d, m, args, console) for d in args.datasets.split(",") for m in args.models.split(",")]
    doc = {
        "args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
        "seconds": time.perf_counter() - start,
        "cases": cases,
    }
    doc["targets"] = {f"{c['dataset']}·{c['model']}": targets(c) for c in cases}
    write_json_atomic(args.out, doc)
    render(doc, console)
    plot(doc, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
