"""``zoocompile partition`` and ``zoocompile assemble``: Deep Model Reassembly on the command line.

Both build an ``AssembleConfig``; their options default to its field defaults. Progress goes to stderr;
``assemble`` writes its output directory all or nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoocompiler.core.text import human

from ..pipelines.assemble.config import POOL_MODES, PROXIES, TUNE_MODES, AssembleConfig
from ..pipelines.base import run_staged
from .common import (
    check_at_least,
    default_of,
    deploy_from_args,
    deploy_options,
    executor_from_args,
    executor_options,
    json_option,
    out_dir_options,
    progress,
    render_deploy,
    table,
    written_files,
)

CONFIG = AssembleConfig
ZOO_HELP = "'demo' (the built-in zoo) or comma-separated specs, e.g. zoo:resnet_s,zoo:vgg_s"
# assemble only; partition leaves them at AssembleConfig's defaults
TUNING_OPTIONS = ("top", "tune", "epochs", "proxy", "tune_top", "baselines")


def _config(args: argparse.Namespace, budget) -> Any:
    check_at_least(args, 1, "k", "restarts", "top", "tune_top", "image_size", "train_size")  # before the zoo loads
    check_at_least(args, 0, "eps", "seed")
    return AssembleConfig(
        budget=budget,
        zoo=args.zoo,
        data=args.data,
        image_size=args.image_size,
        train_size=args.train_size,
        val_fraction=args.val_fraction,
        pool=args.pool,
        k=args.k,
        eps=args.eps,
        restarts=args.restarts,
        distinct_sets=args.distinct_sets,
        size=args.size,
        seed=args.seed,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        **{name: getattr(args, name) for name in TUNING_OPTIONS if hasattr(args, name)},
        **({"deploy": deploy_from_args(args)} if hasattr(args, "precision") else {}),  # assemble only
    )


def _set_rows(analysis) -> list[dict[str, Any]]:
    members, part = analysis.members, analysis.partition
    rows = []
    for j, blocks in enumerate(part.equivalence_sets()):
        anchor = part.anchors[j]
        for ref in blocks:
            m = members[ref.model]
            rows.append(
                {
                    "set": j,
                    "model": m.name,
                    "stage": ref.stage,
                    "cut_range": [m.positions[ref.start].node, m.positions[ref.end].node],
                    "positions": [ref.start, ref.end],
                    "params": m.params_between(ref.start, ref.end),
                    "macs": m.macs_between(ref.start, ref.end),
                    "anchor": ref == anchor,
                }
            )
    return rows


def cmd_partition(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.core.budget import Budget
    from zoocompiler.pipelines.assemble.pipeline import analyse_zoo, pickable_per_set

    analysis = analyse_zoo(_config(args, Budget()), progress(args), executor_from_args(args))
    part = analysis.partition
    return {
        "zoo": [m.spec for m in analysis.members],
        "k": part.k,
        "eps": part.eps,
        "objective": part.objective,
        "restarts": len(part.restart_objectives),
        "distinct_sets": part.distinct,
        "seconds": part.seconds,
        "effective_eps": {m.name: e for m, e in zip(analysis.members, part.effective_eps, strict=True)},
        "sets": _set_rows(analysis),
        "pickable": pickable_per_set(part),
        "similarity": analysis.similarity.to_dict(),
    }


def cmd_assemble(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.core.budget import Budget
    from zoocompiler.pipelines.assemble.pipeline import assemble

    config = _config(args, Budget.parse(args.budget))
    out = Path(args.out)
    executor = executor_from_args(args)
    report = run_staged(config, out, args.force, lambda staging: assemble(config, staging, progress(args), executor))
    report["files"] = written_files(out)
    for export in (report["export"], report["deploy"]["export"]):
        if export["path"]:
            export["path"] = str(out / export["path"])
    report["deploy"]["path"] = str(out / report["deploy"]["path"])
    return report


def render_partition(console, data: dict[str, Any]) -> None:
    rows = [
        [
            r["set"],
            ("★ " if r["anchor"] else "") + r["model"],
            r["stage"],
            f"{r['cut_range'][0]} → {r['cut_range'][1]}",
            human(r["params"]),
            human(r["macs"]),
        ]
        for r in data["sets"]
    ]
    title = f"equivalence sets (K={data['k']}, objective {data['objective']:.3f}, {data['restarts']} restarts, "
    title += f"{data['seconds']:.2f} s; ★ anchor)"
    console.print(
        table(title, ["set", "model", "stage", "cut range", "params", "MACs"], rows, right=("params", "MACs"))
    )
    console.print(_pickable_line(data["pickable"]))
    relaxed = {k: v for k, v in data["effective_eps"].items() if v > data["eps"] + 1e-9}
    if relaxed:
        text = ", ".join(f"{k} {v:.2f}" for k, v in relaxed.items())
        console.print(f"size balance relaxed (eps {data['eps']} is infeasible for): {text}")


def _pickable_line(sets: list[dict[str, Any]]) -> str:
    text = ", ".join(f"set {r['set']} {r['pickable']}/{r['blocks']}" for r in sets)
    return f"pickable blocks per equivalence set: {text}"


def render_assemble(console, data: dict[str, Any]) -> None:
    rows = [
        [b["stage"], b["set"], b["model"], f"{b['cut_range'][0]} → {b['cut_range'][1]}", human(b["params"])]
        for b in data["chosen"]
    ]
    whole = ""
    if data["chosen_source"] == "whole":
        whole = " (a zoo model kept whole: no reassembly won on the held-out split)"
    console.print(table(f"chosen network{whole}", ["stage", "set", "model", "cut range", "params"], rows,
                        right=("params",)))
    use = ", ".join(f"{k} {v:.0%}" for k, v in data["budget_use"].items())
    task = data["task"]
    tau = data["kendall_tau"]
    summary = [
        ["task", f"{task['data']} at {'×'.join(map(str, task['input_shape']))}, {task['num_classes']} classes "
                 f"(fit {task['fit']}, held out {task['val']}, test {task['test']})"],
        ["params / MACs", f"{human(data['params'])} / {human(data['macs'])}"],
        ["latency (ORT, batch 1)", f"{data['latency_ms']:.3f} ms ({data['precision']} model.onnx)"],
        ["budget use", use or "-"],
        [f"proxy ({data['proxy']})", f"{data['probe']:.2%} held-out linear probe"
         + (f", NASWOT {data['naswot']:.2f}" if data["naswot"] is not None else "")],
        ["Kendall τ (proxy vs tuned, held out)", "-" if tau is None else f"{tau:.2f} over {len(data['tuned'])} tuned"],
        [
            "accuracy (test)",
            f"{data['accuracy']:.2%} ({data['tune']} tuning, {data['kept_head']} head kept; least-squares head "
            f"before: {data['accuracy_before_tuning']:.2%})",
        ],
        ["ONNX parity", f"max |ORT - PyTorch| = {data['export']['max_abs_diff']:.3g} (fp32 export)"],
        ["files", ", ".join(data["files"].values())],
    ]
    console.print(table("assemble", ["", ""], summary))
    console.print(_pickable_line(data["sets"]))
    base = data["baselines"]
    if base is not None:
        rows = [["chosen", human(data["params"]), f"{data['accuracy_before_tuning']:.2%}", f"{data['accuracy']:.2%}"]]
        single = base["single"]
        if single is not None:
            rows.append([f"best single: {single['model']}", human(single["params"]), f"{single['test_before']:.2%}",
                         f"{single['test']:.2%}"])
        scratch = base["scratch"]
        rows.append(["from scratch (same network)", human(scratch["params"]), f"{scratch['test_before']:.2%}",
                     f"{scratch['test']:.2%}"])
        console.print(table("against the baselines (same budget, same tuning; test accuracy)",
                            ["network", "params", "least-squares head", "kept after tuning"], rows,
                            right=("params", "least-squares head", "kept after tuning")))
    console.print(data["verdict"]["message"])
    render_deploy(console, data["deploy"], "model.onnx")


def _zoo_options(parser: argparse.ArgumentParser) -> None:
    """The options partition and assemble share (the zoo, the data and the partition)."""
    parser.add_argument("--zoo", default=default_of(CONFIG, "zoo"), metavar="ZOO", help=ZOO_HELP)
    parser.add_argument(
        "--data",
        default=default_of(CONFIG, "data"),
        metavar="DATA",
        help="task data: digits, mnist5k, npz:, imagefolder:",
    )
    parser.add_argument(
        "--image-size", type=int, default=default_of(CONFIG, "image_size"), metavar="PX",
        help="resize images to PX×PX (default: the zoo's declared input size)",
    )
    parser.add_argument(
        "--train-size", type=int, default=default_of(CONFIG, "train_size"), metavar="N",
        help="use N training samples (stratified; default: the whole training split)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=default_of(CONFIG, "val_fraction"), metavar="F",
        help="held-out part of the training data for the proxy and every selection",
    )
    parser.add_argument(
        "--pool", choices=POOL_MODES, default=default_of(CONFIG, "pool"),
        help="how activations are reduced for CKA (auto: flatten small maps, pool large ones)",
    )
    parser.add_argument(
        "-K", dest="k", type=int, default=default_of(CONFIG, "k"), help="blocks per model = equivalence sets"
    )
    parser.add_argument(
        "--eps", type=float, default=default_of(CONFIG, "eps"), help="block size balance: |B| <= (1+eps)|M|/K"
    )
    parser.add_argument(
        "--restarts", type=int, default=default_of(CONFIG, "restarts"), metavar="R", help="partition restarts (seeds)"
    )
    parser.add_argument(
        "--distinct-sets",
        action=argparse.BooleanOptionalAction,
        default=default_of(CONFIG, "distinct_sets"),
        help="put each model's K blocks in K different equivalence sets (exact DP; every block can be picked)",
    )
    parser.add_argument(
        "--size", choices=("params", "flops"), default=default_of(CONFIG, "size"), help="block size measure"
    )
    parser.add_argument(
        "--seed", type=int, default=default_of(CONFIG, "seed"), metavar="N", help="seed for probes, restarts, tuning"
    )
    parser.add_argument(
        "--cache-dir",
        default=default_of(CONFIG, "cache_dir"),
        metavar="DIR",
        help="similarity cache (default: the zoocompiler cache dir)",
    )
    json_option(parser)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``partition`` and ``assemble`` to the ``zoocompile`` sub-parser set."""
    part = commands.add_parser(
        "partition",
        help="partition the zoo into K blocks per model and K equivalence sets (DeRy)",
        description="Compute the cut-point CKA similarity of every zoo model on probe images (cached), then "
        "partition each model into K blocks and group them into K equivalence sets.",
        epilog="example:\n  zoocompile partition --zoo demo -K 4 --eps 0.2 --restarts 200",
    )
    _zoo_options(part)
    executor_options(part, latency=False)
    part.set_defaults(run=cmd_partition, render=render_partition)

    asm = commands.add_parser(
        "assemble",
        help="reassemble zoo blocks into a new model under a budget, tune it, export verified ONNX",
        description="Deep Model Reassembly: partition the zoo, pick one block per equivalence set and stage with "
        "an integer program under the budget (top-M with no-good cuts), re-rank them and the zoo models kept "
        "whole by held-out linear-probe accuracy, tune the best few and keep the best on held-out data, "
        "evaluate the best single zoo model and a from-scratch twin the same way, and export ONNX (at --precision: "
        "fp32, fp16, or int8 calibrated on the task's training data) with a report, a plan and plots.",
        epilog="examples:\n  zoocompile assemble --budget flops=2M --train-size 500 --out out/asm\n"
        "  zoocompile assemble --zoo demo --data mnist5k --budget params=150k,flops=8M,latency=2ms "
        "--tune frozen --epochs 3 --out out/asm2\n"
        "  zoocompile assemble --budget flops=3M --precision int8 --out out/asm_int8",
    )
    asm.add_argument("--budget", required=True, help="params=N,flops=N[,latency=Tms] with k/M/G suffixes")
    out_dir_options(asm, default="assembly")
    asm.add_argument(
        "--top", type=int, default=default_of(CONFIG, "top"), metavar="M", help="ILP candidates to re-rank"
    )
    asm.add_argument("--proxy", choices=PROXIES, default=default_of(CONFIG, "proxy"),
                     help="re-rank by held-out linear-probe accuracy (probe) or NASWOT")
    asm.add_argument("--tune-top", type=int, default=default_of(CONFIG, "tune_top"), metavar="T",
                     help="tune the best T candidates and keep the best on the held-out split")
    asm.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=default_of(CONFIG, "baselines"),
                     help="also tune the best single zoo model and a from-scratch twin (same budget and tuning)")
    asm.add_argument("--tune", choices=TUNE_MODES, default=default_of(CONFIG, "tune"), help="tuning protocol")
    asm.add_argument("--epochs", type=int, default=default_of(CONFIG, "epochs"), metavar="N", help="tuning epochs")
    _zoo_options(asm)
    executor_options(asm)
    deploy_options(asm)  # int8 calibrates on the task's training split (--data) and is scored on its test split
    asm.set_defaults(run=cmd_assemble, render=render_assemble)
