"""Coverage of the compiler over every timm and torchvision classification family.

Usage: ``python bench/coverage.py [--jobs 2] [--only FAMILY,...] [--resume] [--layernorm-streams MODE]``.
Writes ``bench/results/coverage.json`` (one row per family, the pin reasons counted, the targets) and
``coverage.png``; ``--show`` re-prints a finished run without measuring.

**How the list is chosen.** A *family* is one architecture line: for timm, a model module
(``timm.list_modules()``) and the alphabetic stem of the model name within it (``resnet`` and
``seresnext`` in ``timm.models.resnet``; prefixes such as ``tf_`` and ``gluon_`` that only change
the weights' origin are dropped, ``test_`` models are left out); for torchvision, one builder module
of ``torchvision.models``. Each family is represented by its smallest variant by parameter count
(counted on the meta device, no memory or compute), built with 10 classes at the smallest of these
inputs that runs on CPU: 64×64 (models that take ``img_size`` / ``image_size`` are built for it), then
the model's default input size. When the smallest variant does not build, the next-smallest is tried (at
most three). The selection is cached in ``bench/results/coverage_families.json`` per timm version.

**What each family goes through** (on worker processes; a family past ``--timeout`` is recorded as
timed out): trace + analysis (``zoocompile prune``'s default ``layernorm_streams``) → a 50% plan (l1
importance, one choice per group) → physical prune → pruned vs masked reference on two inputs
(exact when the largest difference is ≤ 1e-4 of the output scale) → ONNX export of the pruned model
with parity at batch 1 and 3. The row records each outcome, the MAC ratio, whether torch.export
(dynamo) or the legacy exporter wrote the model, and every pinned group's reasons collapsed to a
pattern (node names and numbers removed).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import queue
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measured import run_measured, show  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES_CACHE = RESULTS / "coverage_families.json"
WEIGHT_PREFIXES = re.compile(r"^(tf|gluon|ssl|swsl|ig|legacy)_")
EXACT_REL = 1e-4
SMALL = 64
TARGETS = {
    "exact_and_exported": 0.98,  # share of families that trace, prune exactly and export
    "transformer_median_mac_ratio": 0.35,  # at 50% pruning, default mode
    "unknown_pins_top20": 0,  # 'unknown op/module' pins among the 20 largest families
    "dynamo": 0.95,  # share exported by torch.export without the legacy fallback
}


# ----------------------------------------------------------------------------- the family list


def _stem(name: str) -> str:
    base = WEIGHT_PREFIXES.sub("", name)
    m = re.match(r"[a-z]+(?:v\d+)?", base)
    return m.group(0) if m else base


def _meta_params(build) -> int | None:
    import torch

    try:
        with torch.device("meta"):
            model = build()
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is ranked last
        return None


def _select_families(console: Console) -> dict[str, Any]:
    """Every family with its variants ranked by parameter count (see the module docstring)."""
    import timm
    import torchvision
    import torchvision.models as tvm

    families: dict[str, dict[str, Any]] = {}
    names = [(m, n) for m in timm.list_modules() for n in timm.list_models(module=m) if not n.startswith("test_")]
    for i, (module, name) in enumerate(names):
        if i % 100 == 0:
            console.print(f"counting parameters on the meta device: {i}/{len(names)} timm models")
        fam = families.setdefault(f"timm.{module}.{_stem(name)}", {"source": "timm", "variants": []})
        fam["variants"].append([name, _meta_params(lambda n=name: timm.create_model(n, num_classes=10))])
    for name in tvm.list_models(module=tvm):
        module = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        fam = families.setdefault(f"torchvision.{module}", {"source": "torchvision", "variants": []})
        fam["variants"].append([name, _meta_params(lambda n=name: tvm.get_model(n, num_classes=10))])
    for fam in families.values():
        fam["variants"].sort(key=lambda v: (v[1] is None, v[1] or 0, v[0]))
    return {"timm": timm.__version__, "torchvision": torchvision.__version__, "families": families}


def load_families(console: Console) -> dict[str, Any]:
    import timm

    from zoocompiler.core.atomic import write_json_atomic

    if FAMILIES_CACHE.is_file():
        import json

        cached = json.loads(FAMILIES_CACHE.read_text())
        if cached.get("timm") == timm.__version__:
            return cached
    selected = _select_families(console)
    write_json_atomic(FAMILIES_CACHE, selected)
    return selected


# ----------------------------------------------------------------------------- one family (worker side)


def _build(source: str, name: str):
    """The model and example input: 64×64 first (built for it when the model takes img_size / image_size),
    else the default size."""
    import torch

    if source == "timm":
        import timm

        def make(kwargs):
            return timm.create_model(name, num_classes=10, **kwargs)

        tries = [({"img_size": SMALL}, SMALL), ({}, SMALL), ({}, None)]
    else:
        import torchvision.models as tvm

        def make(kwargs):
            return tvm.get_model(name, num_classes=10, **kwargs)

        tries = [({"image_size": SMALL}, SMALL), ({}, SMALL), ({}, 224)]
    g = torch.Generator().manual_seed(0)
    for kwargs, size in tries:
        try:
            model = make(kwargs).eval()
            shape = (3, size, size) if size else tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
            x = torch.randn(1, *shape, generator=g)
            with torch.no_grad():
                model(x)
            return model, x
        except Exception as err:  # noqa: BLE001 - try the next input
            last = err
    raise last


_NUMBERS = re.compile(r"\b\d+\b|_\d+\b")
_NODE = re.compile(r"\(node [^)]*\)|at node \S+|node \S+|'[^']*'")


def reason_pattern(reason: str) -> str:
    """A pin reason with node names, quoted names and numbers removed, so equal causes count together."""
    text = _NODE.sub("…", reason.split("\n")[0])
    return re.sub(r"\s+", " ", _NUMBERS.sub("N", text)).strip()[:140]


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


def _rel_diff(a, b) -> float:
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


def _has_op(gm, needles: tuple[str, ...], modules: tuple[str, ...]) -> bool:
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method") and any(k in str(n.target).lower() for k in needles):
            return True
        if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ in modules:
            return True
    return False


def run_family(source: str, variants: list[str], layernorm_streams: str | None) -> dict[str, Any]:
    """Trace, analyse, prune 50% and export one family's smallest variant that builds; every outcome recorded."""
    import torch

    from zoocompiler.cli.rewrite import DEFAULT_PRUNE_STREAMS
    from zoocompiler.exports.onnx_export import export_onnx
    from zoocompiler.ir import graph_info
    from zoocompiler.passes.analysis import run_analysis, trace
    from zoocompiler.passes.analysis.plans import plan_by_importance
    from zoocompiler.passes.rewrite.prune import masked_reference, prune

    torch.set_num_threads(1)
    row: dict[str, Any] = {"source": source, "stage": "build", "seconds": {}}
    errors = []
    for name in variants[:3]:
        try:
            model, x = _build(source, name)
            break
        except Exception as err:  # noqa: BLE001
            errors.append(f"{name}: {_first_line(err)}")
    else:
        row["error"] = "; ".join(errors)
        return row
    row.update(model=name, input=list(x.shape), params=sum(p.numel() for p in model.parameters()))
    t = time.perf_counter()
    try:
        row["stage"] = "trace"
        mode = layernorm_streams or DEFAULT_PRUNE_STREAMS
        gm = run_analysis(trace(model, x, analyze=False), layernorm_streams=mode)
        info = graph_info(gm)
        row["seconds"]["trace"] = time.perf_counter() - t
        groups = info.unit_groups
        pinned = [g for g in groups if g.pinned]
        row.update(
            traced=True, tracer=info.tracer, nodes=len(gm.graph.nodes), groups=len(groups),
            prunable=len(groups) - len(pinned), pinned=len(pinned),
            attention=_has_op(gm, ("softmax", "scaled_dot_product"), ("MultiheadAttention",)),
            layernorm=_has_op(gm, ("layer_norm",), ("LayerNorm", "LayerNorm2d", "RmsNorm", "RMSNorm")),
            pin_reasons=dict(collections.Counter(reason_pattern(r) for g in pinned for r in set(g.reasons))),
        )
        row["stage"] = "prune"
        t = time.perf_counter()
        plan = plan_by_importance(gm, 0.5, scope="group")
        result = prune(gm, plan)
        row["seconds"]["prune"] = time.perf_counter() - t
        row.update(mac_ratio=result.report.mac_ratio, param_ratio=result.report.param_ratio)
        row["stage"] = "masked"
        ref = masked_reference(gm, plan)
        x2 = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = max(_rel_diff(result.module(v), ref(v)) for v in (x, x2))
        row.update(masked_rel_diff=diff, exact=diff <= EXACT_REL)
        row["stage"] = "export"
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = export_onnx(result.module, x, Path(tmp) / "m.onnx")
        row["seconds"]["export"] = time.perf_counter() - t
        row.update(exported=True, exporter=report.exporter, onnx_rel_diff=report.rel_diff,
                   fallback_reason={k: v.splitlines()[0][:300] for k, v in report.exporter_errors.items()})
        row["stage"] = "done"
    except Exception as err:  # noqa: BLE001 - the row records where the family stopped and why
        row["error"] = _first_line(err)
        row["traceback"] = traceback.format_exc()[-2000:]
    return row


def _worker(tasks, results, layernorm_streams):
    while True:
        item = tasks.get()
        if item is None:
            return
        family, source, variants = item
        results.put((family, run_family(source, variants, layernorm_streams)))


# ----------------------------------------------------------------------------- the run (parent side)


def _run_all(todo: list[tuple[str, str, list[str]]], jobs: int, timeout: float, ln: str | None,
             console: Console, done: dict[str, Any], save) -> None:
    """Run ``todo`` on ``jobs`` worker processes, one family at a time each; a worker past ``timeout`` is
    replaced and its family recorded as timed out."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pending = list(todo)
    workers: dict[int, tuple[Any, Any, str | None, float]] = {}  # slot -> (process, task queue, family, start)
    started = time.perf_counter()

    def start(slot: int) -> None:
        tasks = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(tasks, results, ln), daemon=True)
        proc.start()
        workers[slot] = (proc, tasks, None, 0.0)

    def feed(slot: int) -> None:
        proc, tasks, _, _ = workers[slot]
        if pending:
            item = pending.pop(0)
            tasks.put(item)
            workers[slot] = (proc, tasks, item[0], time.perf_counter())
        else:
            tasks.put(None)
            workers[slot] = (proc, tasks, None, 0.0)

    for slot in range(jobs):
        start(slot)
        feed(slot)
    while any(w[2] is not None for w in workers.values()):
        try:
            family, row = results.get(timeout=5)
        except queue.Empty:
            family = None
        if family is not None:
            done[family] = row
            save()
            status = "ok" if row.get("stage") == "done" else f"stopped at {row.get('stage')}"
            console.print(f"[{len(done)}/{len(done) + len(pending) + sum(1 for w in workers.values() if w[2]) - 1}] "
                          f"{family} ({row.get('model')}): {status}  "
                          f"{time.perf_counter() - started:.0f} s")
            for slot, (_, _, fam, _) in list(workers.items()):
                if fam == family:
                    feed(slot)
        now = time.perf_counter()
        for slot, (proc, _, fam, t0) in list(workers.items()):
            if fam is not None and (now - t0 > timeout or not proc.is_alive()):
                proc.kill()
                why = f"timed out after {timeout:.0f} s" if proc.is_alive() or now - t0 > timeout else "worker died"
                done[fam] = {"stage": "timeout", "error": why}
                save()
                console.print(f"{fam}: {why}")
                start(slot)
                feed(slot)


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    import json

    selected = load_families(console)
    families = selected["families"]
    names = sorted(families)
    if args.only:
        names = [n for n in names if any(o in n for o in args.only.split(","))]
    done: dict[str, Any] = {}
    partial = args.out.with_suffix(".partial.json")
    source = partial if partial.is_file() else args.out
    if args.resume and source.is_file():
        rows = json.loads(source.read_text())
        done = {k: v for k, v in rows.get("families", rows).items() if k in names}
        if args.retry:  # families that stopped, were not exact, or needed the legacy exporter run again
            done = {k: v for k, v in done.items() if _ok(v) and v.get("exporter") == "dynamo"}
        done = {k: v for k, v in done.items() if not any(r and r in k for r in args.rerun.split(","))}

    def save() -> None:
        from zoocompiler.core.atomic import write_json_atomic

        write_json_atomic(partial, done)

    todo = [(n, families[n]["source"], [v[0] for v in families[n]["variants"]]) for n in names if n not in done]
    console.print(f"{len(names)} families, {len(todo)} to run on {args.jobs} worker(s)")
    _run_all(todo, args.jobs, args.timeout, args.layernorm_streams, console, done, save)
    for n in names:
        done[n]["variants"] = len(families[n]["variants"])
    partial.unlink(missing_ok=True)
    return {"families": {n: done[n] for n in names}, "selection": {"timm": selected["timm"],
                                                                   "torchvision": selected["torchvision"]},
            "layernorm_streams": args.layernorm_streams or "default (zoocompile prune's)"}


# ----------------------------------------------------------------------------- summary, table, plot


def _ok(row: dict[str, Any]) -> bool:
    return row.get("stage") == "done" and bool(row.get("exact"))


def is_unknown(pattern: str) -> bool:
    return "unknown" in pattern.lower() or "no rule" in pattern.lower() or "not a plain" in pattern.lower()


def derive(doc: dict[str, Any]) -> dict[str, Any]:
    rows = doc["families"]
    n = len(rows)
    traced = [r for r in rows.values() if r.get("traced")]
    exported = [r for r in rows.values() if r.get("exported")]
    transformer = [r["mac_ratio"] for r in rows.values() if r.get("attention") and "mac_ratio" in r]
    cnn = [r["mac_ratio"] for r in rows.values() if not r.get("attention") and "mac_ratio" in r]
    largest = sorted(rows, key=lambda k: (-rows[k].get("variants", 0), k))[:20]
    unknown_top = {k: sum(c for p, c in rows[k].get("pin_reasons", {}).items() if is_unknown(p)) for k in largest}
    reasons: collections.Counter = collections.Counter()
    families_with: collections.Counter = collections.Counter()
    for r in rows.values():
        for p, c in r.get("pin_reasons", {}).items():
            reasons[p] += c
            families_with[p] += 1
    summary = {
        "families": n,
        "traced": len(traced),
        "pruned_exactly": sum(1 for r in rows.values() if r.get("exact")),
        "exported": len(exported),
        "exact_and_exported": sum(1 for r in rows.values() if _ok(r)),
        "dynamo": sum(1 for r in exported if r.get("exporter") == "dynamo"),
        "transformer_families": len(transformer),
        "transformer_median_mac_ratio": statistics.median(transformer) if transformer else None,
        "cnn_median_mac_ratio": statistics.median(cnn) if cnn else None,
        "largest_20": largest,
        "unknown_pins_top20": sum(unknown_top.values()),
        "unknown_pins_top20_by_family": {k: v for k, v in unknown_top.items() if v},
        "pin_reasons": [{"reason": p, "groups": c, "families": families_with[p]} for p, c in reasons.most_common()],
        "failures": {k: f"{r.get('stage')}: {r.get('error', 'not exact')}" for k, r in rows.items() if not _ok(r)},
    }
    checks = {
        "exact_and_exported": (summary["exact_and_exported"] / max(1, n), TARGETS["exact_and_exported"], ">="),
        "dynamo": (summary["dynamo"] / max(1, len(exported)), TARGETS["dynamo"], ">="),
        "transformer_median_mac_ratio": (summary["transformer_median_mac_ratio"],
                                         TARGETS["transformer_median_mac_ratio"], "<="),
        "unknown_pins_top20": (summary["unknown_pins_top20"], TARGETS["unknown_pins_top20"], "<="),
    }
    summary["targets"] = {
        k: {"value": v, "target": t, "met": v is not None and (v >= t if op == ">=" else v <= t)}
        for k, (v, t, op) in checks.items()
    }
    return {"summary": summary}


def render(doc: dict[str, Any], console: Console) -> None:
    rows, s = doc["families"], doc["summary"]
    t = Table(title=f"coverage: {s['families']} families, prune 50%, layernorm_streams={doc['layernorm_streams']}")
    for col in ("family", "model", "input", "traced", "prunable/groups", "exact", "MAC ratio", "exporter", "note"):
        t.add_column(col, justify="right" if col in ("MAC ratio", "prunable/groups") else "left")
    for k, r in rows.items():
        t.add_row(
            k, r.get("model", "-"), "×".join(map(str, r.get("input", [])[2:])) or "-",
            "yes" if r.get("traced") else "no",
            f"{r['prunable']}/{r['groups']}" if "groups" in r else "-",
            "yes" if r.get("exact") else ("no" if "exact" in r else "-"),
            f"{r['mac_ratio']:.3f}" if "mac_ratio" in r else "-",
            r.get("exporter", "-"),
            "" if _ok(r) else f"{r.get('stage')}: {r.get('error', 'not exact')}"[:70],
        )
    console.print(t)
    reasons = Table(title="pin reasons (collapsed), groups and families")
    for col in ("reason", "groups", "families"):
        reasons.add_column(col, justify="left" if col == "reason" else "right")
    for item in s["pin_reasons"][:30]:
        reasons.add_row(item["reason"], str(item["groups"]), str(item["families"]))
    console.print(reasons)
    targets = Table(title="targets")
    for col in ("target", "value", "bound", "met"):
        targets.add_column(col)
    for k, v in s["targets"].items():
        value = v["value"]
        targets.add_row(k, "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value),
                        str(v["target"]), "MET" if v["met"] else "MISSED")
    console.print(targets)
    console.print(f"traced {s['traced']}, pruned exactly {s['pruned_exactly']}, exported {s['exported']} "
                  f"(dynamo {s['dynamo']}) of {s['families']}; transformer families {s['transformer_families']}, "
                  f"median MAC ratio {s['transformer_median_mac_ratio']}, CNN median {s['cnn_median_mac_ratio']}")


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = doc["families"], doc["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    for label, want in (("attention", True), ("no attention", False)):
        vals = sorted(r["mac_ratio"] for r in rows.values() if "mac_ratio" in r and bool(r.get("attention")) == want)
        a.plot(range(len(vals)), vals, marker=".", label=f"{label} ({len(vals)})")
    a.axhline(TARGETS["transformer_median_mac_ratio"], color="gray", ls="--", lw=0.8)
    a.set(xlabel="families, sorted", ylabel="MAC ratio after pruning 50%", title="MAC ratio per family")
    a.legend()
    top = [p for p in s["pin_reasons"] if p["reason"] not in ("model input", "model output")][:12][::-1]  # by design
    b.barh([p["reason"][:60] for p in top], [p["families"] for p in top])
    b.set(xlabel="families with pinned groups for this reason", title="remaining pin reasons")
    b.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one family at a time each)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per family before it is recorded as "
                        "timed out")
    parser.add_argument("--only", default="", help="comma-separated substrings of family names to run")
    parser.add_argument("--resume", action="store_true", help="keep the families of an interrupted (or the last) run")
    parser.add_argument("--retry", action="store_true", help="with --resume: run again the families that failed, "
                        "were not exact or fell back to the legacy exporter")
    parser.add_argument("--rerun", default="", help="with --resume: comma-separated substrings of family names "
                        "to run again")
    parser.add_argument("--layernorm-streams", choices=("pin", "prune", "auto"), default=None,
                        help="analysis mode (default: zoocompile prune's)")
    parser.add_argument("--show", action="store_true", help="print and plot the existing results, measure nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "coverage.json")
    args = parser.parse_args()
    console = Console(width=200)
    if args.show:
        import json

        show(json.loads(args.out.read_text()), args, console, render, plot, measured=False)
        return
    doc = run_measured(args, console, run, derive)
    show(doc, args, console, render, plot, measured=True)


if __name__ == "__main__":
    main()
