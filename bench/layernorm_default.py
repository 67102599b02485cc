"""LayerNorm-stream default benchmark (issue 16): should ``layernorm_streams`` default to "pin" or "prune"?

Usage::

    python bench/layernorm_default.py                # full run (see docs/bench_layernorm_default.md for the time)
    python bench/layernorm_default.py --quick        # smoke: one model, 1 seed, 1 epoch, ratio 0.5 (~1 min)
    python bench/layernorm_default.py --models vit_t --seeds 0 --epochs 2 --out /tmp/ln.json
    python bench/layernorm_default.py --render-only  # re-print the tables, the decision and the plot from the JSON
    python bench/layernorm_default.py --render-only --markdown   # the tables of the doc, as markdown

Models: the demo zoo's transformer and ConvNeXt (``zoo:vit_t``, ``zoo:convnext_t``; mnist5k, shipped weights). Per
model and mode (``pin``: LayerNorm-normalised residual streams kept whole; ``prune``: pruned too, statistics over the
kept units), a fresh trace is analysed with ``run_analysis(trace(model, x, analyze=False), layernorm_streams=mode)``,
planned by ``plan_by_importance(gm, ratio, importance="l1", scope="group")`` (what ``bench/rewrite.py`` does) and
pruned by ``passes.rewrite.prune.prune``. Points: every ``--ratios`` ratio in both modes, plus the two equal-compute
points: ``prune`` at the ratio whose MAC ratio is closest to ``pin`` at 50 %, and ``pin`` at the ratio closest to
``prune`` at 50 % (when ``pin`` can reach it at all: ratio ≤ 0.95, MAC ratio within 0.03).

Per point: MAC and parameter ratios (``PruneReport``), test accuracy right after pruning, and test accuracy after the
same short fine-tune for every point, the unpruned model included (``training.train``: AdamW, OneCycle peak ``--lr``,
``--epochs`` epochs, batch ``--batch-size``, ±2 px shifts, one per ``--seeds`` seed; 1 torch thread). Then every
model's variants (fine-tuned with the first seed) are exported with ``export_onnx`` (parity-checked) and timed in
ONNX Runtime CPU, 1 intra-op thread, round-robin (``bench/rewrite.py``'s ``interleaved_latency``) at batch 1 and 32;
latency ratios are pruned / original. Prints rich tables and the decision, writes
``bench/results/layernorm_default.json`` and ``.png`` (accuracy vs MAC ratio per model, one line per mode; latency
ratio vs MAC ratio), both atomically.

Decision rule (``decide``): ``prune`` pays on a model iff (a) at equal MACs its fine-tuned accuracy (mean over seeds)
is at least ``pin``'s minus max(``--tolerance`` = 0.5 pp, 2 × the paired standard error of the difference on the
shared test set) at every equal-MAC pair measured, and (b) at the same nominal ratio (50 %) its batch-32 latency ratio
is lower than ``pin``'s by the median and by the 10th percentile. The default is ``prune`` iff it pays on every model,
``pin`` iff on none, else "per model" (the per-model verdicts are in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import torch.nn as nn
from _measured import rederived, run_measured, show  # bench/_measured.py (this script's folder is on sys.path)
from rewrite import Setup, export_variant, interleaved_latency  # bench/rewrite.py: the same export and timing path
from rich.console import Console
from rich.table import Table

from zoocompiler.core.plots import pyplot, save_png
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.analysis.plans import plan_by_importance
from zoocompiler.passes.rewrite.prune import PruneResult, prune
from zoocompiler.sources import load_model
from zoocompiler.training import check_finite_outputs, evaluate, predict_logits, train
from zoocompiler.zoo import get_entry

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("vit_t", "convnext_t")
MODES = ("pin", "prune")
REFERENCE_RATIO = 0.5  # the nominal ratio of the equal-MAC pairs and the latency criterion
MAX_RATIO = 0.95  # the highest ratio the equal-MAC search tries
MAC_TOLERANCE = 0.03  # an equal-MAC partner must be this close in MAC ratio, else the pair is "not reachable"
TRACE_BATCH = 2


# ----------------------------------------------------------------------------- pruning


class Pruner:
    """One model's analysed traces (one per mode) and every ``prune`` result computed so far, by (mode, ratio)."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.graphs = {mode: run_analysis(trace(model, x, analyze=False), layernorm_streams=mode) for mode in MODES}
        self.results: dict[tuple[str, float, int | None], PruneResult] = {}

    def __call__(self, mode: str, ratio: float, round_to: int | None = None) -> PruneResult:
        key = (mode, round(ratio, 3), round_to)
        if key not in self.results:
            gm = self.graphs[mode]
            plan = plan_by_importance(gm, key[1], importance="l1", scope="group", round_to=round_to)
            self.results[key] = prune(gm, plan)
        return self.results[key]

    def match_macs(self, mode: str, target: float, prefer: list[float], steps: int = 10) -> float | None:
        """The ratio (3 decimals) in [0, MAX_RATIO] whose MAC ratio in ``mode`` is closest to ``target``, by bisection
        (MACs fall as the ratio grows), a ``prefer`` ratio on ties (the same plan is not measured twice); None when
        the closest is more than ``MAC_TOLERANCE`` away."""
        lo, hi = 0.0, MAX_RATIO
        tried = [*prefer, hi]
        if self(mode, hi).report.mac_ratio <= target:
            for _ in range(steps):
                mid = round((lo + hi) / 2, 3)
                tried.append(mid)
                if self(mode, mid).report.mac_ratio > target:
                    lo = mid
                else:
                    hi = mid
        best = min(tried, key=lambda r: (round(abs(self(mode, r).report.mac_ratio - target), 9), r not in prefer, r))
        return best if abs(self(mode, best).report.mac_ratio - target) <= MAC_TOLERANCE else None


def points(pruner: Pruner, ratios: list[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (mode, ratio, point) list to measure, and the equal-MAC pairs (with their reachability)."""
    todo = [{"mode": mode, "ratio": r, "point": "nominal"} for mode in MODES for r in ratios]
    pairs = []
    for fixed, search in (("pin", "prune"), ("prune", "pin")):
        target = pruner(fixed, REFERENCE_RATIO).report.mac_ratio
        ratio = pruner.match_macs(search, target, prefer=ratios)
        pair = {"fixed": fixed, "fixed_ratio": REFERENCE_RATIO, "target_mac_ratio": target, "search": search,
                "search_ratio": ratio}
        if ratio is None:
            pair["note"] = (f"not reachable: {search} at ratio {MAX_RATIO} has MAC ratio "
                            f"{pruner(search, MAX_RATIO).report.mac_ratio:.3f} > {target:.3f} + {MAC_TOLERANCE}")
        pairs.append(pair)
        matched = f"equal MACs to {fixed}@{REFERENCE_RATIO:.0%}"
        for mode, r, label in ((fixed, REFERENCE_RATIO, None), (search, ratio, matched)):
            if r is None:
                continue
            same = next((p for p in todo if p["mode"] == mode and p["ratio"] == r), None)
            if same is None:
                todo.append({"mode": mode, "ratio": r, "point": label or "equal-MAC partner"})
            elif label:
                same["point"] += f"; {label}"
    return todo, pairs


# ----------------------------------------------------------------------------- measuring


def correctness(module: nn.Module, split: DataSplit) -> tuple[float, str]:
    """Test accuracy (as ``training.evaluate``) and the per-sample hits as a string of 0/1 (for paired statistics)."""
    hits = evaluate_hits(module, split)
    return hits.count("1") / len(hits), hits


def evaluate_hits(module: nn.Module, split: DataSplit) -> str:
    logits = predict_logits(module, split)
    check_finite_outputs(module, logits, split)
    return "".join("1" if h else "0" for h in (logits.argmax(1) == split.y).tolist())


def finetune(module: nn.Module, train_split: DataSplit, args: argparse.Namespace, seed: int) -> tuple[nn.Module, float]:
    """A fine-tuned copy of ``module`` (the bench's fixed recipe, ``seed``) and the seconds taken."""
    tuned = copy.deepcopy(module)
    t0 = time.perf_counter()
    train(tuned, train_split, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed, augment=True,
          progress=False, desc="fine-tune")
    return tuned, time.perf_counter() - t0


def bench_model(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Every row (the original, then each mode × point) and the equal-MAC pairs of zoo model ``name``."""
    entry = get_entry(name)
    train_split = load_dataset(entry.dataset, "train", classes=entry.classes)
    test_split = load_dataset(entry.dataset, "test", classes=entry.classes)
    model = load_model(f"zoo:{name}").eval()
    x = test_split.x[:TRACE_BATCH]
    pruner = Pruner(model, x)
    todo, pairs = points(pruner, args.ratios)
    log(f"{name}: {len(todo)} pruned points; equal-MAC ratios "
        + ", ".join(f"{p['search']}@{p['search_ratio']}" for p in pairs))

    rows: list[dict[str, Any]] = []
    modules: list[nn.Module] = []  # per row: the module exported and timed (fine-tuned with the first seed)

    def measure(row: dict[str, Any], module: nn.Module) -> None:
        row["accuracy_pruned"], row["hits_pruned"] = correctness(module, test_split)
        row["accuracy_ft"], row["hits_ft"], row["finetune_s"] = {}, {}, {}
        for seed in args.seeds:
            tuned, seconds = finetune(module, train_split, args, seed)
            row["accuracy_ft"][str(seed)], row["hits_ft"][str(seed)] = correctness(tuned, test_split)
            row["finetune_s"][str(seed)] = round(seconds, 1)
            if seed == args.seeds[0]:
                modules.append(tuned)
        row["accuracy_ft_mean"] = statistics.fmean(row["accuracy_ft"].values())
        log(f"{name} {row['mode']} {row['ratio']}: MAC ratio {row['mac_ratio']:.3f}, accuracy "
            f"{row['accuracy_pruned']:.3f} → {row['accuracy_ft_mean']:.3f} after fine-tuning")
        rows.append(row)

    measure({"model": name, "mode": "-", "ratio": 0.0, "point": "original", "mac_ratio": 1.0, "param_ratio": 1.0},
            model)
    rounded: list[tuple[dict[str, Any], nn.Module]] = []  # (row, module): latency-only variants, not fine-tuned
    for p in sorted(todo, key=lambda p: (MODES.index(p["mode"]), p["ratio"])):
        result = pruner(p["mode"], p["ratio"])
        report = result.report
        measure({"model": name, **p, "mac_ratio": report.mac_ratio, "param_ratio": report.param_ratio,
                 "macs": report.macs_after, "params": report.params_after,
                 "approx_groups": sum(1 for g in report.per_group.values() if g.get("approx"))}, result.module)
        if args.round_to:
            r = pruner(p["mode"], p["ratio"], args.round_to)
            rounded.append(({"round_to": args.round_to, "mac_ratio": r.report.mac_ratio,
                             "param_ratio": r.report.param_ratio,
                             "accuracy_pruned": evaluate(r.module, test_split)}, r.module))
            rows[-1]["rounded"] = rounded[-1][0]

    setup = Setup(size=entry.input_shape[-1], batches=tuple(args.batches), runs=args.runs, warmup=args.warmup,
                  threads=1, exporters=(args.exporter,), round_to=0)
    with tempfile.TemporaryDirectory(prefix="zc_ln_") as tmp:
        paths, timed = [], [*zip(rows, modules, strict=True), *rounded]
        for i, (row, module) in enumerate(timed):
            path = Path(tmp) / f"{i}.onnx"
            export = export_variant(module, x, path, setup.exporters)
            row.update(onnx_max_abs_diff=export["onnx_max_abs_diff"], flop_counter_macs=export["macs"])
            paths.append(path)
        for batch in setup.batches:
            stats = interleaved_latency(paths, (batch, *x.shape[1:]), setup)
            for (row, _), s in zip(timed, stats, strict=True):
                row.setdefault("latency_ms", {})[str(batch)] = s["median"]
                row.setdefault("latency_p10_p90_ms", {})[str(batch)] = [s["p10"], s["p90"]]
            log(f"{name}: timed {len(paths)} models at batch {batch}")
    base, base_p10 = rows[0]["latency_ms"], rows[0]["latency_p10_p90_ms"]
    for row, _ in timed:
        row["latency_ratio"] = {b: ms / base[b] for b, ms in row["latency_ms"].items()}
        row["latency_ratio_p10"] = {b: v[0] / base_p10[b][0] for b, v in row["latency_p10_p90_ms"].items()}
    return {"model": name, "entry_accuracy": entry.test_accuracy, "input_shape": list(entry.input_shape),
            "rows": rows, "pairs": pairs}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the torchscript exporter's, per variant
    log = Console(stderr=True)
    models = [bench_model(name, args, lambda text: log.log(text)) for name in args.models]
    return {"setup": {"finetune": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                   "optimizer": "AdamW (weight decay 0.05), OneCycle", "augment": "±2 px shifts",
                                   "seeds": args.seeds},
                      "plan": {"importance": "l1", "scope": "group"}, "ratios": args.ratios,
                      "latency": {"batches": args.batches, "runs": args.runs, "warmup": args.warmup, "threads": 1,
                                  "provider": "CPUExecutionProvider", "exporter": args.exporter,
                                  "round_to": args.round_to},
                      "onnxruntime": onnxruntime.__version__, "tolerance_pp": args.tolerance},
            "models": models}


# ----------------------------------------------------------------------------- derived figures and the decision


def _large(doc: dict[str, Any]) -> str:
    return str(max(doc["setup"]["latency"]["batches"]))


def _row(model: dict[str, Any], mode: str, ratio: float | None) -> dict[str, Any] | None:
    return next((r for r in model["rows"] if r["mode"] == mode and ratio is not None
                 and abs(r["ratio"] - ratio) < 1e-9), None)


def _summary(row: dict[str, Any], large: str) -> dict[str, Any]:
    out = {"ratio": row["ratio"], "mac_ratio": row["mac_ratio"], "accuracy_pruned": row["accuracy_pruned"],
           "accuracy_ft": row["accuracy_ft_mean"], "latency_ratio": row["latency_ratio"][large],
           "latency_ratio_p10": row["latency_ratio_p10"][large]}
    if "rounded" in row:
        out["rounded_latency_ratio"] = row["rounded"]["latency_ratio"][large]
    return out


def paired_se_pp(pin: dict[str, Any], prune: dict[str, Any], key: str) -> float | None:
    """Standard error (pp) of prune − pin accuracy on the shared test set: per sample, the seed-mean hit of prune minus
    pin's, ``std / sqrt(n)`` (a paired test: the same images, so only disagreements count). None without hits."""
    if key not in pin or key not in prune:
        return None

    def per_sample(hits: str | dict[str, str]) -> np.ndarray:
        runs = [hits] if isinstance(hits, str) else list(hits.values())
        return np.mean([np.frombuffer(h.encode(), dtype=np.uint8) - ord("0") for h in runs], axis=0)

    d = per_sample(prune[key]) - per_sample(pin[key])
    return float(100 * d.std(ddof=1) / np.sqrt(len(d)))


def comparisons(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and equal-MAC pair: both rows' ratio, MACs, accuracies and b32 latency, and the prune − pin deltas."""
    large = _large(doc)
    out = []
    for model in doc["models"]:
        for pair in model["pairs"]:
            entry: dict[str, Any] = {"model": model["model"], "pair": f"{pair['fixed']}@{pair['fixed_ratio']:.0%} "
                                     f"vs {pair['search']} at equal MACs", "note": pair.get("note")}
            rows = {pair["fixed"]: _row(model, pair["fixed"], pair["fixed_ratio"]),
                    pair["search"]: _row(model, pair["search"], pair["search_ratio"])}
            for mode, row in rows.items():
                entry[mode] = None if row is None else _summary(row, large)
            if entry["pin"] and entry["prune"]:
                entry["delta_ft_pp"] = 100 * (entry["prune"]["accuracy_ft"] - entry["pin"]["accuracy_ft"])
                entry["delta_pruned_pp"] = 100 * (entry["prune"]["accuracy_pruned"] - entry["pin"]["accuracy_pruned"])
                entry["se_ft_pp"] = paired_se_pp(rows["pin"], rows["prune"], "hits_ft")
                entry["se_pruned_pp"] = paired_se_pp(rows["pin"], rows["prune"], "hits_pruned")
                entry["tolerance_pp"] = max(doc["setup"]["tolerance_pp"], 2 * (entry["se_ft_pp"] or 0.0))
            out.append(entry)
    return out


def same_ratio(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model at the nominal ratio 50 %: MAC ratio, accuracies and b32 latency ratios in both modes."""
    large = _large(doc)
    out = []
    for model in doc["models"]:
        entry: dict[str, Any] = {"model": model["model"], "ratio": REFERENCE_RATIO}
        for mode in MODES:
            row = _row(model, mode, REFERENCE_RATIO)
            entry[mode] = None if row is None else _summary(row, large)
        out.append(entry)
    return out


def equal_accuracy(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model: the cheapest measured ``prune`` point whose fine-tuned accuracy reaches ``pin``@50 %'s (within the
    tolerance), next to ``pin``@50 %: what the prune mode buys at equal accuracy."""
    large, tol = _large(doc), doc["setup"]["tolerance_pp"] / 100
    out = []
    for model in doc["models"]:
        pin = _row(model, "pin", REFERENCE_RATIO)
        if pin is None:
            continue
        bar = pin["accuracy_ft_mean"] - tol
        good = [r for r in model["rows"] if r["mode"] == "prune" and r["accuracy_ft_mean"] >= bar]
        best = min(good, key=lambda r: r["mac_ratio"], default=None)
        out.append({"model": model["model"], "pin": _summary(pin, large),
                    "prune": None if best is None else _summary(best, large)})
    return out


def decide(doc: dict[str, Any]) -> dict[str, Any]:
    """The module docstring's rule, per model and overall: ``prune`` pays on a model iff it is not worse than ``pin``
    (by more than the tolerance) at equal MACs after fine-tuning, at every reachable pair, and it is faster than
    ``pin`` at the same nominal ratio (b32, by the median and by the 10th percentile). The default is ``prune`` iff it
    pays on every model, ``pin`` iff on none, else the per-model verdicts decide (a layout-dependent default)."""
    large, tol = _large(doc), doc["setup"]["tolerance_pp"]
    reasons, pays = [], {m["model"]: True for m in doc["models"]}
    for c in comparisons(doc):
        if "delta_ft_pp" not in c:
            reasons.append(f"{c['model']}: {c['pair']}: {c['note'] or 'missing'}")
            continue
        passed = c["delta_ft_pp"] >= -c["tolerance_pp"]
        pays[c["model"]] &= passed
        reasons.append(f"{c['model']}: {c['pair']} (MAC {c['pin']['mac_ratio']:.3f} vs {c['prune']['mac_ratio']:.3f}): "
                       f"prune − pin = {c['delta_ft_pp']:+.1f} pp after fine-tuning (paired SE {_r(c['se_ft_pp'])} pp, "
                       f"tolerance {c['tolerance_pp']:.2f} pp; {c['delta_pruned_pp']:+.1f} pp right after pruning) "
                       f"→ {'ok' if passed else 'FAILS'}")
    for s in same_ratio(doc):
        if s["pin"] and s["prune"]:
            pin, pr = s["pin"], s["prune"]
            faster = pr["latency_ratio"] < pin["latency_ratio"] and pr["latency_ratio_p10"] < pin["latency_ratio_p10"]
            pays[s["model"]] &= faster
            reasons.append(f"{s['model']}: at {s['ratio']:.0%} b{large} latency ratio prune {pr['latency_ratio']:.3f} "
                           f"(p10 {pr['latency_ratio_p10']:.3f}) vs pin {pin['latency_ratio']:.3f} "
                           f"(p10 {pin['latency_ratio_p10']:.3f}) → {'ok' if faster else 'FAILS'}")
    verdicts = {model: "prune" if ok else "pin" for model, ok in pays.items()}
    default = next(iter(set(verdicts.values()))) if len(set(verdicts.values())) == 1 else "per model"
    return {"default": default, "per_model": verdicts,
            "rule": f"prune pays on a model iff its fine-tuned accuracy (mean over seeds) at equal MACs ≥ pin's − "
                    f"max({tol} pp, 2 × paired SE) at every reachable pair, and its b{large} latency ratio at "
                    f"{REFERENCE_RATIO:.0%} < pin's (median and p10); default prune iff it pays on every model",
            "reasons": reasons}


def derived(doc: dict[str, Any]) -> dict[str, Any]:
    return {"equal_macs": comparisons(doc), "same_ratio": same_ratio(doc), "equal_accuracy": equal_accuracy(doc),
            "decision": decide(doc)}


# ----------------------------------------------------------------------------- tables and plot


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    batches = [str(b) for b in doc["setup"]["latency"]["batches"]]
    seeds = [str(s) for s in doc["setup"]["finetune"]["seeds"]]
    large, rt = _large(doc), doc["setup"]["latency"].get("round_to")
    head = ["model", "mode", "ratio", "point", "MAC ratio", "param ratio", "acc pruned %",
            *(f"acc ft s{s} %" for s in seeds), "acc ft mean %", *(f"b{b} lat ratio" for b in batches),
            f"b{large} lat ratio p10", f"b{large} ms"]
    if rt:
        head += [f"round{rt}: MAC ratio", f"round{rt}: acc pruned %", f"round{rt}: b{large} lat ratio"]
    body = []
    for model in doc["models"]:
        for r in model["rows"]:
            cells = [r["model"], r["mode"], f"{r['ratio']:.1%}" if r["mode"] != "-" else "-", r["point"],
                     _r(r["mac_ratio"]), _r(r["param_ratio"]), _pct(r["accuracy_pruned"]),
                     *(_pct(r["accuracy_ft"][s]) for s in seeds), _pct(r["accuracy_ft_mean"]),
                     *(_r(r["latency_ratio"][b]) for b in batches), _r(r["latency_ratio_p10"][large]),
                     f"{r['latency_ms'][large]:.2f}"]
            if rt:
                rd = r.get("rounded")
                cells += ["-"] * 3 if rd is None else [_r(rd["mac_ratio"]), _pct(rd["accuracy_pruned"]),
                                                       _r(rd["latency_ratio"][large])]
            body.append(cells)
    return head, body


def pair_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    large = _large(doc)
    head = ["model", "pair", "pin ratio", "pin MAC", "pin acc ft %", "prune ratio", "prune MAC", "prune acc ft %",
            "Δ ft pp (prune − pin)", "paired SE pp", "Δ pruned pp", f"b{large} lat pin", f"b{large} lat prune"]
    body = []
    for c in doc["equal_macs"]:
        if "delta_ft_pp" not in c:
            body.append([c["model"], c["pair"], c["note"] or "missing", *[""] * (len(head) - 3)])
            continue
        pin, pr = c["pin"], c["prune"]
        body.append([c["model"], c["pair"], f"{pin['ratio']:.1%}", _r(pin["mac_ratio"]), _pct(pin["accuracy_ft"]),
                     f"{pr['ratio']:.1%}", _r(pr["mac_ratio"]), _pct(pr["accuracy_ft"]), f"{c['delta_ft_pp']:+.1f}",
                     "-" if c.get("se_ft_pp") is None else f"{c['se_ft_pp']:.2f}", f"{c['delta_pruned_pp']:+.1f}",
                     _r(pin["latency_ratio"]), _r(pr["latency_ratio"])])
    return head, body


def buy_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    large = _large(doc)
    head = ["model", "mode @50%", "MAC ratio", "acc ft %", f"b{large} lat ratio", f"b{large} lat ratio p10",
            "cheapest prune point ≥ pin@50% acc ft", "MAC ratio", "acc ft %", f"b{large} lat ratio"]
    body = []
    eq = {e["model"]: e["prune"] for e in doc["equal_accuracy"]}
    for s in doc["same_ratio"]:
        e = eq.get(s["model"])
        for mode in MODES:
            m = s[mode]
            if m is None:
                continue
            tail = [""] * 4 if mode == "pin" else (["none"] + [""] * 3 if e is None else
                                                   [f"prune@{e['ratio']:.1%}", _r(e["mac_ratio"]),
                                                    _pct(e["accuracy_ft"]), _r(e["latency_ratio"])])
            body.append([s["model"], mode, _r(m["mac_ratio"]), _pct(m["accuracy_ft"]), _r(m["latency_ratio"]),
                         _r(m["latency_ratio_p10"]), *tail])
    return head, body


def render(doc: dict[str, Any], console: Console, markdown: bool = False) -> None:
    ft = doc["setup"]["finetune"]
    titles = (f"LayerNorm streams pin vs prune: L1 group plans, fine-tune {ft['epochs']} epochs AdamW lr {ft['lr']} "
              f"(seeds {ft['seeds']}), ORT CPU 1 thread; ratios pruned / original",
              "accuracy at equal MACs", "what prune buys: the same nominal ratio, and equal accuracy")
    for title, (head, body) in zip(titles, (table_rows(doc), pair_rows(doc), buy_rows(doc)), strict=True):
        if markdown:
            console.print(f"\n{title}\n", markup=False, soft_wrap=True)
            console.print("| " + " | ".join(head) + " |", markup=False, highlight=False, soft_wrap=True)
            console.print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|", soft_wrap=True)
            for row in body:
                console.print("| " + " | ".join(row) + " |", markup=False, highlight=False, soft_wrap=True)
            continue
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i < 4 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
    d = doc["decision"]
    console.print(f"\nrule: {d['rule']}", markup=False, soft_wrap=True)
    for reason in d["reasons"]:
        console.print(f"  {reason}", markup=False, soft_wrap=True)
    per_model = ", ".join(f"{m}: {v}" for m, v in d.get("per_model", {}).items())
    console.print(f"recommended default: layernorm_streams={d['default']!r} ({per_model})", markup=False)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Accuracy vs MAC ratio per model (fine-tuned solid, right after pruning faint), one line per mode; b32 latency
    ratio vs MAC ratio for every model and mode."""
    plt = pyplot()
    large = str(max(doc["setup"]["latency"]["batches"]))
    fig, axes = plt.subplots(1, len(doc["models"]) + 1, figsize=(5.2 * (len(doc["models"]) + 1), 4.6), squeeze=False)
    colours = {"pin": "tab:blue", "prune": "tab:red"}
    markers = dict(zip([m["model"] for m in doc["models"]], "osD^v", strict=False))
    lat_ax = axes[0][-1]
    for ax, model in zip(axes[0], doc["models"], strict=False):
        original = model["rows"][0]
        for mode in MODES:
            rows = sorted([original] + [r for r in model["rows"] if r["mode"] == mode], key=lambda r: r["mac_ratio"])
            macs = [r["mac_ratio"] for r in rows]
            ax.plot(macs, [100 * r["accuracy_ft_mean"] for r in rows], "o-", color=colours[mode],
                    label=f"{mode}: fine-tuned")
            ax.plot(macs, [100 * r["accuracy_pruned"] for r in rows], "o--", color=colours[mode], alpha=0.35,
                    label=f"{mode}: right after pruning")
            pts = [(r["mac_ratio"], r["latency_ratio"][large]) for r in rows]
            marker = markers[model["model"]]
            lat_ax.plot(*zip(*pts), marker=marker, color=colours[mode], label=f"{model['model']} {mode}")
            rounded = [(d["mac_ratio"], d["latency_ratio"][large]) for d in (r.get("rounded") for r in rows) if d]
            if rounded:
                lat_ax.scatter(*zip(*rounded), marker=marker, facecolors="none", edgecolors=colours[mode],
                               label=f"{model['model']} {mode}, round_to={doc['setup']['latency']['round_to']}")
        ax.axhline(100 * original["accuracy_ft_mean"], color="k", lw=0.8, ls=":", label="original, fine-tuned")
        ax.set(xlabel="MAC ratio (pruned / original)", ylabel="test accuracy (%)", title=model["model"], xlim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lat_ax.plot([0.05, 1], [0.05, 1], "k--", lw=0.8, label="latency ∝ MACs")
    lat_ax.set_yscale("log")
    lat_ax.set(xlabel="MAC ratio", ylabel=f"b{large} latency ratio (median, log scale)",
               title="ONNX Runtime CPU, 1 thread (hollow: round_to)", xlim=(0, 1.05))
    lat_ax.grid(alpha=0.3)
    lat_ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------- entry point


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help="zoo models")
    parser.add_argument("--ratios", type=_floats, default=[0.3, 0.5, 0.7], help="nominal ratios, both modes")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (every point, the original too)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tune peak learning rate (OneCycle)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=_ints, default=[0, 1], help="fine-tune seeds")
    parser.add_argument("--batches", type=_ints, default=[1, 32], help="ONNX Runtime batch sizes timed")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model and batch (median)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--exporter", default="torchscript", help="export_onnx exporter for every variant")
    parser.add_argument("--round-to", type=int, default=8,
                        help="also time each point's plan with round_to=N (latency only, not fine-tuned; 0: off)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="decision rule: accuracy tolerance in pp")
    parser.add_argument("--quick", action="store_true", help="vit_t, ratio 0.5, 1 seed, 1 epoch, 20 runs")
    parser.add_argument("--render-only", action="store_true", help="re-render from --out's JSON")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: markdown tables")
    parser.add_argument("--out", type=Path, default=RESULTS / "layernorm_default.json")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; use some of: {', '.join(MODELS)}")
    console = Console(width=200)
    if args.render_only:
        doc = rederived(args.out, derived)
        if args.markdown:
            render(doc, console, markdown=True)
            return 0
    else:
        if args.quick:
            args.models, args.ratios, args.seeds, args.epochs, args.runs = ["vit_t"], [0.5], [0], 1, 20
        doc = run_measured(args, console, run, derived)
    show(doc, args, console, render, plot, measured=not args.render_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
