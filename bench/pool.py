"""Learngene Pool benchmark (paper 002, issue 14): Tables 1/2 (LGP vs SN-Net per (low, high)), storage, Table 5
(stitch init tm vs ls vs random, before and after fine-tuning), Table 3 (best descendant per params range).

Usage::

    python bench/pool.py                 # full run (see docs/bench_pool.md for the time on 2 cores)
    python bench/pool.py --quick         # smoke version (1 epoch everywhere, l = L/2 only)
    python bench/pool.py --render-only   # re-print tables, verdicts and plots from the JSON

Ancestry: the zoo's ``vit_anc12`` (12 uniform blocks at d = 192, 12 heads, trained on mnist5k). For l in
``--blocks`` (L/2 and 3L/4, the paper's pool(12) and pool(18)):

* **Learngene Pool(l)**: the product's ``distill`` (Eq. 8, α = 0.5, τ = 1; dense distillation at 3 levels into
  both rows; the product's defaults) trains two auxiliary models of l blocks, at d and at
  d' = d/4, for ``--epochs`` each; their blocks form the pool; stitches are initialised ``tm`` / ``ls`` / ``random``
  (each evaluated), then each variant is fine-tuned (``finetune``: one sampled path per step, CE + KD from the
  ancestry) for ``--ft-epochs``.
* **SN-Net(l)** at equal storage (the paper's Tables 1-2): two anchors of the same two shapes trained
  independently from scratch with cross-entropy for ``--epochs`` each (the same epochs as each auxiliary),
  stitched with least squares (SN-Net's init) and fine-tuned exactly like the pool.

Storage: the pool's parameters against SN-Net's anchor family at the ancestry's depth (anchors at d' and d, as
SN-Net stitches full models; and with a third anchor at d/2, the paper's DeiT-Ti/S/B), each with one stitch per
block position. Latency: ONNX Runtime (CPU, 1 thread, batch 1, median of ``--runs``) of every descendant of each
fine-tuned Learngene Pool. Writes ``bench/results/pool.json`` and ``bench/results/pool.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _measured import run_measured, show  # bench/_measured.py (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from zoocompiler.core.atomic import write_json_atomic
from zoocompiler.core.modules import count_params
from zoocompiler.core.plots import pyplot, save_png
from zoocompiler.data import load_dataset
from zoocompiler.pipelines.pool.ancestry import VitShape, ancestry_shape, build_vit
from zoocompiler.pipelines.pool.config import PoolDistillConfig, PoolFinetuneConfig
from zoocompiler.pipelines.pool.distill import dense_levels
from zoocompiler.pipelines.pool.pipeline import aux_shapes, distill_row, measure_descendants
from zoocompiler.pipelines.pool.pool import LearngenePool, example_batch, finetune
from zoocompiler.sources import load_model
from zoocompiler.training import evaluate, seed_everything, train

RESULTS = Path(__file__).resolve().parent / "results"
ANCESTRY = "zoo:vit_anc12"
INITS = ("tm", "ls", "random")
RANGES = ((0, 0.25e6), (0.25e6, 0.5e6), (0.5e6, 1e6), (1e6, 1.5e6), (1.5e6, 2e6), (2e6, 3e6))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _family(shape: VitShape, widths: list[int]) -> dict[str, int]:
    """Params SN-Net stores for anchors of the ancestry's depth at ``widths``, plus one stitch per position between
    consecutive anchors (a d_a → d_b linear with bias)."""
    anchors = {f"anchor d={w}": count_params(build_vit(replace(shape, embed_dim=w, num_heads=w // shape.head_dim)))
               for w in widths}
    stitches = sum((shape.depth - 1) * (a * b + b) for a, b in zip(widths[:-1], widths[1:], strict=True))
    return {**anchors, "stitches": stitches, "total": sum(anchors.values()) + stitches}


def run_depth(blocks: int, args: argparse.Namespace, ancestry: torch.nn.Module, splits: tuple, console: Console,
              ) -> dict[str, Any]:
    """Learngene Pool(l) with three stitch inits and SN-Net(l) at equal storage, each before and after fine-tuning."""
    train_split, test_split = splits
    shape = ancestry_shape(ancestry)
    input_shape = tuple(train_split.x.shape[1:])
    distill_cfg = PoolDistillConfig(blocks=blocks, epochs=args.epochs, progress=args.bars)
    ft_cfg = PoolFinetuneConfig()
    narrow, wide, levels = aux_shapes(shape, distill_cfg)  # the product's defaults: d' = d/4, 3 levels per row
    probe = train_split.x[torch.randperm(len(train_split), generator=torch.Generator().manual_seed(0))[:256]]
    rows, maps, record = {}, {}, {"blocks": blocks, "distill": {}, "anchors": {}}
    for row, aux_shape in (("large", wide), ("small", narrow)):
        t0 = time.perf_counter()
        aux, result = distill_row(ancestry, aux_shape, dense_levels(shape.depth, blocks, levels[row]), train_split,
                                  distill_cfg, f"LGP({blocks}) {row}")
        rows[row], maps[row] = aux, result.transforms
        record["distill"][row] = {"accuracy": evaluate(aux, test_split), "seconds": time.perf_counter() - t0,
                                  "levels": result.levels, "params": count_params(aux)}
        console.print(f"LGP({blocks}) {row} row distilled: {100 * record['distill'][row]['accuracy']:.2f}% "
                      f"in {record['distill'][row]['seconds']:.0f} s")
    anchors = {}
    for row, aux_shape in (("large", wide), ("small", narrow)):
        t0 = time.perf_counter()
        seed_everything(0)
        model = build_vit(aux_shape)
        train(model, train_split, epochs=args.epochs, lr=distill_cfg.lr, batch_size=distill_cfg.batch_size, seed=0,
              augment=True, progress=args.bars, desc=f"SN-Net({blocks}) anchor {row}")
        anchors[row] = model.eval()
        record["anchors"][row] = {"accuracy": evaluate(model, test_split), "seconds": time.perf_counter() - t0,
                                  "params": count_params(model)}
        console.print(f"SN-Net({blocks}) {row} anchor trained: {100 * record['anchors'][row]['accuracy']:.2f}% "
                      f"in {record['anchors'][row]['seconds']:.0f} s")
    variants = {f"LGP {init}": (rows, init) for init in INITS} | {"SN-Net ls": (anchors, "ls")}
    record["variants"] = {}
    for name, (members, init) in variants.items():
        pool = LearngenePool(copy.deepcopy(members["small"]), copy.deepcopy(members["large"]),
                             example_batch(input_shape))
        pool.init_stitches(init, matrix=maps["small"].stitch_matrix(), probe=probe, seed=0)
        before = pool.descendant_rows(test_split, input_shape)
        t0 = time.perf_counter()
        _, counts = finetune(pool, train_split, ancestry=ancestry, epochs=args.ft_epochs, lr=ft_cfg.lr,
                             batch_size=ft_cfg.batch_size, tau=ft_cfg.tau, seed=0, progress=args.bars,
                             desc=f"{name} ({blocks}) finetune")
        after = pool.descendant_rows(test_split, input_shape)
        entry = {"before": before, "after": after, "finetune_seconds": time.perf_counter() - t0,
                 "paths_sampled": counts, "storage": pool.storage()}
        if name in ("LGP tm", "SN-Net ls"):
            with tempfile.TemporaryDirectory() as tmp:
                measure_descendants(pool, after, Path(tmp), torch.zeros(1, *input_shape), runs=args.runs)
        record["variants"][name] = entry
        console.print(f"{name} ({blocks}): mean descendant accuracy {100 * _mean(before):.2f}% → "
                      f"{100 * _mean(after):.2f}% after {entry['finetune_seconds']:.0f} s of fine-tuning")
    return record


def _mean(rows: list[dict]) -> float:
    return sum(r["accuracy"] for r in rows) / len(rows)


def _stitched(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["low"] and r["high"]]


def _depth_job(blocks: int, args: argparse.Namespace) -> dict[str, Any]:
    """One depth in its own process (``--jobs``): every input is re-read and seeded, so results do not depend
    on the number of jobs."""
    torch.set_num_threads(1)
    ancestry = load_model(ANCESTRY).eval()
    splits = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    return run_depth(blocks, args, ancestry, splits, Console())


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    torch.set_num_threads(1)
    ancestry = load_model(ANCESTRY).eval()
    shape = ancestry_shape(ancestry)
    splits = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    doc: dict[str, Any] = {"ancestry": {"spec": ANCESTRY, "params": count_params(ancestry),
                                        "accuracy": evaluate(ancestry, splits[1]), "shape": shape.to_dict()},
                           "depths": {}}
    d = shape.embed_dim
    doc["snnet_family"] = {"two anchors": _family(shape, [d // 4, d]),
                           "three anchors": _family(shape, [d // 4, d // 2, d])}
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            records = list(pool.map(_depth_job, args.blocks, [args] * len(args.blocks)))
    else:
        records = [run_depth(blocks, args, ancestry, splits, console) for blocks in args.blocks]
    doc["depths"] = {str(blocks): record for blocks, record in zip(args.blocks, records, strict=True)}
    return doc


# --- summaries, targets, rendering ----------------------------------------------------------------------


def table_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 1/2 rows: (low, high), MACs, params, SN-Net and LGP accuracy after fine-tuning (``lgp``: the paper's
    tm init; ``lgp_ls``: the product's default ls init)."""
    lgp, sn = rec["variants"]["LGP tm"]["after"], rec["variants"]["SN-Net ls"]["after"]
    sn_by = {r["low"]: r for r in sn}
    ls_by = {r["low"]: r for r in rec["variants"]["LGP ls"]["after"]}
    return [{"low": r["low"], "high": r["high"], "macs": r["macs"], "params": r["params"],
             "latency_ms": r.get("latency_ms"), "snnet": sn_by[r["low"]]["accuracy"], "lgp": r["accuracy"],
             "lgp_ls": ls_by[r["low"]]["accuracy"]} for r in lgp]


def best_per_range(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 3: the most accurate descendant of each pool within each params range (None: uncovered)."""
    out = []
    for lo, hi in RANGES:
        row: dict[str, Any] = {"range": f"{lo / 1e6:g}-{hi / 1e6:g}M"}
        for blocks, rec in doc["depths"].items():
            inside = [r["accuracy"] for r in rec["variants"]["LGP tm"]["after"] if lo < r["params"] <= hi]
            row[f"LGP({blocks})"] = max(inside) if inside else None
            sn = [r["accuracy"] for r in rec["variants"]["SN-Net ls"]["after"] if lo < r["params"] <= hi]
            row[f"SN-Net({blocks})"] = max(sn) if sn else None
        out.append(row)
    return out


def targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    depths = sorted(doc["depths"], key=int)
    half = doc["depths"][depths[0]]
    pool_total = half["variants"]["LGP tm"]["storage"]["total"]
    family = doc["snnet_family"]["two anchors"]["total"]
    three = doc["snnet_family"]["three anchors"]["total"]
    out["storage ≤ 45% of SN-Net's"] = {"value": f"{100 * pool_total / family:.1f}% (pool({half['blocks']}) "
                                                 f"{pool_total:,} vs SN-Net two anchors {family:,}; "
                                                 f"{100 * pool_total / three:.1f}% of three anchors)",
                                        "met": pool_total <= 0.45 * family}
    smallest = min(r["params"] for r in half["variants"]["LGP tm"]["after"])
    anchor = min(v for k, v in doc["snnet_family"]["two anchors"].items() if k.startswith("anchor"))
    out["smallest descendant < SN-Net's smallest anchor"] = {"value": f"{smallest:,} vs {anchor:,}",
                                                             "met": smallest < anchor}
    rows = table_rows(half)
    wins = sum(r["lgp"] >= r["snnet"] for r in rows)
    wins_ls = sum(r["lgp_ls"] >= r["snnet"] for r in rows)
    out[f"LGP({half['blocks']}) ≥ SN-Net at ≥ 5 of {len(rows)} sizes"] = {
        "value": f"{wins} of {len(rows)} with the paper's tm init ({wins_ls} of {len(rows)} with ls)",
        "met": wins >= 5}
    for blocks in depths:
        rec = doc["depths"][blocks]
        tm = _mean(_stitched(rec["variants"]["LGP tm"]["after"]))
        ls = _mean(_stitched(rec["variants"]["LGP ls"]["after"]))
        out[f"tm init ≥ ls init (l={blocks}, stitched, after FT)"] = {
            "value": f"{100 * tm:.2f}% vs {100 * ls:.2f}%", "met": tm >= ls}
    return out


def derived(doc: dict[str, Any]) -> dict[str, Any]:
    """The verdicts and Table 3, computed from the measured rows."""
    return {"targets": targets(doc), "table3": best_per_range(doc)}


def render(doc: dict[str, Any], console: Console) -> None:
    anc = doc["ancestry"]
    console.print(f"ancestry {anc['spec']}: {anc['params']:,} params, {100 * anc['accuracy']:.2f}%")
    for blocks, rec in doc["depths"].items():
        t = Table(title=f"Table {1 if int(blocks) <= 6 else 2} shape: SN-Net vs Learngene Pool({blocks}) after "
                        f"fine-tuning (equal storage: {rec['variants']['LGP tm']['storage']['total']:,} vs "
                        f"{rec['variants']['SN-Net ls']['storage']['total']:,} params)")
        for c in ("low", "high", "MACs (M)", "params (M)", "ORT ms", "SN-Net %", "LGP (tm) %", "Δ", "LGP (ls) %", "Δ"):
            t.add_column(c, justify="right")
        for r in table_rows(rec):
            t.add_row(str(r["low"]), str(r["high"]), f"{r['macs'] / 1e6:.2f}", f"{r['params'] / 1e6:.3f}",
                      "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}", _pct(r["snnet"]), _pct(r["lgp"]),
                      f"{100 * (r['lgp'] - r['snnet']):+.2f}", _pct(r["lgp_ls"]),
                      f"{100 * (r['lgp_ls'] - r['snnet']):+.2f}")
        console.print(t)
        t = Table(title=f"Table 5 shape: stitch init, pool({blocks}) (accuracy %, before → after fine-tuning)")
        t.add_column("low/high", justify="right")
        names = list(rec["variants"])
        for name in names:
            t.add_column(name, justify="right")
        by = {n: ({r["low"]: r for r in v["before"]}, {r["low"]: r for r in v["after"]})
              for n, v in rec["variants"].items()}
        for r in rec["variants"]["LGP tm"]["after"]:
            t.add_row(f"{r['low']}/{r['high']}", *[f"{_pct(by[n][0][r['low']]['accuracy'])} → "
                                                  f"{_pct(by[n][1][r['low']]['accuracy'])}" for n in names])
        console.print(t)
        console.print("distilled rows: " + ", ".join(f"{k} {_pct(v['accuracy'])}% ({v['params']:,} params)"
                                                     for k, v in rec["distill"].items())
                      + " | SN-Net anchors: " + ", ".join(f"{k} {_pct(v['accuracy'])}%"
                                                          for k, v in rec["anchors"].items()))
    t = Table(title="storage (params)")
    t.add_column("what")
    t.add_column("params", justify="right")
    for blocks, rec in doc["depths"].items():
        t.add_row(f"Learngene Pool({blocks}) (rows + stitches)", f"{rec['variants']['LGP tm']['storage']['total']:,}")
    for name, fam in doc["snnet_family"].items():
        t.add_row(f"SN-Net, {name} at depth {doc['ancestry']['shape']['depth']}", f"{fam['total']:,}")
    console.print(t)
    t = Table(title="Table 3 shape: best descendant per params range (accuracy %)")
    keys = list(best_per_range(doc)[0])
    for k in keys:
        t.add_column(k, justify="right")
    for row in best_per_range(doc):
        t.add_row(*[row[k] if k == "range" else ("uncover" if row[k] is None else _pct(row[k])) for k in keys])
    console.print(t)
    t = Table(title="targets")
    t.add_column("target")
    t.add_column("measured")
    t.add_column("met")
    for name, v in doc["targets"].items():
        t.add_row(name, v["value"], "MET" if v["met"] else "MISSED")
    console.print(t)


def plot(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(doc["depths"]), figsize=(5.2 * (1 + len(doc["depths"])), 4.2))
    ax = axes[0]
    styles = iter(("o-", "o:", "s--", "^-", "^:", "D--"))
    for blocks, rec in doc["depths"].items():
        for name, label in (("LGP tm", f"Learngene Pool({blocks}), tm"), ("LGP ls", f"Learngene Pool({blocks}), ls"),
                            ("SN-Net ls", f"SN-Net({blocks})")):
            rows = sorted(rec["variants"][name]["after"], key=lambda r: r["params"])
            ax.plot([r["params"] / 1e6 for r in rows], [100 * r["accuracy"] for r in rows], next(styles), label=label,
                    markersize=4)
    ax.plot([doc["ancestry"]["params"] / 1e6], [100 * doc["ancestry"]["accuracy"]], "*", markersize=12,
            label="ancestry")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("descendants after fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax, (blocks, rec) in zip(axes[1:], doc["depths"].items(), strict=True):
        for (name, variant), style in zip(rec["variants"].items(), ("o-", "s-", "^-", "D--"), strict=True):
            for key, alpha in (("before", 0.35), ("after", 1.0)):
                rows = sorted(variant[key], key=lambda r: r["params"])
                ax.plot([r["params"] / 1e6 for r in rows], [100 * r["accuracy"] for r in rows], style, alpha=alpha,
                        markersize=3, label=f"{name} ({key})")
        ax.set_xlabel("parameters (M)")
        ax.set_title(f"stitch init, l={blocks} (faint: before fine-tuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=lambda s: [int(v) for v in s.split(",")], default=[6, 9])
    parser.add_argument("--epochs", type=int, default=20, help="distillation epochs per auxiliary = anchor epochs")
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50, help="timed ONNX Runtime runs per descendant")
    parser.add_argument("--bars", action="store_true", help="show training progress bars")
    parser.add_argument("--jobs", type=int, default=1, help="depths run in parallel processes (same results)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "pool.json")
    args = parser.parse_args(argv)
    console = Console(width=150)
    if args.render_only:
        doc = json.loads(args.out.read_text())
        doc.update(derived(doc))  # recomputed from the rows
        write_json_atomic(args.out, doc)
    else:
        if args.quick:
            args.blocks, args.epochs, args.ft_epochs, args.runs = [6], 1, 1, 5
        doc = run_measured(args, console, run, derived)
    show(doc, args, console, render, plot, measured=not args.render_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
