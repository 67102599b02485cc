"""``zoocompile partition`` and ``zoocompile assemble``: Deep Model Reassembly on the command line.

Registered by ``cli.build_parser``; the commands follow the same contract as the others (a JSON-able
dict first, rendered as rich tables or printed with ``--json``; progress goes to stderr).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ZOO_HELP = "'demo' (the built-in zoo) or comma-separated specs, e.g. zoo:resnet_s,zoo:vgg_s"


def _progress(args: argparse.Namespace):
    """Step messages on stderr (silent with --json)."""
    if getattr(args, "json", False):
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda text: console.print(f"[dim]·[/dim] {text}")


def _config(args: argparse.Namespace, budget) -> Any:
    from .pipelines.assemble.pipeline import AssembleConfig

    return AssembleConfig(
        budget=budget,
        zoo=args.zoo,
        data=args.data,
        k=args.k,
        eps=args.eps,
        restarts=args.restarts,
        size=args.size,
        seed=args.seed,
        top=getattr(args, "top", 20),
        tune=getattr(args, "tune", "frozen"),
        epochs=getattr(args, "epochs", 3),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
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
    from .core.budget import Budget
    from .pipelines.assemble.pipeline import analyse_zoo

    analysis = analyse_zoo(_config(args, Budget()), _progress(args))
    part = analysis.partition
    return {
        "zoo": [m.spec for m in analysis.members],
        "k": part.k,
        "eps": part.eps,
        "objective": part.objective,
        "restarts": len(part.restart_objectives),
        "seconds": part.seconds,
        "effective_eps": {m.name: e for m, e in zip(analysis.members, part.effective_eps, strict=True)},
        "sets": _set_rows(analysis),
        "similarity": analysis.similarity.to_dict(),
    }


def cmd_assemble(args: argparse.Namespace) -> dict[str, Any]:
    from .core.atomic import check_out_dir, staged_dir
    from .core.budget import Budget
    from .pipelines.assemble.pipeline import assemble

    budget = Budget.parse(args.budget)
    config = _config(args, budget)
    config.check()
    out = Path(args.out)
    check_out_dir(out, args.force)
    with staged_dir(out, args.force) as staging:
        report = assemble(config, staging, _progress(args))
    report["files"] = {p.name: str(out / p.name) for p in sorted(out.iterdir())}
    report["export"]["path"] = str(out / "model.onnx")
    return report


def render_partition(console, data: dict[str, Any]) -> None:
    from .cli import _table, human

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
        _table(title, ["set", "model", "stage", "cut range", "params", "MACs"], rows, right=("params", "MACs"))
    )
    relaxed = {k: v for k, v in data["effective_eps"].items() if v > data["eps"] + 1e-9}
    if relaxed:
        text = ", ".join(f"{k} {v:.2f}" for k, v in relaxed.items())
        console.print(f"size balance relaxed (eps {data['eps']} is infeasible for): {text}")


def render_assemble(console, data: dict[str, Any]) -> None:
    from .cli import _table, human

    rows = [
        [b["stage"], b["set"], b["model"], f"{b['cut_range'][0]} → {b['cut_range'][1]}", human(b["params"])]
        for b in data["chosen"]
    ]
    console.print(_table("chosen assembly", ["stage", "set", "model", "cut range", "params"], rows, right=("params",)))
    use = ", ".join(f"{k} {v:.0%}" for k, v in data["budget_use"].items())
    summary = [
        ["params / MACs", f"{human(data['params'])} / {human(data['macs'])}"],
        ["latency (ORT, batch 1)", f"{data['latency_ms']:.3f} ms"],
        ["budget use", use or "-"],
        ["surrogate / NASWOT", f"{data['surrogate']:.3f} / {data['naswot']:.2f}"],
        [
            "accuracy",
            f"{data['accuracy']:.2%} ({data['tune']} tuning; linear probe before: "
            f"{data['accuracy_before_tuning']:.2%})",
        ],
        ["ONNX parity", f"max |ORT - PyTorch| = {data['export']['max_abs_diff']:.3g}"],
        ["files", ", ".join(data["files"].values())],
    ]
    console.print(_table("assemble", ["", ""], summary))


def add_commands(commands, formatter: type[argparse.HelpFormatter], json_option) -> None:
    """Register ``partition`` and ``assemble`` on the ``zoocompile`` sub-parser set."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--zoo", default="demo", metavar="ZOO", help=ZOO_HELP)
        p.add_argument(
            "--data", default="mnist5k", metavar="DATA", help="task data: digits, mnist5k, npz:, imagefolder:"
        )
        p.add_argument("-K", dest="k", type=int, default=4, help="blocks per model = equivalence sets")
        p.add_argument("--eps", type=float, default=0.2, help="block size balance: |B| <= (1+eps)|M|/K")
        p.add_argument("--restarts", type=int, default=200, metavar="R", help="partition restarts (seeds)")
        p.add_argument("--size", choices=("params", "flops"), default="params", help="block size measure")
        p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for probes, restarts, tuning")
        p.add_argument("--cache-dir", metavar="DIR", help="similarity cache (default: the zoocompiler cache dir)")
        json_option(p)

    part = commands.add_parser(
        "partition",
        help="partition the zoo into K blocks per model and K equivalence sets (DeRy)",
        description="Compute the cut-point CKA similarity of every zoo model on probe images (cached), then "
        "partition each model into K blocks and group them into K equivalence sets.",
        epilog="example:\n  zoocompile partition --zoo demo -K 4 --eps 0.2 --restarts 200",
        formatter_class=formatter,
    )
    common(part)
    part.set_defaults(run=cmd_partition, render=render_partition)

    asm = commands.add_parser(
        "assemble",
        help="reassemble zoo blocks into a new model under a budget, tune it, export verified ONNX",
        description="Deep Model Reassembly: partition the zoo, pick one block per equivalence set and stage with "
        "an integer program under the budget (top-M with no-good cuts), re-rank by NASWOT on the stitched "
        "networks, stitch (least squares), tune and export ONNX with a report, a plan and plots.",
        epilog="examples:\n  zoocompile assemble --budget flops=5M --out out/asm\n"
        "  zoocompile assemble --zoo demo --data mnist5k --budget params=150k,flops=8M,latency=2ms "
        "--tune frozen --epochs 3 --out out/asm2",
        formatter_class=formatter,
    )
    asm.add_argument("--budget", required=True, help="params=N,flops=N[,latency=Tms] with k/M/G suffixes")
    asm.add_argument("--out", default="assembly", metavar="DIR", help="output directory (new, or --force)")
    asm.add_argument("--force", action="store_true", help="replace an existing --out directory")
    asm.add_argument("--top", type=int, default=20, metavar="M", help="ILP candidates to re-rank with NASWOT")
    asm.add_argument("--tune", choices=("frozen", "full", "none"), default="frozen", help="tuning protocol")
    asm.add_argument("--epochs", type=int, default=3, metavar="N", help="tuning epochs")
    common(asm)
    asm.set_defaults(run=cmd_assemble, render=render_assemble)
