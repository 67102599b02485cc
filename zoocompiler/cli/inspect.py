"""``zoocompile inspect`` (one model, or ``--zoo demo``) and ``zoocompile export`` (ONNX + latency)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoocompiler.core.atomic import check_out_file
from zoocompiler.core.errors import ZooError
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.text import human

from .common import (
    EXAMPLE_SEED,
    SPEC_HELP,
    chosen_latency,
    classes_text,
    deploy_data,
    deploy_from_args,
    deploy_options,
    json_option,
    load_model_and_input,
    model_options,
    progress,
    render_deploy,
    table,
)

MEMBER_NAMES_SHOWN = 3


# ----------------------------------------------------------------------------- inspect


def _params(model) -> int:
    from zoocompiler.core.modules import count_params

    return count_params(model)


def _macs(gm) -> int:
    from zoocompiler.ir import node_info

    return sum(info.cost.macs for n in gm.graph.nodes if (info := node_info(n)).cost is not None)


def _summarise_reasons(reasons: list[str]) -> list[str]:
    """Collapse reasons that differ only in the node they name: 'X (node a)', 'X (node b)' → 'X (2 nodes: a, b)'."""
    by_text: dict[str, list[str]] = {}
    for reason in reasons:
        text, sep, node = reason.rpartition(" (node ")
        key, name = (text, node.rstrip(")")) if sep else (reason, "")
        by_text.setdefault(key, []).append(name)
    out = []
    for text, names in by_text.items():
        names = [n for n in names if n]
        if len(names) > 1:
            out.append(f"{text} ({len(names)} nodes: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        else:
            out.append(f"{text} (node {names[0]})" if names else text)
    return out


def _group_row(group) -> dict[str, Any]:
    nodes = list(dict.fromkeys(member.node for member in group.members))
    params = [
        {"param": m.param, "dim": m.dim, "per_unit": len(m.indices[0]) if m.indices else 0, "role": m.role}
        for m in group.members
        if m.param is not None
    ]
    return {
        "id": group.gid,
        "kind": group.kind,
        "size": group.size,
        "members": len(group.members),
        "member_nodes": nodes,
        "prunable": group.prunable,
        "reasons": list(group.reasons),
        "reason_summary": _summarise_reasons(list(group.reasons)),
        "param_slices": params,
        "divisible_by": list(group.divisible_by),
    }


def inspect_graph(gm, model, spec: str) -> dict[str, Any]:
    """Summary, cut-point rows and unit-group rows of a traced, analysed GraphModule."""
    from zoocompiler.ir import graph_info
    from zoocompiler.passes.analysis.cut_points import cut_point_table

    info = graph_info(gm)
    groups = [_group_row(g) for g in info.unit_groups]
    example = info.example_input
    summary = {
        "spec": spec,
        "input_shape": list(example.shape) if example is not None else None,
        "tracer": info.tracer,
        "nodes": len(gm.graph.nodes),
        "params": _params(model),
        "macs": _macs(gm),
        "cut_points": len(info.cut_points),
        "groups": len(groups),
        "prunable_groups": sum(g["prunable"] for g in groups),
        "pinned_groups": sum(not g["prunable"] for g in groups),
    }
    cut_points = [
        {
            "index": row.index,
            "node": row.node,
            "layout": row.tensor.layout if row.tensor else None,
            "shape": list(row.tensor.shape) if row.tensor else None,
            "tensor": row.tensor.describe() if row.tensor else "-",
            "cum_params": row.cum_params,
            "cum_macs": row.cum_macs,
        }
        for row in cut_point_table(gm)
    ]
    return {"summary": summary, "cut_points": cut_points, "unit_groups": groups}


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    if args.zoo and args.spec:
        raise ZooError("inspect got both a model SPEC and --zoo", "pass one of them")
    if args.zoo:
        return inspect_zoo(args.zoo)
    if not args.spec:
        raise ZooError("inspect needs a model", "pass a SPEC (e.g. torchvision:resnet18) or --zoo demo")
    from zoocompiler.passes.analysis import trace

    model, x = load_model_and_input(args)
    return inspect_graph(trace(model, x), model, args.spec)


def inspect_zoo(zoo: str) -> dict[str, Any]:
    """One row per demo-zoo model: entry facts plus params, MACs, cut points and prunable groups."""
    import torch

    from zoocompiler.passes.analysis import trace
    from zoocompiler.sources import load_model
    from zoocompiler.zoo import list_entries

    if zoo != "demo":
        raise ZooError(f"unknown zoo '{zoo}'", "use --zoo demo (the built-in zoo)")
    rows = []
    for entry in list_entries("demo"):
        model = load_model(f"zoo:{entry.name}")
        x = torch.randn(1, *entry.input_shape, generator=torch.Generator().manual_seed(EXAMPLE_SEED))
        summary = inspect_graph(trace(model, x), model, f"zoo:{entry.name}")["summary"]
        rows.append(
            {
                "name": entry.name,
                "arch": entry.spec,
                "dataset": entry.dataset,
                "classes": jsonable(entry.classes),
                "input_shape": list(entry.input_shape),
                "test_accuracy": entry.test_accuracy,
                "params": summary["params"],
                "macs": summary["macs"],
                "cut_points": summary["cut_points"],
                "groups": summary["groups"],
                "prunable_groups": summary["prunable_groups"],
            }
        )
    return {"zoo": zoo, "models": rows}


def render_inspect(console, data: dict[str, Any]) -> None:
    if "models" in data:
        render_zoo_summary(console, data)
        return
    s = data["summary"]
    console.print(
        table(
            f"{s['spec']}",
            ["input", "tracer", "nodes", "params", "MACs", "cut points", "groups (prunable/pinned)"],
            [
                [
                    "×".join(map(str, s["input_shape"] or [])),
                    s["tracer"],
                    s["nodes"],
                    human(s["params"]),
                    human(s["macs"]),
                    s["cut_points"],
                    f"{s['groups']} ({s['prunable_groups']}/{s['pinned_groups']})",
                ]
            ],
        )
    )
    console.print(
        table(
            "cut points",
            ["#", "node", "value", "cum params", "cum MACs"],
            [
                [r["index"], r["node"], r["tensor"], human(r["cum_params"]), human(r["cum_macs"])]
                for r in data["cut_points"]
            ],
            right=("#", "cum params", "cum MACs"),
        )
    )
    rows = []
    for g in data["unit_groups"]:
        slices = [f"{p['param']}[{p['dim']}]×{p['per_unit']}" for p in g["param_slices"]]
        shown = slices or g["member_nodes"]
        names = ", ".join(shown[:MEMBER_NAMES_SHOWN])
        more = len(shown) - MEMBER_NAMES_SHOWN
        status = "prunable" if g["prunable"] else "pinned: " + "; ".join(g["reason_summary"])
        divisible = ",".join(map(str, g["divisible_by"])) or "-"
        rows.append(
            [g["id"], g["kind"], g["size"], g["members"], names + (f" +{more}" if more > 0 else ""), status, divisible]
        )
    console.print(
        table(
            "unit groups",
            ["id", "kind", "size", "members", "parameter slices per unit (or nodes)", "status", "divisible by"],
            rows,
            right=("id", "size", "members"),
        )
    )


def render_zoo_summary(console, data: dict[str, Any]) -> None:
    rows = [
        [
            m["name"],
            m["arch"],
            m["dataset"],
            classes_text(m["classes"]),
            "-" if m["test_accuracy"] is None else f"{m['test_accuracy']:.3f}",
            human(m["params"]),
            human(m["macs"]),
            m["cut_points"],
            f"{m['prunable_groups']}/{m['groups']}",
        ]
        for m in data["models"]
    ]
    columns = ["name", "arch", "dataset", "classes", "test acc", "params", "MACs", "cut points", "prunable groups"]
    console.print(table(f"{data['zoo']} zoo", columns, rows, right=columns[4:]))


# ----------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.tracing import check_input

    check_out_file(Path(args.out))  # before the slow load and export
    if args.runs < 0:
        raise ZooError(f"bad --runs {args.runs}", "pass 0 (no timing) or a positive number of timed runs")
    if args.threads < 0:
        raise ZooError(f"bad --threads {args.threads}", "pass 1, or 0 for ONNX Runtime's default")
    if args.fp16 and args.precision not in ("fp32", "fp16"):
        raise ZooError(f"--fp16 contradicts --precision {args.precision}", "pass one of them")
    if args.fp16:
        args.precision = "fp16"
    options = deploy_from_args(args)
    model, x = load_model_and_input(args)
    check_input(model, x)  # a shape the model rejects is a one-line InputShapeError, not an exporter trace
    calibration, evaluation = deploy_data(args, x)
    from zoocompiler.exports.deploy import export_deployable

    deploy = export_deployable(model, x, args.out, options, calibration=calibration, evaluation=evaluation,
                               progress=progress(args))
    report = jsonable(deploy.to_dict())
    return {
        "spec": args.spec,
        "input_shape": list(x.shape),
        "export": report["export"],
        "deploy": report,
        "latency": chosen_latency(report),
    }


def render_export(console, data: dict[str, Any]) -> None:
    e, d = data["export"], data["deploy"]
    rows = [
        ["file", f"{d['path']} ({d['file_bytes'] / 1e6:.2f} MB, {d['precision']})"],
        ["exporter", f"{e['exporter']}, opset {e['opset']}, {e['onnx_nodes']} nodes in fp32"],
        ["fp32 parity", f"max |ORT - PyTorch| = {e['max_abs_diff']:.3g} (tolerance {e['tolerance']:.3g})"],
        ["batch", "dynamic" if e["dynamic_batch"] else "fixed"],
    ]
    if e.get("output_note"):
        rows.append(["output", e["output_note"]])
    shape = "×".join(map(str, data["input_shape"]))
    console.print(table(f"export {data['spec']} (input {shape})", ["", ""], rows))
    render_deploy(console, d)


# ----------------------------------------------------------------------------- parser


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``inspect`` and ``export`` to the ``zoocompile`` sub-parser set."""
    inspect = commands.add_parser(
        "inspect",
        help="trace a model and show its summary, cut points and unit groups",
        description="Trace a model and show its summary, cut points and unit groups; "
        "or, with --zoo demo, one summary row per demo-zoo model.",
        epilog="examples:\n"
        "  zoocompile inspect torchvision:resnet18 --input-shape 3,32,32\n"
        "  zoocompile inspect --zoo demo",
    )
    inspect.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP)
    inspect.add_argument("--zoo", metavar="NAME", help="summarise every model of a zoo instead of one SPEC ('demo')")
    model_options(inspect)
    json_option(inspect)
    inspect.set_defaults(run=cmd_inspect, render=render_inspect)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX, check it against PyTorch, measure ONNX Runtime latency",
        description="Export a model to ONNX, check ONNX Runtime's output against PyTorch and measure latency.",
        epilog="example:\n  zoocompile export torchvision:resnet18 --input-shape 3,32,32 --out resnet18.onnx",
    )
    export.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    export.add_argument("--out", required=True, metavar="FILE", help="where to write the .onnx model")
    export.add_argument("--fp16", action="store_true", help="the same as --precision fp16")
    export.add_argument(
        "--runs", type=int, default=20, metavar="N", help="timed ONNX Runtime runs per latency cell (0: no timing)"
    )
    export.add_argument(
        "--threads", type=int, default=1, metavar="N", help="ONNX Runtime intra-op threads (0: ONNX Runtime's default)"
    )
    deploy_options(export, data=True)
    model_options(export)
    json_option(export)
    export.set_defaults(run=cmd_export, render=render_export)
