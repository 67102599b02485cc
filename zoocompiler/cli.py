"""``zoocompile``: the command line (argparse + rich).

Every command builds a JSON-able dict first and then either prints it (``--json``, nothing
else on stdout) or renders it as rich tables. Exit codes: 0 success, 1 internal error,
2 user error (any ``ZooError`` or a bad command line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .core.atomic import check_out_dir, staged_dir
from .core.errors import InputShapeError, ZooError

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130
EXAMPLE_SEED = 0
MEMBER_NAMES_SHOWN = 3
REWRITE_ATOL = 1e-4  # pruned vs masked, fused vs unfused: max |Δ| <= REWRITE_ATOL * max(1, |reference|)


# ----------------------------------------------------------------------------- small helpers


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"3,224,224"`` → ``(3, 224, 224)``; anything else is an ``InputShapeError``."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise InputShapeError(f"bad --input-shape '{text}'", "write C,H,W as three positive integers, e.g. 3,224,224")
    return dims  # type: ignore[return-value]


def _check_batch(batch: int) -> int:
    if batch < 1:
        raise InputShapeError(f"bad --batch {batch}", "pass a positive batch size, e.g. --batch 1")
    return batch


def human(n: float | int | None) -> str:
    """Compact count: 11689512 → '11.69M'."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"


def _jsonable(value: Any) -> Any:
    """Dataclasses, paths, tuples and numpy/torch scalars → plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[str] = ()):
    """A rich table of plain text (no markup); ``right`` columns are right-aligned; empty names hide the header."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left", header_style="bold", show_header=any(columns))
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    return table


# ----------------------------------------------------------------------------- model + input


def _load(args: argparse.Namespace):
    """The model and the seeded example input (batch × C×H×W) the command line asks for."""
    import torch

    from .sources import default_input_shape, load_model

    batch = _check_batch(args.batch)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None  # fail before the slow load
    model = load_model(
        args.spec, pretrained=args.pretrained, checkpoint=args.checkpoint, allow_pickle=args.allow_pickle
    )
    shape = shape or default_input_shape(model, args.spec)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(EXAMPLE_SEED))
    return model, x


def _params(model) -> int:
    from .core.modules import count_params

    return count_params(model)


def _macs(gm) -> int:
    from .ir import node_info

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
    from .ir import graph_info
    from .passes.analysis.cut_points import cut_point_table

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


# ----------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    if args.zoo and args.spec:
        raise ZooError("inspect got both a model SPEC and --zoo", "pass one of them")
    if args.zoo:
        return inspect_zoo(args.zoo)
    if not args.spec:
        raise ZooError("inspect needs a model", "pass a SPEC (e.g. torchvision:resnet18) or --zoo demo")
    from zoocompiler.passes.analysis import trace

    model, x = _load(args)
    return inspect_graph(trace(model, x), model, args.spec)


def inspect_zoo(zoo: str) -> dict[str, Any]:
    """One row per demo-zoo model: entry facts plus params, MACs, cut points and prunable groups."""
    import torch

    from zoocompiler.passes.analysis import trace

    from .sources import load_model
    from .zoo import list_entries

    if zoo != "demo":
        raise ZooError(f"unknown zoo '{zoo}'", "use --zoo demo (the built-in zoo)")
    rows = []
    for entry in list_entries():
        model = load_model(f"zoo:{entry.name}")
        x = torch.randn(1, *entry.input_shape, generator=torch.Generator().manual_seed(EXAMPLE_SEED))
        summary = inspect_graph(trace(model, x), model, f"zoo:{entry.name}")["summary"]
        rows.append(
            {
                "name": entry.name,
                "arch": entry.spec,
                "dataset": entry.dataset,
                "classes": _jsonable(entry.classes),
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


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from .tracing import check_input

    model, x = _load(args)
    check_input(model, x)  # a shape the model rejects is a one-line InputShapeError, not an exporter trace
    from .exports.onnx_export import export_onnx

    export = export_onnx(model, x, args.out, fp16=args.fp16)
    result = {"spec": args.spec, "input_shape": list(x.shape), "export": _jsonable(export), "latency": None}
    if args.runs > 0:
        from .exports.latency import measure_latency

        latency = measure_latency(export.path, input_shape=tuple(x.shape), runs=args.runs, threads=args.threads)
        result["latency"] = _jsonable(latency)
    return result


def cmd_zoo_list(args: argparse.Namespace) -> dict[str, Any]:
    from .zoo import list_entries

    return {"models": [_jsonable(entry) for entry in list_entries()]}


def cmd_zoo_build(args: argparse.Namespace) -> dict[str, Any]:
    from .zoo import build_zoo

    return {"models": [_jsonable(entry) for entry in build_zoo(force=args.force, progress=True)]}


# ----------------------------------------------------------------------------- prune / fuse

PRUNE_FILES = ("plan.json", "model.onnx", "report.json")


def _check_ratio(ratio: float | None, plan_path: str | None) -> None:
    if ratio is None and plan_path is None:
        raise ZooError("prune needs --ratio or --plan", "pass --ratio R with 0 < R < 1, or --plan plan.json to replay")
    if ratio is not None and plan_path is not None:
        raise ZooError("prune got both --ratio and --plan", "pass --ratio to compute a plan or --plan to replay one")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ZooError(f"bad --ratio {ratio}", "pass a fraction of units to remove strictly between 0 and 1, e.g. 0.5")


def _max_abs_diff(a, b) -> tuple[float, float]:
    """``max|a - b|`` and ``max|b|`` of two model outputs (first tensor leaf each)."""
    from .exports.onnx_export import first_tensor

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


def _plan_for(args: argparse.Namespace, gm):
    """The plan the command line asks for: replayed from ``--plan`` (validated) or computed by importance."""
    from .passes.analysis import plans

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


def _scope(args: argparse.Namespace) -> str:
    return args.scope or ("group" if (args.strategy or "union") == "union" else "producer")


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    _check_ratio(args.ratio, args.plan)
    if args.round_to is not None and args.round_to < 1:
        raise ZooError(f"bad --round-to {args.round_to}", "pass a positive channel multiple, e.g. --round-to 8")
    if args.plan and (args.importance is not None or args.round_to is not None):
        raise ZooError("--importance and --round-to only apply when computing a plan", "drop them, or drop --plan")
    if args.plan and not Path(args.plan).is_file():
        raise ZooError(f"plan file {args.plan} not found", "pass the plan.json written by an earlier zoocompile prune")
    out = Path(args.out)
    check_out_dir(out, args.force)
    from zoocompiler.passes.analysis import trace

    from .exports.onnx_export import export_onnx
    from .passes.analysis import run_analysis
    from .passes.analysis.plans import Plan
    from .passes.rewrite.prune import masked_reference, prune

    ln_mode = args.layernorm_streams or (Plan.load(args.plan).meta.get("layernorm_streams") if args.plan else None)
    model, x = _load(args)
    gm = run_analysis(trace(model, x, analyze=False), layernorm_streams=ln_mode or "pin")
    plan = _plan_for(args, gm)
    result = prune(gm, plan)
    masked_diff = _check_equal("pruned model vs masked reference", result.module, masked_reference(gm, plan), x)
    with staged_dir(out, args.force) as staging:
        plan.save(staging / "plan.json")
        export = export_onnx(result.module, x, staging / "model.onnx")
        export.path = str(out / "model.onnx")
        report = {
            "spec": args.spec,
            "input_shape": list(x.shape),
            "plan": {
                "source": str(args.plan) if args.plan else "computed",
                "ratio": args.ratio,
                "importance": None if args.plan else args.importance or "l1",
                "strategy": plan.strategy,
                "round_to": args.round_to,
                "seed": None if args.plan else args.seed,
                "scope": None if args.plan else _scope(args),
            },
            "prune": _jsonable(result.report.to_dict()),
            "masked_max_abs_diff": masked_diff,
            "export": _jsonable(export),
            "files": {name: str(out / name) for name in PRUNE_FILES},
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def cmd_fuse(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.passes.analysis import trace

    from .exports.onnx_export import export_onnx
    from .passes.rewrite.fuse import fuse, fuse_report

    model, x = _load(args)
    gm = trace(model, x)
    fused = fuse(gm, analyze=False)
    diff = _check_equal("fused model vs unfused model", fused, model, x)
    export = export_onnx(fused, x, args.out)
    return {
        "spec": args.spec,
        "input_shape": list(x.shape),
        "fuse": _jsonable(fuse_report(gm, fused).to_dict()),
        "fused_max_abs_diff": diff,
        "export": _jsonable(export),
    }


# ----------------------------------------------------------------------------- rendering


def render_inspect(console, data: dict[str, Any]) -> None:
    if "models" in data:
        render_zoo_summary(console, data)
        return
    s = data["summary"]
    console.print(
        _table(
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
        _table(
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
        _table(
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
            _classes_text(m["classes"]),
            "-" if m["test_accuracy"] is None else f"{m['test_accuracy']:.3f}",
            human(m["params"]),
            human(m["macs"]),
            m["cut_points"],
            f"{m['prunable_groups']}/{m['groups']}",
        ]
        for m in data["models"]
    ]
    columns = ["name", "arch", "dataset", "classes", "test acc", "params", "MACs", "cut points", "prunable groups"]
    console.print(_table(f"{data['zoo']} zoo", columns, rows, right=columns[4:]))


def _classes_text(classes: Any) -> str:
    if isinstance(classes, list):
        return ",".join(map(str, classes)) if len(classes) <= 10 else f"{len(classes)} classes"
    return str(classes)


def render_export(console, data: dict[str, Any]) -> None:
    e = data["export"]
    rows = [
        ["file", f"{e['path']} ({e['file_bytes'] / 1e6:.2f} MB, {e['onnx_nodes']} nodes)"],
        ["exporter", f"{e['exporter']}, opset {e['opset']}{', fp16' if e['fp16'] else ''}"],
        ["parity", f"max |ORT - PyTorch| = {e['max_abs_diff']:.3g} (tolerance {e['tolerance']:.3g}), {e['provider']}"],
        ["batch", "dynamic" if e["dynamic_batch"] else "fixed"],
    ]
    if e.get("output_note"):
        rows.append(["output", e["output_note"]])
    if data["latency"] is not None:
        t = data["latency"]
        rows.append(["latency", f"median {t['median_ms']:.3f} ms (p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f})"])
        rows.append(
            ["timing", f"{t['runs']} runs after {t['warmup']} warm-up, {t['threads']} thread(s), {t['provider']}"]
        )
    shape = "×".join(map(str, data["input_shape"]))
    console.print(_table(f"export {data['spec']} (input {shape})", ["", ""], rows))


def render_zoo_list(console, data: dict[str, Any], title: str = "demo zoo") -> None:
    columns = ["name", "spec", "dataset", "classes", "input", "test acc", "params", "MACs"]
    rows = [
        [
            m.get("name"),
            m.get("spec"),
            m.get("dataset"),
            _classes_text(m.get("classes")),
            "×".join(map(str, m.get("input_shape") or [])),
            "-" if m.get("test_accuracy") is None else f"{m['test_accuracy']:.3f}",
            human(m.get("params")),
            human(m.get("macs")),
        ]
        for m in data["models"]
    ]
    console.print(_table(title, columns, rows, right=("test acc", "params", "MACs")))


def render_zoo_build(console, data: dict[str, Any]) -> None:
    render_zoo_list(console, data, title="demo zoo (built)")


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
        + (f", round to {plan['round_to']}" if plan["round_to"] else "")
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
    console.print(_table(f"prune {data['spec']} (input {shape})", ["", ""], rows))


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
        ["file", f"{e['path']} ({e['onnx_nodes']} ONNX nodes, {e['file_bytes'] / 1e6:.2f} MB)"],
        ["ONNX parity", f"max |ORT - PyTorch| = {e['max_abs_diff']:.3g} (tolerance {e['tolerance']:.3g})"],
    ]
    if f.get("note"):
        rows.append(["note", f["note"]])
    shape = "×".join(map(str, data["input_shape"]))
    console.print(_table(f"fuse {data['spec']} (input {shape})", ["", ""], rows))


# ----------------------------------------------------------------------------- parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps example epilogs as written; shows a default only where it carries information."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="input shape without the batch dimension (default: the model's own, e.g. 3,224,224)",
    )
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="batch size of the example input")
    parser.add_argument("--checkpoint", metavar="FILE", help="load weights from a .pt/.pth/.safetensors file")
    parser.add_argument(
        "--pretrained", action="store_true", help="fetch the source's default pretrained weights (needs network)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow checkpoints that contain pickled Python objects (runs their code: only for trusted files)",
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout (and nothing else)")


SPEC_HELP = "model spec SOURCE:NAME[,key=value...], e.g. torchvision:resnet18 or timm:vit_tiny_patch16_224,img_size=32"


def build_parser() -> argparse.ArgumentParser:
    """The ``zoocompile`` argument parser (each subcommand sets ``run`` and ``render``)."""
    parser = argparse.ArgumentParser(
        prog="zoocompile",
        description="Compile model zoos: trace, analyse (cut points, unit groups), export to ONNX.",
        epilog="exit codes: 0 ok, 1 internal error, 2 user error (message names cause and fix), 130 interrupted",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="trace a model and show its summary, cut points and unit groups",
        description="Trace a model and show its summary, cut points and unit groups; "
        "or, with --zoo demo, one summary row per demo-zoo model.",
        epilog="examples:\n"
        "  zoocompile inspect torchvision:resnet18 --input-shape 3,32,32\n"
        "  zoocompile inspect --zoo demo",
        formatter_class=_Formatter,
    )
    inspect.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP)
    inspect.add_argument("--zoo", metavar="NAME", help="summarise every model of a zoo instead of one SPEC ('demo')")
    _model_options(inspect)
    _json_option(inspect)
    inspect.set_defaults(run=cmd_inspect, render=render_inspect)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX, check it against PyTorch, measure ONNX Runtime latency",
        description="Export a model to ONNX, check ONNX Runtime's output against PyTorch and measure latency.",
        epilog="example:\n  zoocompile export torchvision:resnet18 --input-shape 3,32,32 --out resnet18.onnx",
        formatter_class=_Formatter,
    )
    export.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    export.add_argument("--out", required=True, metavar="FILE", help="where to write the .onnx model")
    export.add_argument("--fp16", action="store_true", help="export with float16 weights and activations")
    export.add_argument("--runs", type=int, default=50, metavar="N", help="timed ONNX Runtime runs (0 skips timing)")
    export.add_argument(
        "--threads", type=int, default=1, metavar="N", help="ONNX Runtime intra-op threads (0: ONNX Runtime's default)"
    )
    _model_options(export)
    _json_option(export)
    export.set_defaults(run=cmd_export, render=render_export)

    zoo = commands.add_parser(
        "zoo",
        help="list or build the demo zoo",
        description="List or build the built-in demo zoo.",
        formatter_class=_Formatter,
    )
    zoo_commands = zoo.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    zoo_list = zoo_commands.add_parser(
        "list", help="list the demo-zoo models", description="List the demo-zoo models.", formatter_class=_Formatter
    )
    _json_option(zoo_list)
    zoo_list.set_defaults(run=cmd_zoo_list, render=render_zoo_list)
    zoo_build = zoo_commands.add_parser(
        "build",
        help="train the demo-zoo models and cache their weights",
        description="Train the demo-zoo models (small, on CPU) and cache their weights.",
        formatter_class=_Formatter,
    )
    zoo_build.add_argument("--force", action="store_true", help="retrain even if cached weights exist")
    _json_option(zoo_build)
    zoo_build.set_defaults(run=cmd_zoo_build, render=render_zoo_build)

    prune_cmd = commands.add_parser(
        "prune",
        help="prune channels/features/heads physically, export the smaller model to ONNX",
        description="Compute (or replay) a pruning plan, prune the model physically, check it against the masked "
        "reference and ONNX Runtime, and write DIR/plan.json, DIR/model.onnx and DIR/report.json "
        "(all or nothing).",
        epilog="examples:\n"
        "  zoocompile prune torchvision:resnet18 --input-shape 3,32,32 --ratio 0.5 --out r18_half\n"
        "  zoocompile prune torchvision:resnet18 --input-shape 3,32,32 --plan r18_half/plan.json --out r18_again",
        formatter_class=_Formatter,
    )
    prune_cmd.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    prune_cmd.add_argument("--out", required=True, metavar="DIR", help="directory to write (new, or --force)")
    prune_cmd.add_argument("--force", action="store_true", help="replace an existing --out directory")
    prune_cmd.add_argument("--ratio", type=float, metavar="R", help="fraction of units to remove per group, 0 < R < 1")
    prune_cmd.add_argument("--plan", metavar="FILE", help="replay this plan.json instead of computing one")
    prune_cmd.add_argument(
        "--importance", choices=("l1", "l2", "random"), help="unit importance that picks what stays (default: l1)"
    )
    prune_cmd.add_argument(
        "--strategy",
        choices=("union", "intersection", "pad"),
        help="groups with several producers (residual adds, SE muls): every producer keeps the union, the "
        "intersection, or its own units padded into the union (default: union; with --plan: the plan's)",
    )
    prune_cmd.add_argument("--round-to", type=int, metavar="N", help="keep unit counts multiples of N (e.g. 8)")
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
        choices=("pin", "prune"),
        help="residual streams a LayerNorm normalises over: keep them whole, or prune them too (the pruned "
        "LayerNorms then average over the kept units only) (default: pin; with --plan: the plan's)",
    )
    _model_options(prune_cmd)
    _json_option(prune_cmd)
    prune_cmd.set_defaults(run=cmd_prune, render=render_prune)

    fuse_cmd = commands.add_parser(
        "fuse",
        help="fold BatchNorm and consecutive affine maps, export the fused model to ONNX",
        description="Fuse conv/linear + BatchNorm and consecutive affine maps, drop identities, check the fused "
        "model against the unfused one and ONNX Runtime, and write the ONNX file.",
        epilog="example:\n  zoocompile fuse torchvision:resnet18 --input-shape 3,32,32 --out resnet18_fused.onnx",
        formatter_class=_Formatter,
    )
    fuse_cmd.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    fuse_cmd.add_argument("--out", required=True, metavar="FILE", help="where to write the fused .onnx model")
    _model_options(fuse_cmd)
    _json_option(fuse_cmd)
    fuse_cmd.set_defaults(run=cmd_fuse, render=render_fuse)

    from .cli_assemble import add_commands

    add_commands(commands, _Formatter, _json_option)
    from .cli_slice import add_commands as add_slice_commands

    add_slice_commands(commands, _Formatter, _json_option)
    return parser


# ----------------------------------------------------------------------------- entry point


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``, anything a library prints goes to stderr so stdout stays pure JSON."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zoocompile`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help/--version (0) or a usage error (2)
        return int(exit_.code or 0)
    run: Callable[[argparse.Namespace], dict[str, Any]] = args.run
    as_json = getattr(args, "json", False)
    try:
        with _stdout_to_stderr(as_json):
            data = run(args)
        if as_json:
            print(json.dumps(_jsonable(data), indent=2))
        else:
            args.render(_console(), data)
        return EXIT_OK
    except ZooError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            traceback.print_exc()
            print(f"error: internal error: {type(err).__name__}: {_one_line(str(err))}", file=sys.stderr)
        else:
            print(
                f"error: internal error: {type(err).__name__}: {_one_line(str(err))[:200]} (rerun with --debug)",
                file=sys.stderr,
            )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
