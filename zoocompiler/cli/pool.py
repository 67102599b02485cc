"""``zoocompile pool distill | finetune | build | list``: Learngene Pool (paper 002) on the command line.

``pool distill`` builds a ``PoolDistillConfig`` and distils an ancestry into a pool directory; ``pool finetune``
builds a ``PoolFinetuneConfig`` and fine-tunes a pool (in place, atomically, or into ``--out``); ``pool build``
builds a ``PoolBuildConfig``, measures every descendant and exports the most accurate one within a budget;
``pool list`` shows what a pool directory holds. Options default to the configs' field defaults. Every
command prints standard JSON with ``--json`` (NaN → null); training shows progress bars on stderr (none
with ``--json``). A bad option, ancestry, pool directory or budget is a one-line error, and an output
directory appears all or nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoocompiler.core.budget import Budget
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.text import human

from ..pipelines.pool.config import INITS, PoolBuildConfig, PoolDistillConfig, PoolFinetuneConfig
from .common import (
    check_at_least,
    config_from_args,
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
    training_options,
    workers_options,
    written_files,
)

DISTILL_CONFIG, FINETUNE_CONFIG, BUILD_CONFIG = PoolDistillConfig, PoolFinetuneConfig, PoolBuildConfig


# ----------------------------------------------------------------------------- pool distill


def distill_config(args: argparse.Namespace) -> PoolDistillConfig:
    """The ``PoolDistillConfig`` the command line asks for (training bars unless ``--json``), checked."""
    check_at_least(args, 0, "seed")
    config = config_from_args(PoolDistillConfig, args, progress=not args.json)
    config.check()
    return config


def cmd_pool_distill(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pool.pipeline import distill_pool

    config = distill_config(args)
    out = Path(args.out)
    doc = distill_pool(config, out, force=args.force, progress=progress(args), executor=executor_from_args(args))
    return jsonable({"out": str(out), **doc, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- pool finetune


def finetune_config(args: argparse.Namespace) -> PoolFinetuneConfig:
    """The ``PoolFinetuneConfig`` the command line asks for (training bars unless ``--json``), checked."""
    check_at_least(args, 0, "seed")
    config = config_from_args(PoolFinetuneConfig, args, kd=not args.no_kd, progress=not args.json)
    config.check()
    return config


def cmd_pool_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pool.pipeline import finetune_pool

    config = finetune_config(args)
    directory = Path(args.dir)
    out = Path(args.out) if args.out is not None else directory
    in_place = out.resolve() == directory.resolve()
    executor_from_args(args)  # joins the cluster (--executor ray=ADDRESS) the --workers run on
    doc = finetune_pool(directory, config, out=None if in_place else out, force=args.force,
                        trust_code=args.trust_code, allow_pickle=args.allow_pickle, progress=progress(args),
                        workers=args.workers)
    return jsonable({"out": str(out), "in_place": in_place, **doc, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- pool build


def build_config(args: argparse.Namespace) -> PoolBuildConfig:
    """The ``PoolBuildConfig`` the command line asks for, checked (a malformed ``--budget`` fails here)."""
    config_from_args(PoolBuildConfig, args).check()  # its own options first: --runs/--threads name themselves
    config = config_from_args(PoolBuildConfig, args, deploy=deploy_from_args(args))
    config.check()
    return config


def cmd_pool_build(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pool.pipeline import build_from_pool

    config = build_config(args)
    out = Path(args.out)
    report = build_from_pool(Path(args.dir), config, out, force=args.force, progress=progress(args),
                             executor=executor_from_args(args))
    settings = {"runs": config.runs, "batch": config.batch, "threads": config.threads, "all": config.export_all}
    return jsonable({"out": str(out), **report, "settings": settings, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- pool list


def cmd_pool_list(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pool.pipeline import list_pool

    return jsonable(list_pool(Path(args.dir)), finite=True)


# ----------------------------------------------------------------------------- rendering


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _descendants(title: str, rows: list[dict[str, Any]], *, before: list[dict[str, Any]] | None = None,
                 chosen: dict[str, Any] | None = None, batch: int | None = None, precision: str = "fp32"):
    """The descendant table: low, high, params, MACs, accuracy (and, when given, the accuracy before
    fine-tuning, the latency and the chosen descendant; with ``batch``, the written files' ``precision``:
    their latency, and, unless fp32, their own accuracy and its change against fp32)."""
    columns = ["low", "high", "params", "MACs", "accuracy"]
    earlier = {r["low"]: r.get("accuracy") for r in before or []}
    if before:
        columns.append("before fine-tuning")
    lowered = batch is not None and precision != "fp32"
    if batch is not None:
        columns += [f"latency b{batch} (ms)", "ONNX parity (fp32)"]
    if lowered:
        columns += [f"{precision} accuracy", "vs fp32"]
    if chosen is not None:
        columns.append("chosen")
    table_rows = []
    for r in rows:
        row = [r["low"], r["high"], human(r["params"]), human(r["macs"]), _accuracy(r.get("accuracy"))]
        if before:
            row.append(_accuracy(earlier.get(r["low"])))
        if batch is not None:
            latency = r.get("latency_ms")
            diff = r.get("onnx_max_abs_diff")
            row += ["-" if latency is None else f"{latency:.3f}", "-" if diff is None else f"{diff:.2g}"]
        if lowered:
            written = r.get("deploy") or {}
            change = written.get("accuracy_change")
            row += [_accuracy(written.get("accuracy")), "-" if change is None else f"{100 * change:+.1f} pp"]
        if chosen is not None:
            row.append("◀ chosen" if r["low"] == chosen["low"] else "")
        table_rows.append(row)
    return table(title, columns, table_rows, right=[c for c in columns if c not in ("chosen",)])


def _storage(storage: dict[str, int] | None, ancestry_params: int | None = None):
    if not storage:
        return table("storage", ["", "params"], [["-", "-"]])
    total = human(storage["total"])
    if ancestry_params:
        total += f" ({storage['total'] / ancestry_params:.0%} of the ancestry's)"
    rows = [["small row", human(storage["small"])], ["large row", human(storage["large"])],
            ["stitches", human(storage["stitches"])], ["total", total]]
    return table("storage (parameters the pool keeps)", ["", "params"], rows, right=["params"])


def _shape_text(shape: dict[str, Any]) -> str:
    head = shape["embed_dim"] // shape["num_heads"]
    return (f"{shape['depth']} blocks at d={shape['embed_dim']} ({shape['num_heads']} head(s) of {head}, "
            f"MLP ratio {shape['mlp_ratio']:g})")


def _pool_summary(data: dict[str, Any]) -> list[list[str]]:
    """Ancestry, rows, levels, stitch init, data and fine-tuning of a pool document."""
    ancestry = data["ancestry"]
    start = ancestry.get("checkpoint") or "the spec's weights"
    measures = f"{human(ancestry.get('params'))} params, {human(ancestry.get('macs'))} MACs"
    if ancestry.get("accuracy") is not None:
        measures += f", test accuracy {_accuracy(ancestry['accuracy'])}"
    levels = data.get("levels") or {}
    rows = [
        ["ancestry", f"{ancestry['spec']} ({start})"],
        ["ancestry shape", f"{_shape_text(ancestry['shape'])}; {measures}"],
        ["small row", _shape_text(data["rows"]["small"])
         + (f", levels {levels['small']}" if levels.get("small") else "")],
        ["large row", _shape_text(data["rows"]["large"])
         + (f", levels {levels['large']}" if levels.get("large") else "")],
        ["stitch init", str(data.get("init"))],
    ]
    if data.get("data"):
        rows.append(["data", str(data["data"])])
    for row, info in (data.get("distill") or {}).items():
        rows.append([f"distill {row}", f"{info['seconds']:.1f} s, test accuracy {_accuracy(info.get('accuracy'))}"])
    tuned = data.get("finetune")
    if tuned:
        sampled = ", ".join(f"low {k}: {v}" for k, v in (tuned.get("paths_sampled") or {}).items())
        rows.append(["fine-tuning", f"{tuned['epochs']} epoch(s) in all, lr {tuned['lr']:g}, batch "
                                    f"{tuned['batch_size']}, {'KD from the ancestry' if tuned['kd'] else 'no KD'} "
                                    f"(tau {tuned['tau']:g}), {tuned['seconds']:.1f} s; paths sampled: {sampled}"])
    else:
        rows.append(["fine-tuning", "not fine-tuned"])
    return rows


def render_pool_distill(console, data: dict[str, Any]) -> None:
    title = f"pool distill: {len(data['descendants'])} descendants → {data['out']}"
    console.print(_descendants(title, data["descendants"]))
    console.print(_storage(data.get("storage"), data["ancestry"].get("params")))
    summary = [*_pool_summary(data), ["files", ", ".join(data["files"].values())]]
    console.print(table("", ["", ""], summary))


def render_pool_finetune(console, data: dict[str, Any]) -> None:
    where = "in place" if data["in_place"] else f"→ {data['out']}"
    title = f"pool finetune: {len(data['descendants'])} descendants {where}"
    console.print(_descendants(title, data["descendants"], before=data.get("descendants_before_finetune")))
    console.print(_storage(data.get("storage"), data["ancestry"].get("params")))
    summary = [*_pool_summary(data), ["files", ", ".join(data["files"].values())]]
    console.print(table("", ["", ""], summary))


def render_pool_build(console, data: dict[str, Any]) -> None:
    settings, chosen = data["settings"], data["chosen"]
    title = f"pool build: {len(data['descendants'])} descendants of {data['pool']} → {data['out']}"
    title += f" ({data.get('precision', 'fp32')} ONNX)"
    precision = data.get("precision", "fp32")
    console.print(_descendants(title, data["descendants"], chosen=chosen, batch=settings["batch"],
                               precision=precision))
    console.print(_storage(data.get("storage")))
    budget = str(Budget(**data["budget"])) if data["budget"] else ""
    latency = chosen.get("latency_ms")
    summary = [
        ["budget", budget or "unconstrained (the most accurate descendant)"],
        ["chosen", f"low={chosen['low']}, high={chosen['high']}: {human(chosen['params'])} params, "
                   f"{human(chosen['macs'])} MACs, test accuracy {_accuracy(chosen.get('accuracy'))}, latency "
                   + ("-" if latency is None else f"{latency:.3f} ms")],
        ["timing", f"ONNX Runtime, median of {settings['runs']} runs at batch {settings['batch']}, "
                   f"{settings['threads']} thread(s)"],
        ["ONNX", f"{Path(data['out']) / data['onnx']} ({precision})"],
    ]
    if data.get("all"):
        folder = Path(data["out"]) / data["all"]
        summary.append(["every descendant", f"{folder} (serve: ElasticModel.from_manifest('{folder}'))"])
    summary.append(["files", ", ".join(data["files"].values())])
    console.print(table("", ["", ""], summary))
    deploy = data.get("deploy")
    if deploy:  # its path is relative to OUT, like "onnx"
        render_deploy(console, {**deploy, "path": str(Path(data["out"]) / deploy["path"])},
                      f"chosen descendant (low={chosen['low']}, high={chosen['high']})")


def render_pool_list(console, data: dict[str, Any]) -> None:
    title = f"pool {data['pool']}: {len(data['descendants'])} descendants"
    console.print(_descendants(title, data["descendants"], before=data.get("descendants_before_finetune")))
    console.print(_storage(data.get("storage"), data["ancestry"].get("params")))
    console.print(table("", ["", ""], [*_pool_summary(data), ["format", data["format"]]]))


# ----------------------------------------------------------------------------- parser


def _pool_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a pool directory written by `zoocompile pool distill --out DIR`")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``pool distill``, ``finetune``, ``build`` and ``list`` to the ``zoocompile`` sub-parser set."""
    pool = commands.add_parser(
        "pool",
        help="learngene pool: distil one transformer into a pool of blocks, build descendants of many sizes",
        description="Learngene Pool (paper 002): distil an ancestry transformer into two smaller auxiliary models "
        "(full and reduced width), pool their blocks as learngene instances joined by stitch layers, fine-tune "
        "the pool, and build the most accurate descendant within a params/FLOPs/latency budget.",
    )
    actions = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)

    distill = actions.add_parser(
        "distill",
        help="distil an ancestry into a pool directory (two auxiliary rows, stitches, every descendant evaluated)",
        description="Load the ancestry SPEC (a uniform stack of timm ViT blocks), distil it into an auxiliary "
        "model of --blocks blocks at its own width and one at --dim (Eq. 8, dense distillation), pool their "
        "blocks, initialise the stitch layers (--init), evaluate every descendant on the test split and write "
        "DIR/pool.json, DIR/instances.safetensors and DIR/transforms.safetensors (all or nothing).",
        epilog="examples:\n"
        "  zoocompile pool distill --blocks 6 --dim 48 --epochs 20 --out out/pool6\n"
        "  zoocompile pool distill timm:deit_base_patch16_224 --checkpoint deit_b.pth --data imagefolder:IMGS "
        "--out deit_pool\n"
        "  zoocompile pool distill --init ls --levels 2 --epochs 5 --out out/pool_ls --json",
    )
    training_options(distill, DISTILL_CONFIG, min_batch=2, from_scratch=False,
                     spec_help="the ancestry: a timm VisionTransformer spec, e.g. timm:deit_base_patch16_224 "
                     "(default: %(default)s)")
    distill.add_argument(
        "--blocks",
        type=int,
        default=default_of(DISTILL_CONFIG, "blocks"),
        metavar="N",
        help="blocks l of each auxiliary model, below the ancestry's depth (default: half of it)",
    )
    distill.add_argument(
        "--dim",
        type=int,
        default=default_of(DISTILL_CONFIG, "dim"),
        metavar="N",
        help="width d' of the narrow row, a multiple of the ancestry's head width (default: a quarter of its width)",
    )
    distill.add_argument(
        "--levels",
        type=int,
        default=default_of(DISTILL_CONFIG, "levels"),
        metavar="N",
        help="dense-distillation levels of the narrow row, 1..--blocks (default: 3, or --blocks if fewer)",
    )
    distill.add_argument(
        "--wide-levels",
        type=int,
        default=default_of(DISTILL_CONFIG, "wide_levels"),
        metavar="N",
        help="dense-distillation levels of the full-width row, 1..--blocks (default: 3, or --blocks if fewer)",
    )
    distill.add_argument(
        "--alpha",
        type=float,
        default=default_of(DISTILL_CONFIG, "alpha"),
        metavar="A",
        help="weight of the hard-label loss in Eq. 8, in [0, 1]",
    )
    distill.add_argument(
        "--tau", type=float, default=default_of(DISTILL_CONFIG, "tau"), metavar="T", help="distillation temperature"
    )
    distill.add_argument(
        "--init",
        default=default_of(DISTILL_CONFIG, "init"),
        metavar="|".join(INITS),
        help="stitch initialisation: ls (least squares on --probe images; measured best), tm (mean of the "
        "distillation's maps, the paper's) or random",
    )
    distill.add_argument(
        "--probe",
        type=int,
        default=default_of(DISTILL_CONFIG, "probe"),
        metavar="N",
        help="training images the ls init fits the stitches on",
    )
    distill.add_argument(
        "--seed",
        type=int,
        default=default_of(DISTILL_CONFIG, "seed"),
        metavar="N",
        help="seed of the auxiliary models, data order and stitches",
    )
    out_dir_options(distill, required=True, help="the pool directory (new, or --force)")
    executor_options(distill, latency=False)
    json_option(distill)
    distill.set_defaults(run=cmd_pool_distill, render=render_pool_distill)

    finetune = actions.add_parser(
        "finetune",
        help="fine-tune a pool: one randomly sampled descendant per step, with the ancestry as teacher",
        description="Reload the pool DIR and its ancestry (its weights checked against the digest taken at "
        "distillation), train one uniformly sampled path per step on CE + soft CE from the ancestry (Algorithm 1), "
        "re-evaluate every descendant and write the pool: DIR itself, replaced atomically, or --out.",
        epilog="examples:\n"
        "  zoocompile pool finetune out/pool6 --epochs 10\n"
        "  zoocompile pool finetune out/pool6 --no-kd --epochs 5 --out out/pool6_nokd --json",
    )
    _pool_argument(finetune)
    finetune.add_argument(
        "--epochs", type=int, default=default_of(FINETUNE_CONFIG, "epochs"), metavar="N", help="fine-tuning epochs"
    )
    finetune.add_argument(
        "--lr", type=float, default=default_of(FINETUNE_CONFIG, "lr"), help="peak learning rate (AdamW, one-cycle)"
    )
    finetune.add_argument(
        "--batch-size",
        type=int,
        default=default_of(FINETUNE_CONFIG, "batch_size"),
        metavar="N",
        help="training batch size (>= 2)",
    )
    finetune.add_argument(
        "--no-kd", action="store_true", help="train on the labels only, without the ancestry as teacher"
    )
    finetune.add_argument(
        "--tau", type=float, default=default_of(FINETUNE_CONFIG, "tau"), metavar="T", help="distillation temperature"
    )
    finetune.add_argument(
        "--seed",
        type=int,
        default=default_of(FINETUNE_CONFIG, "seed"),
        metavar="N",
        help="seed of the data order and the sampled paths",
    )
    workers_options(finetune)
    finetune.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a python: ancestry spec in DIR/pool.json (imports and runs its code: only for pools you "
        "distilled yourself)",
    )
    finetune.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow an ancestry checkpoint that contains pickled Python objects (runs their code: only for trusted "
        "files)",
    )
    out_dir_options(finetune, metavar="OUT", help="write the fine-tuned pool here (default: replace DIR in place, "
                    "atomically; new, or --force)")
    json_option(finetune)
    finetune.set_defaults(run=cmd_pool_finetune, render=render_pool_finetune)

    build = actions.add_parser(
        "build",
        help="measure every descendant and export the most accurate one within a params/FLOPs/latency budget",
        description="Rebuild every descendant of the pool DIR, evaluate it, export it to ONNX (parity-checked) and "
        "time it in ONNX Runtime at --precision; write the most accurate one within --budget (ties: fewer params) "
        "as OUT/descendant.onnx, with OUT/report.json and OUT/descendants.png; --all also keeps every descendant's "
        "ONNX with a manifest for the elastic runtime in OUT/descendants (all or nothing).",
        epilog="examples:\n"
        "  zoocompile pool build out/pool6 --budget params=1M,latency=0.5ms --out out/pool6_1M\n"
        "  zoocompile pool build out/pool6 --all --out out/pool6_all --json\n"
        "  zoocompile pool build out/pool6 --budget flops=20M --precision int8 --out out/pool6_int8",
    )
    _pool_argument(build)
    build.add_argument(
        "--budget",
        default=default_of(BUILD_CONFIG, "budget"),
        metavar="BUDGET",
        help="upper bounds, e.g. params=1.5M,flops=60M,latency=2ms (flops = MACs; default: none, the most "
        "accurate descendant)",
    )
    build.add_argument(
        "--all",
        dest="export_all",
        action="store_true",
        help="also keep every descendant's ONNX and an elastic-runtime manifest in OUT/descendants",
    )
    build.add_argument(
        "--runs",
        type=int,
        default=default_of(BUILD_CONFIG, "runs"),
        metavar="N",
        help="timed ONNX Runtime runs per descendant (the median is kept), and per cell of the latency table",
    )
    build.add_argument(
        "--batch", type=int, default=default_of(BUILD_CONFIG, "batch"), metavar="N", help="batch size of the timing"
    )
    build.add_argument(
        "--threads",
        type=int,
        default=default_of(BUILD_CONFIG, "threads"),
        metavar="N",
        help="ONNX Runtime intra-op threads of the timing and of the latency table",
    )
    out_dir_options(build, required=True, metavar="OUT")
    json_option(build)
    # every descendant's ONNX at --precision (int8 calibrated on the training split of the pool's data); --runs
    # and --threads also serve the chosen descendant's latency table
    executor_options(build)
    deploy_options(build)
    build.set_defaults(run=cmd_pool_build, render=render_pool_build)

    list_ = actions.add_parser(
        "list",
        help="what a pool directory holds: ancestry, rows, storage, fine-tuning, descendants",
        description="Read the pool DIR, check its format and each weights file by its sha256, and show its "
        "ancestry, both rows, the distilled levels, storage, the fine-tuning settings and the descendant table "
        "(before and after fine-tuning).",
        epilog="examples:\n  zoocompile pool list out/pool6\n  zoocompile pool list out/pool6 --json",
    )
    _pool_argument(list_)
    json_option(list_)
    list_.set_defaults(run=cmd_pool_list, render=render_pool_list)
