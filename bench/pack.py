"""Slice-and-Pack benchmark (paper 000, issue 13): Table 2's shape, Fig. 5 (IoU), Fig. 6 (expansion), Fig. 7 (time).

Usage::

    python bench/pack.py                 # full run (see docs/bench_pack.md for the time on 2 cores)
    python bench/pack.py --quick         # smoke version (k = 5, one draw, few combinations)
    python bench/pack.py --render-only   # re-print tables, verdicts and plots from the JSON

Sources: the pack zoo (``vgg_s_0to3``, ``resnet_s_4to6``, ``convnext_t_7to9``: VGG, ResNet and ConvNeXt trained
on disjoint mnist5k classes). For every k in ``--ks`` and every draw (``--draws`` seeds of the k samples per
class), every class of every source is sliced with the product's ``slice_class`` under both selections (rate:
S&P(R), threshold: S&P(T), default β each), timed per fragment. Tasks (the paper's Table 2 rows, scaled to three
sources): **T1** one class from each source (3 classes), **T3** two classes from each source (6 classes); each
task has ``--combos`` fixed class sets. On each, with the same samples (the k per class the fragments were sliced
from): **Finetune** (each involved source model, new head, fine-tuned whole; mean over them), **Ensemble** (all
involved sources' features, standardised, linear classifier), **S&P(R)**, **S&P(T)** (fragments packed with
Enc/Dec/H by ``train_pack``). Accuracy on the classes' test samples; mean ± std over class sets and draws; params
as % of the Ensemble's. Fig. 5: IoU of the selected units between the fragments of one source (mean over layers).
Fig. 7: packing time per class (fragment features + training) for 1..10 classes against those fragments' slicing
time. Fig. 6: equivalent expansion rate over ``--expansion`` random 5-class combinations per k (threshold
selection): combinations reaching accuracy ≥ 1 − e, times C(10, 5) / 3 sources. Packed models are evaluated on
the fragments' cached test features (fragments are frozen, so this is the packed model's output). Writes
``bench/results/pack.json`` and ``bench/results/pack.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _measured import run_measured, show  # bench/_measured.py (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from zoocompiler.core.atomic import atomic_path
from zoocompiler.core.modules import count_params
from zoocompiler.data import load_dataset
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.repairs import slice_layers
from zoocompiler.pipelines.pack.baselines import ensemble, features_model, finetune
from zoocompiler.pipelines.pack.config import PackSliceConfig
from zoocompiler.pipelines.pack.packing import PackSettings, fragment_features, train_pack
from zoocompiler.pipelines.pack.pipeline import slice_settings
from zoocompiler.pipelines.pack.samples import draw_samples
from zoocompiler.pipelines.pack.slicing import slice_class
from zoocompiler.pipelines.zoo.trainable import example_input
from zoocompiler.sources import load_model
from zoocompiler.zoo import get_entry

RESULTS = Path(__file__).resolve().parent / "results"
ZOOS = {"pack": ("vgg_s_0to3", "resnet_s_4to6", "convnext_t_7to9"),
        "pack5": ("vgg_s_01", "resnet_s_23", "convnext_t_45", "vgg_s_67", "resnet_s_89")}
TASKS = {"T1": ("pack", 1), "T2": ("pack", 2), "T3": ("pack5", 1)}  # zoo, classes per source
SELECTS = {"R": "rate", "T": "threshold"}


def _combos(classes: list[list[int]], per_source: int, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    while len(out) < count:
        pick = sorted(int(c) for cs in classes for c in rng.choice(cs, per_source, replace=False))
        if pick not in out:
            out.append(pick)
    return out


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


class Sources:
    """The traced sources of one zoo, their features models and every test sample's label."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.test = load_dataset("mnist5k", "test")
        self.entries = {n: get_entry(n) for n in names}
        self.graphs = {n: trace(load_model(f"zoo:{n}").eval(), example_input((1, 28, 28))) for n in names}
        self.layers = {n: slice_layers(g) for n, g in self.graphs.items()}
        self.bodies = {n: features_model(g, self.layers[n].features) for n, g in self.graphs.items()}
        self.owner = {c: n for n, e in self.entries.items() for c in e.classes}

    def test_of(self, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.isin(self.test.y, torch.tensor(classes))
        y = torch.tensor([classes.index(int(c)) for c in self.test.y[mask]])
        return mask, y


def slice_all(src: Sources, k: int, draw: int, select: str) -> dict[int, dict[str, Any]]:
    """Every class's fragment at (k, draw, select): module, samples, kept units, slice seconds, test features."""
    out = {}
    for name in src.names:
        entry = src.entries[name]
        split = load_dataset("mnist5k", "train", classes=list(entry.classes))
        samples = draw_samples(split, k, draw, name)
        settings = slice_settings(PackSliceConfig(select=select, seed=draw), name)
        for label, c in enumerate(entry.classes):
            sliced = slice_class(src.graphs[name], src.layers[name], samples.x, samples.y, label, settings)
            module = sliced.fragment.module
            out[int(c)] = {
                "module": module, "x": samples.x[samples.y == label], "kept": sliced.kept, "units": sliced.units,
                "seconds": sliced.seconds, "params": count_params(module),
                "test_features": fragment_features([module], src.test.x)[0],
                "source": name, "all_x": samples.x, "all_y": samples.y,
            }
    return out


def pack_accuracy(frags: dict[int, dict], classes: list[int], src: Sources, seed: int = 0) -> tuple[float, int, float]:
    """Pack ``classes``' fragments; (test accuracy, packed params, packing seconds)."""
    start = time.perf_counter()
    x = torch.cat([frags[c]["x"] for c in classes])
    y = torch.cat([torch.full((len(frags[c]["x"]),), i) for i, c in enumerate(classes)])
    features = fragment_features([frags[c]["module"] for c in classes], x)
    trained = train_pack(features, y, len(classes), PackSettings(seed=seed))
    seconds = time.perf_counter() - start
    mask, ty = src.test_of(classes)
    with torch.no_grad():
        joined = torch.cat([frags[c]["test_features"][mask] for c in classes], 1)
        logits = trained.head(F.relu(trained.encoder(joined)))
    params = sum(frags[c]["params"] for c in classes) + count_params(trained.encoder) + count_params(trained.head)
    return _acc(logits, ty), params, seconds


def baselines(frags: dict[int, dict], classes: list[int], src: Sources, ft_steps: int) -> dict[str, Any]:
    x = torch.cat([frags[c]["x"] for c in classes])
    y = torch.cat([torch.full((len(frags[c]["x"]),), i) for i, c in enumerate(classes)])
    involved = [n for n in src.names if any(src.owner[c] == n for c in classes)]
    mask, ty = src.test_of(classes)
    tx = src.test.x[mask]
    ens = ensemble([src.bodies[n] for n in involved], x, y, len(classes))
    with torch.no_grad():
        ens_acc = _acc(ens(tx), ty)
    ft_accs, ft_params = [], []
    for n in involved:
        model = finetune(src.bodies[n], x, y, len(classes), steps=ft_steps)
        with torch.no_grad():
            ft_accs.append(_acc(model(tx), ty))
        ft_params.append(count_params(model))
    return {"ensemble": (ens_acc, count_params(ens)),
            "finetune": (statistics.mean(ft_accs), statistics.mean(ft_params))}


def iou_matrices(frags: dict[int, dict]) -> dict[str, list[list[float]]]:
    out = {}
    for name in sorted({f["source"] for f in frags.values()}):
        cs = sorted(c for c, f in frags.items() if f["source"] == name)
        mat = []
        for a in cs:
            row = []
            for b in cs:
                ious = [len(set(ka) & set(kb)) / len(set(ka) | set(kb))
                        for ka, kb in zip(frags[a]["kept"], frags[b]["kept"], strict=True)]
                row.append(round(float(np.mean(ious)), 3))
            mat.append(row)
        out[name] = mat
    return out


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    torch.set_num_threads(1)
    zoos = {z: Sources(names) for z, names in ZOOS.items()}
    tasks = {}
    for task, (zoo, per) in TASKS.items():
        per_source = [list(zoos[zoo].entries[n].classes) for n in zoos[zoo].names]
        tasks[task] = _combos(per_source, per, args.combos if per == 1 else max(1, args.combos // 2), len(tasks) + 1)
    rows: dict[str, dict[str, dict[str, list]]] = {}
    extras: dict[str, Any] = {"iou": {}, "time": {}, "expansion": {}, "slice_seconds": {}}
    for k in args.ks:
        for draw in range(args.draws):
            for zoo, src in zoos.items():
                frags = {}
                for tag, select in SELECTS.items():
                    t0 = time.perf_counter()
                    frags[tag] = slice_all(src, k, draw, select)
                    console.print(f"k={k} draw={draw} {zoo} S&P({tag}): sliced {len(frags[tag])} classes in "
                                  f"{time.perf_counter() - t0:.0f} s")
                    seconds = {c: f["seconds"] for c, f in frags[tag].items()}
                    extras["slice_seconds"][f"{zoo}_k{k}_d{draw}_{tag}"] = seconds
                if zoo == "pack" and k == args.ks[min(1, len(args.ks) - 1)] and draw == 0:
                    extras["iou"] = {tag: iou_matrices(frags[tag]) for tag in SELECTS}
                    extras["time"] = pack_times(frags["T"], src)
                for task, combos in tasks.items():
                    if TASKS[task][0] != zoo:
                        continue
                    for classes in combos:
                        score(rows.setdefault(task, {}).setdefault(str(k), {}), frags, classes, src, args.ft_steps)
                if zoo == "pack" and draw == 0:
                    extras["expansion"][str(k)] = expansion(frags["T"], src, args.expansion)
    return {"rows": rows, **extras, "tasks": tasks}


def score(cell: dict[str, list], frags: dict[str, dict], classes: list[int], src: Sources, ft_steps: int) -> None:
    """Append every method's accuracy and params on ``classes`` to ``cell``."""
    found = dict(baselines(frags["T"], classes, src, ft_steps))
    found.update({f"S&P({tag})": pack_accuracy(frags[tag], classes, src)[:2] for tag in SELECTS})
    for method, (acc, params) in found.items():
        cell.setdefault(method, []).append({"acc": acc, "params": params, "classes": classes})


def pack_times(frags: dict[int, dict], src: Sources) -> list[dict[str, float]]:
    order = list(np.random.default_rng(7).permutation(10))
    out = []
    for n in range(1, 11):
        classes = [int(c) for c in order[:n]]
        _, _, seconds = pack_accuracy(frags, classes, src)
        out.append({"classes": n, "pack_s": seconds, "pack_s_per_class": seconds / n,
                    "slice_s": sum(frags[c]["seconds"] for c in classes),
                    "slice_s_per_class": sum(frags[c]["seconds"] for c in classes) / n})
    return out


def expansion(frags: dict[int, dict], src: Sources, count: int) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    accs = []
    for _ in range(count):
        classes = sorted(int(c) for c in rng.choice(10, 5, replace=False))
        accs.append(pack_accuracy(frags, classes, src)[0])
    errors = [round(e, 2) for e in np.arange(0.0, 0.31, 0.02)]
    combos = math.comb(10, 5)
    return {"accuracies": accs, "errors": errors,
            "rate": [sum(a >= 1 - e for a in accs) / len(accs) * combos / len(src.names) for e in errors]}


# ----------------------------------------------------------------------------- summary


def _ms(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f}±{100 * statistics.pstdev(values):.2f}"


def summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, method): params (% of Ensemble) and accuracy per k."""
    out = []
    for task, by_k in doc["rows"].items():
        methods = list(next(iter(by_k.values())))
        for method in methods:
            row = {"task": task, "method": method}
            for k, cell in by_k.items():
                accs = [r["acc"] for r in cell[method]]
                params = statistics.mean(r["params"] for r in cell[method])
                ens = statistics.mean(r["params"] for r in cell["ensemble"])
                row[f"k{k}"] = {"acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs),
                                "params": params, "params_pct_ensemble": 100 * params / ens}
            out.append(row)
    return out


def targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {(r["task"], r["method"]): r for r in summary(doc)}
    out = {}
    for k in ("10", "20"):
        if f"k{k}" not in next(iter(rows.values())):
            continue
        gaps = []
        for task in doc["rows"]:
            ft = rows[(task, "finetune")][f"k{k}"]["acc_mean"]
            for tag in SELECTS:
                gaps.append(100 * (rows[(task, f"S&P({tag})")][f"k{k}"]["acc_mean"] - ft))
        gap = statistics.mean(gaps)
        out[f"S&P beats Finetune by >= 3 points (k={k}, mean over tasks and R/T)"] = {
            "measured": f"{gap:+.2f} points", "met": gap >= 3}
    for task in doc["rows"]:
        for tag in SELECTS:
            for kk, cell in rows[(task, f"S&P({tag})")].items():
                if not kk.startswith("k"):
                    continue
                pct = cell["params_pct_ensemble"]
                gap = 100 * (rows[(task, "ensemble")][kk]["acc_mean"] - cell["acc_mean"])
                out[f"{task} S&P({tag}) {kk}: params <= 40% of Ensemble, within 5 points"] = {
                    "measured": f"{pct:.1f}% params, {gap:.2f} points below", "met": pct <= 40 and gap <= 5}
    if doc.get("time"):
        worst = max(t["pack_s"] / t["slice_s"] for t in doc["time"])
        out["packing takes <= 10% of the slicing time of its fragments"] = {
            "measured": f"worst {100 * worst:.2f}% (1..10 classes)", "met": worst <= 0.10}
    return out


def render(doc: dict[str, Any], console: Console) -> None:
    ks = [k for k in next(iter(doc["rows"].values()))]
    table = Table(title="S&P vs baselines (params: mean at the first k, % of Ensemble; "
                        "accuracy %: mean ± std over class sets × draws)")
    for col in ("task", "method", "params", *[f"k={k}" for k in ks]):
        table.add_column(col)
    for row in summary(doc):
        first = row[f"k{ks[0]}"]
        table.add_row(row["task"], row["method"], f"{first['params'] / 1e3:.1f}K ({first['params_pct_ensemble']:.1f}%)",
                      *[f"{100 * row[f'k{k}']['acc_mean']:.2f}±{100 * row[f'k{k}']['acc_std']:.2f}" for k in ks])
    console.print(table)
    for tag, mats in doc.get("iou", {}).items():
        for name, mat in mats.items():
            console.print(f"IoU S&P({tag}) {name}: " + " | ".join(" ".join(f"{v:.2f}" for v in r) for r in mat))
    if doc.get("time"):
        t = Table(title="packing vs slicing time (threshold fragments)")
        for col in ("classes", "pack s/class", "slice s/class", "pack/slice"):
            t.add_column(col)
        for r in doc["time"]:
            t.add_row(str(r["classes"]), f"{r['pack_s_per_class']:.3f}", f"{r['slice_s_per_class']:.2f}",
                      f"{100 * r['pack_s'] / r['slice_s']:.2f}%")
        console.print(t)
    for k, e in doc.get("expansion", {}).items():
        pairs = [f"e={err:.2f}: {rate:.1f}×" for err, rate in zip(e["errors"], e["rate"], strict=True)
                 if err in (0.05, 0.1, 0.2, 0.3)]
        console.print(f"expansion k={k} (5-class combos, mean acc {_ms(e['accuracies'])}): " + ", ".join(pairs))
    t = Table(title="targets")
    t.add_column("target")
    t.add_column("measured")
    t.add_column("verdict")
    for name, v in targets(doc).items():
        t.add_row(name, v["measured"], "met" if v["met"] else "MISSED")
    console.print(t)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15, 8.4))
    axes = grid[0]
    ax = axes[0]
    for row in summary(doc):
        ks = sorted(int(k[1:]) for k in row if k.startswith("k"))
        ax.plot(ks, [100 * row[f"k{k}"]["acc_mean"] for k in ks], marker="o", label=f"{row['task']} {row['method']}")
    ax.set_xlabel("k (samples per class)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Table 2: accuracy vs k")
    ax.legend(fontsize=6)
    ax = axes[1]
    for k, e in doc.get("expansion", {}).items():
        ax.plot(e["errors"], e["rate"], marker=".", label=f"k={k}")
    ax.set_xlabel("acceptable error e")
    ax.set_ylabel("equivalent expansion rate (×)")
    ax.set_title("Fig. 6: market expansion (5-class packs)")
    ax.legend()
    ax = axes[2]
    if doc.get("time"):
        n = [r["classes"] for r in doc["time"]]
        ax.plot(n, [r["pack_s_per_class"] for r in doc["time"]], marker="o", label="packing")
        ax.plot(n, [r["slice_s_per_class"] for r in doc["time"]], marker="s", label="slicing")
        ax.set_yscale("log")
    ax.set_xlabel("classes packed")
    ax.set_ylabel("seconds per class")
    ax.set_title("Fig. 7: time per class")
    ax.legend()
    for ax, (name, mat) in zip(grid[1], sorted(doc.get("iou", {}).get("T", {}).items()), strict=False):
        image = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(np.asarray(mat)):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
        ax.set_title(f"Fig. 5: IoU of kept units, S&P(T), {name}")
        ticks = [str(c) for c in get_entry(name).classes]
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_yticks(range(len(ticks)), ticks)
        ax.set_xlabel("fragment of class")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[5, 10, 20])
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--combos", type=int, default=4, help="class sets of T1 (T3 gets half as many)")
    parser.add_argument("--expansion", type=int, default=100)
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "pack.json")
    args = parser.parse_args(argv)
    console = Console()
    if args.render_only:
        doc = json.loads(args.out.read_text())
    else:
        if args.quick:
            args.ks, args.draws, args.combos, args.expansion, args.ft_steps = [5], 1, 2, 5, 10
        doc = run_measured(args, console, run, lambda d: {"summary": summary(d), "targets": targets(d)})
    show(doc, args, console, render, plot, measured=not args.render_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
