"""``zoocompile prune`` (plan, prune physically, export) and ``zoocompile fuse`` (fold BatchNorm/affines, export).

Both check the rewritten model against a reference (the masked model, the unfused model); a difference
is a bug in the rewrite, reported as an internal error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoocompiler.core.atomic import check_out_dir, check_out_file, staged_dir
from zoocompiler.core.deploy import round_to_for
from zoocompiler.core.errors import ZooError
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.text import human
from zoocompiler.pipelines.base import write_report

from .common import (
    SPEC_HELP,
    deploy_data,
    deploy_from_args,
    deploy_options,
    json_option,
    load_model_and_input,
    model_options,
    out_dir_options,
    progress,
    render_deploy,
    table,
)

REWRITE_ATOL = 1e-4  # pruned vs masked, fused vs unfused: max |Δ| <= REWRITE_ATOL * max(1, |reference|)
PRUNE_FILES = ("plan.json", "model.onnx", "report.json")
# `zoocompile prune` prunes normalised token streams too (statistics over the kept units) and keeps ConvNeXt-style
# streams through depthwise convs whole: the verdicts of docs/bench_layernorm_default.md. The analysis API keeps
# "pin", the exact-masking semantics that slicing, modularize and pack train with.
DEFAULT_PRUNE_STREAMS = "auto"


def _max_abs_diff(a, b) -> tuple[float, float]:
    """``max|a - b|`` and ``max|b|`` of two model outputs (first tensor leaf each)."""
    from zoocompiler.exports.onnx_export import first_tensor

    ta, tb = first_tensor(a)[0].detach().double(), first_tensor(b)[0].detach().double()
    if ta.shape != tb.shape:
        raise RuntimeError(f"output shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return float((ta - tb).abs().max()), float(tb.abs().max())


def _check_equal(what: str, model, reference, x, atol: float = REWRITE_ATOL) -> float:
    """Run both modules on ``x``; a difference above ``atol * max(1, |reference|)`` is a bug (internal error)."""
    import torch

    with torch.no_grad():
        diff, scale = _max_abs_diff(model.eval()(x), reference.eval()(x))
    if not diff <= atol * max(1.0, scale):  # also catches NaN
        raise RuntimeError(f"{what}: max |Δ| = {diff:.3g} > {atol * max(1.0, scale):.3g}; this is a bug, please report")
    return diff


# ----------------------------------------------------------------------------- prune


def _check_ratio(ratio: float | None, plan_path: str | None) -> None:
    if ratio is None and plan_path is None:
        raise ZooError("prune needs --ratio or --plan", "pass --ratio R with 0 < R < 1, or --plan plan.json to replay")
    if ratio is not None and plan_path is not None:
        raise ZooError("prune got both --ratio and --plan", "pass --ratio to compute a plan or --plan to replay one")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ZooError(f"bad --ratio {ratio}", "pass a fraction of units to remove strictly between 0 and 1, e.g. 0.5")


def _plan_for(args: argparse.Namespace, gm):
    """The plan the command line asks for: replayed from ``--plan`` (validated) or computed by importance."""
    from zoocompiler.passes.analysis import plans

    if args.plan:
        plan = plans.Plan.load(args.plan)
        if args.strategy is not None:
            plan = plan.with_strategy(args.strategy)
        plans.validate_plan(gm, plan)
        return plan
    return plans.plan_by_importance(
        gm,
        args.ratio,
        importance=args.importance or "l1",
        round_to=args.round_to,
        strategy=args.strategy or "union",
        seed=args.seed,
        scope=_scope(args),
    )


def _why(reason: str) -> str:
    """`` (target cpu ...)`` after an implied --round-to; nothing after one the user typed."""
    return "" if reason == "--round-to" else f" ({reason})"


def _check_prunes_something(args: argparse.Namespace, gm, plan) -> None:
    """A computed plan that keeps every unit of every group would write an unpruned model: refuse it."""
    from zoocompiler.passes.analysis import plans

    groups = plans.groups_by_key(gm)
    sizes = {key: groups[key].size for key in plan.keep if key in groups}
    if any(len(keep) < sizes.get(key, 0) for key, keep in plan.keep.items()):
        return
    if any(len(kept) < sizes.get(key, 0) for key, per in plan.producer_keep.items() for kept in per.values()):
        return
    largest = max(sizes.values(), default=0)
    if not sizes:
        raise ZooError(f"{args.spec} has no prunable unit group: the plan prunes nothing", "prune another model")
    if args.round_to is not None and args.round_to >= largest:
        raise ZooError(
            f"--round-to {args.round_to}{_why(args.round_to_reason)} is not smaller than any prunable group "
            f"(the largest has {largest} units): the plan prunes nothing",
            f"pass a --round-to below {largest}, or drop it",
        )
    raise ZooError(
        f"--ratio {args.ratio} removes no unit from any group"
        + (f" with --round-to {args.round_to}" if args.round_to is not None else "")
        + ": the plan prunes nothing",
        "pass a larger --ratio" + (" or a smaller --round-to" if args.round_to is not None else ""),
    )


def _scope(args: argparse.Namespace) -> str:
    # not plan_by_importance's default ("producer"): the CLI ranks per group for union, like Torch-Pruning
    return args.scope or ("group" if (args.strategy or "union") == "union" else "producer")


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    _check_ratio(args.ratio, args.plan)
    if args.round_to is not None and args.round_to < 1:
        raise ZooError(f"bad --round-to {args.round_to}", "pass a positive channel multiple, e.g. --round-to 8")
    if args.plan and (args.importance is not None or args.round_to is not None or args.target is not None):
        raise ZooError(
            "--importance, --round-to and --target only apply when computing a plan", "drop them, or drop --plan"
        )
    if args.plan and not Path(args.plan).is_file():
        raise ZooError(f"plan file {args.plan} not found", "pass the plan.json written by an earlier zoocompile prune")
    out = Path(args.out)
    check_out_dir(out, args.force)
    options = deploy_from_args(args)
    if not args.plan:
        args.round_to, args.round_to_reason = round_to_for(options.precision, args.target, args.round_to)
    from zoocompiler.exports.deploy import export_deployable
    from zoocompiler.passes.analysis import run_analysis, trace
    from zoocompiler.passes.analysis.plans import Plan
    from zoocompiler.passes.rewrite.prune import masked_reference, prune

    ln_mode = args.layernorm_streams or (Plan.load(args.plan).meta.get("layernorm_streams") if args.plan else None)
    model, x = load_model_and_input(args)
    calibration, evaluation = deploy_data(args, x)
    gm = run_analysis(trace(model, x, analyze=False), layernorm_streams=ln_mode or DEFAULT_PRUNE_STREAMS)
    plan = _plan_for(args, gm)
    if not args.plan:
        _check_prunes_something(args, gm, plan)
    result = prune(gm, plan)
    masked_diff = _check_equal("pruned model vs masked reference", result.module, masked_reference(gm, plan), x)
    with staged_dir(out, args.force) as staging:
        plan.save(staging / "plan.json")
        deploy = export_deployable(result.module, x, staging / "model.onnx", options, calibration=calibration,
                                   evaluation=evaluation, progress=progress(args))
        deploy.path = str(out / "model.onnx")
        export = deploy.export
        if options.precision == "fp32":
            export.path = deploy.path
        report = {
            "spec": args.spec,
            "input_shape": list(x.shape),
            "plan": {
                "source": str(args.plan) if args.plan else "computed",
                "ratio": args.ratio,
                "importance": None if args.plan else args.importance or "l1",
                "strategy": plan.strategy,
                "round_to": args.round_to,
                "round_to_reason": None if args.plan else args.round_to_reason,
                "seed": None if args.plan else args.seed,
                "scope": None if args.plan else _scope(args),
            },
            "prune": jsonable(result.report.to_dict()),
            "masked_max_abs_diff": masked_diff,
            "export": jsonable(export),
            "deploy": jsonable(deploy.to_dict()),
            "files": {name: str(out / name) for name in PRUNE_FILES},
        }
        write_report(staging, report)
    return report


def _ratio_text(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{human(before)} → {human(after)} (×{after / before:.3f})"


def render_prune(console, data: dict[str, Any]) -> None:
    p, e, plan = data["prune"], data["export"], data["plan"]
    how = (
        f"replayed {plan['source']}"
        if plan["source"] != "computed"
        else f"ratio {plan['ratio']}, {plan['importance']} importance, {plan['strategy']}"
        + (f", round to {plan['round_to']} ({plan.get('round_to_reason')})" if plan["round_to"] else "")
    ) + (", LayerNorm streams pruned (statistics over kept units)" if p.get("layernorm_streams") == "prune" else "")
    rows = [
        ["plan", how],
        ["params", _ratio_text(p.get("params_before"), p.get("params_after"))],
        ["MACs", _ratio_text(p.get("macs_before"), p.get("macs_after"))],
    ]
    by_strategy = p.get("macs_by_strategy") or {}
    if by_strategy:
        rows.append(["MACs by strategy", ", ".join(f"{k} {human(v)}" for k, v in by_strategy.items())])
    rows += [
        ["pruned vs masked", f"max |Δ| = {data['masked_max_abs_diff']:.3g}"],
        ["ONNX parity", f"max |ORT - PyTorch| = {e['max_abs_diff']:.3g} (tolerance {e['tolerance']:.3g})"],
        ["files", ", ".join(data["files"].values())],
    ]
    shape = "×".join(map(str, data["input_shape"]))
    console.print(table(f"prune {data['spec']} (input {shape})", ["", ""], rows))
    render_deploy(console, data["deploy"])


# ----------------------------------------------------------------------------- fuse


def cmd_fuse(args: argparse.Namespace) -> dict[str, Any]:
    check_out_file(Path(args.out))
    options = deploy_from_args(args)
    from zoocompiler.exports.deploy import export_deployable
    from zoocompiler.passes.analysis import trace
    from zoocompiler.passes.rewrite.fuse import fuse, fuse_report

    model, x = load_model_and_input(args)
    calibration, evaluation = deploy_data(args, x)
    gm = trace(model, x)
    fused = fuse(gm, analyze=False)
    diff = _check_equal("fused model vs unfused model", fused, model, x)
    deploy = export_deployable(fused, x, args.out, options, calibration=calibration, evaluation=evaluation,
                               progress=progress(args))
    return {
        "spec": args.spec,
        "input_shape": list(x.shape),
        "fuse": jsonable(fuse_report(gm, fused).to_dict()),
        "fused_max_abs_diff": diff,
        "export": jsonable(deploy.export),
        "deploy": jsonable(deploy.to_dict()),
    }


def render_fuse(console, data: dict[str, Any]) -> None:
    f, e = data["fuse"], data["export"]
    rows = [
        ["graph nodes", f"{f['nodes_before']} → {f['nodes_after']}"],
        ["params", f"{human(f['params_before'])} → {human(f['params_after'])}"],
        [
            "folded",
            f"{f['batchnorms_folded']} BatchNorm, {f['affines_folded']} affine, {f['identities_removed']} identities",
        ],
        ["fused vs unfused", f"max |Δ| = {data['fused_max_abs_diff']:.3g}"],
        ["file", f"{data['deploy']['path']} ({e['onnx_nodes']} ONNX nodes in fp32)"],
        ["ONNX parity", f"fp32: max |ORT - PyTorch| = {e['max_abs_diff']:.3g} (tolerance {e['tolerance']:.3g})"],
    ]
    if f.get("note"):
        rows.append(["note", f["note"]])
    shape = "×".join(map(str, data["input_shape"]))
    console.print(table(f"fuse {data['spec']} (input {shape})", ["", ""], rows))
    render_deploy(console, data["deploy"])


# ----------------------------------------------------------------------------- parser


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``prune`` and ``fuse`` to the ``zoocompile`` sub-parser set."""
    prune_cmd = commands.add_parser(
        "prune",
        help="prune channels/features/heads physically, export the smaller model to ONNX",
        description="Compute (or replay) a pruning plan, prune the model physically, check it against the masked "
        "reference and ONNX Runtime, and write DIR/plan.json, DIR/model.onnx and DIR/report.json "
        "(all or nothing).",
        epilog="examples:\n"
        "  zoocompile prune torchvision:resnet18 --input-shape 3,32,32 --ratio 0.5 --out r18_half\n"
        "  zoocompile prune torchvision:resnet18 --input-shape 3,32,32 --plan r18_half/plan.json --out r18_again",
    )
    prune_cmd.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    out_dir_options(prune_cmd, required=True, help="directory to write (new, or --force)")
    prune_cmd.add_argument("--ratio", type=float, metavar="R", help="fraction of units to remove per group, 0 < R < 1")
    prune_cmd.add_argument("--plan", metavar="FILE", help="replay this plan.json instead of computing one")
    # --importance, --strategy, --scope, --layernorm-streams default to None: "not given" matters with --plan
    prune_cmd.add_argument(
        "--importance", choices=("l1", "l2", "random"), help="unit importance that picks what stays (default: l1)"
    )
    prune_cmd.add_argument(
        "--strategy",
        choices=("union", "intersection", "pad"),
        help="groups with several producers (residual adds, SE muls): every producer keeps the union, the "
        "intersection, or its own units padded into the union (default: union; with --plan: the plan's)",
    )
    prune_cmd.add_argument(
        "--round-to", type=int, metavar="N",
        help="keep unit counts multiples of N (default: from --target: 8 gpu, 16 cpu, none for any)",
    )
    prune_cmd.add_argument(
        "--scope",
        choices=("group", "producer"),
        help="rank units per group (every producer of a residual stream keeps the same units, like Torch-Pruning) "
        "or per producer (each keeps its own top units; the strategies then differ) "
        "(default: group for union, producer for intersection/pad)",
    )
    prune_cmd.add_argument("--seed", type=int, default=0, metavar="N", help="seed for --importance random")
    prune_cmd.add_argument(
        "--layernorm-streams",
        choices=("pin", "prune", "auto"),
        help="residual streams a LayerNorm, RMSNorm or mean/var reduction normalises over: keep them whole, "
        "prune them too (the pruned norms then compute their statistics over the kept units only), or auto: "
        "prune token streams, keep ConvNeXt-style streams through depthwise convs whole (measured in "
        "docs/bench_layernorm_default.md) (default: auto; with --plan: the plan's)",
    )
    deploy_options(prune_cmd, data=True, target=True)
    model_options(prune_cmd)
    json_option(prune_cmd)
    prune_cmd.set_defaults(run=cmd_prune, render=render_prune)

    fuse_cmd = commands.add_parser(
        "fuse",
        help="fold BatchNorm and consecutive affine maps, export the fused model to ONNX",
        description="Fuse conv/linear + BatchNorm and consecutive affine maps, drop identities, check the fused "
        "model against the unfused one and ONNX Runtime, and write the ONNX file.",
        epilog="example:\n  zoocompile fuse torchvision:resnet18 --input-shape 3,32,32 --out resnet18_fused.onnx",
    )
    fuse_cmd.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    fuse_cmd.add_argument("--out", required=True, metavar="FILE", help="where to write the fused .onnx model")
    deploy_options(fuse_cmd, data=True)
    model_options(fuse_cmd)
    json_option(fuse_cmd)
    fuse_cmd.set_defaults(run=cmd_fuse, render=render_fuse)
