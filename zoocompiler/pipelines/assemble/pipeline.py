"""Deep Model Reassembly end to end: similarity → partition → ILP top-M → NASWOT re-rank → build → tune → ONNX.

``assemble(config, out_dir)`` writes ``model.onnx`` (parity checked), ``report.json``, ``plan.json``,
``assembly.safetensors`` (the tuned weights) and two PNG plots into ``out_dir`` and returns the
report. ``rebuild(plan)`` rebuilds the untuned assembly from the zoo and the data (a ``python:`` zoo spec
in the plan is refused unless ``trust_code``: a plan file is data and may not import code).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from zoocompiler.core.atomic import write_state_dict_atomic, write_text_atomic
from zoocompiler.core.budget import Budget
from zoocompiler.core.cache import cache_dir, weights_hash
from zoocompiler.core.errors import ZooError
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.core.schema import NUMBER, ListOf, OneOf, Where, check, load_json
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.passes.rewrite.compose import AssembledNet, ChosenBlock, ProbeActivations, build_assembly, build_body
from zoocompiler.solvers.assembly_ilp import Assembly, solve_assemblies
from zoocompiler.solvers.partition import Partition
from zoocompiler.sources import check_spec_from_file
from zoocompiler.training import train as train_model

from ..base import Executor, LocalExecutor, Progress, Stages, say, write_report
from ..zoo.members import ZooMember, load_members
from ..zoo.similarity import ZooSimilarity, probe_batch, probe_data_key, zoo_similarity
from .config import AssembleConfig
from .naswot import naswot
from .problem import AssemblyOptions, Candidate, assembly_options, partition_members

PLAN_VERSION = 1
TRUST_FIX = "pass trust_code=True only if you made that plan yourself from a zoo with this python: spec"


def default_cache_dir() -> Path:
    return cache_dir() / "similarity"


@dataclass
class ZooAnalysis:
    """What partition and assemble share: the data, the traced zoo, the similarity matrix and the partition."""

    train: DataSplit
    test: DataSplit
    members: list[ZooMember]
    probe: torch.Tensor
    similarity: ZooSimilarity
    partition: Partition

    @property
    def members_by_name(self) -> dict[str, ZooMember]:
        return {m.name: m for m in self.members}


def analyse_zoo(
    config: AssembleConfig, progress: Progress | None = None, executor: Executor | None = None
) -> ZooAnalysis:
    """Load the data and the zoo, compute (or load) the similarity matrix and partition the zoo."""
    train = load_dataset(config.data, "train")
    test = load_dataset(config.data, "test")
    say(progress, f"loading and tracing the zoo ({config.zoo}) at input {tuple(train.input_shape)}")
    members = load_members(config.zoo, train.input_shape)
    probe = probe_batch(train, config.probe_fraction, seed=config.seed)
    say(progress, f"cut-point similarity (linear CKA) on {len(probe)} probe images")
    sim = zoo_similarity(
        {m.name: m.graph for m in members},
        probe,
        pool=config.pool,
        unbiased=config.unbiased_cka,
        cache_dir=config.cache_dir if config.cache_dir is not None else default_cache_dir(),
        data_key=probe_data_key(probe, config.data),
        executor=executor,
    )
    say(progress, f"partition: K={config.k}, eps={config.eps}, {config.restarts} restarts"
                  f"{', distinct sets' if config.distinct_sets else ''}")
    partition = partition_members(
        members, sim, k=config.k, eps=config.eps, restarts=config.restarts, seed=config.seed, size=config.size,
        distinct=config.distinct_sets,
    )
    return ZooAnalysis(train, test, members, probe, sim, partition)


def _naswot_batches(train: DataSplit, config: AssembleConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(config.seed + 1)
    idx = torch.randperm(len(train), generator=g)[: config.naswot_batches * config.naswot_batch_size]
    return list(train.x[idx].split(config.naswot_batch_size))


def rank_candidates(
    analysis: ZooAnalysis,
    opts: AssemblyOptions,
    assemblies: list[Assembly],
    config: AssembleConfig,
    probes: ProbeActivations | None = None,
    executor: Executor | None = None,
) -> list[Candidate]:
    """Build each ILP assembly's body with LS-initialised stitches and score it with NASWOT (best first).

    ``probes`` lets the caller share the probe-activation cache with later builds (default: a fresh one);
    the candidates are independent items of ``executor`` (default: in-process, in order).
    """
    members = analysis.members_by_name
    probes = probes if probes is not None else ProbeActivations(members, analysis.probe)
    score = functools.partial(
        _score_candidate, opts=opts, members=members, probes=probes, batches=_naswot_batches(analysis.train, config)
    )
    out = (executor or LocalExecutor()).map(score, assemblies)
    return sorted(out, key=lambda c: -c.naswot)


def _score_candidate(
    assembly: Assembly,
    *,
    opts: AssemblyOptions,
    members: dict[str, ZooMember],
    probes: ProbeActivations,
    batches: list[torch.Tensor],
) -> Candidate:
    """One candidate: its body built with LS-initialised stitches, scored by NASWOT."""
    blocks = [opts.blocks[i] for i in assembly.blocks]
    body = nn.Sequential(build_body(blocks, members, probes))
    return Candidate(assembly, blocks, naswot(body, batches))


def solve(analysis: ZooAnalysis, config: AssembleConfig, progress: Progress | None = None):
    """ILP top-M for the config's budget: (AssemblyOptions, assemblies, solver stats)."""
    latency = None
    join_latency = None
    if config.budget.latency_ms is not None:
        from ..zoo.block_latency import block_latencies, fit_join_latency

        say(progress, "measuring per-block latency in ONNX Runtime (cached)")
        latency = block_latencies(analysis.members, analysis.partition, runs=config.latency_runs)
        join_latency = fit_join_latency(latency, analysis.members, analysis.partition)
    opts = assembly_options(
        analysis.partition,
        analysis.members,
        analysis.similarity,
        analysis.train.num_classes,
        latency_ms=latency,
        join_latency=join_latency,
    )
    say(progress, f"assembly ILP (PuLP/CBC): top {config.top} under {config.budget}")
    assemblies, stats = solve_assemblies(
        opts.options, opts.joins, opts.heads, config.budget, top=config.top, forbidden=opts.forbidden
    )
    return opts, assemblies, stats


def tune(net: AssembledNet, train: DataSplit, config: AssembleConfig) -> None:
    """FROZEN-TUNING (stitches + head), FULL-TUNING (everything) or nothing, in place."""
    if config.tune == "none":
        return
    if config.tune == "frozen":
        net.freeze_blocks()
    train_model(net, train, epochs=config.epochs, lr=config.lr, seed=config.seed, desc=f"tune ({config.tune})")
    net.requires_grad_(True)
    net.frozen = ()
    net.eval()


def model_macs(net: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    return count_macs(net, input_shape, eval=True)


def plan_dict(analysis: ZooAnalysis, blocks: list[ChosenBlock], config: AssembleConfig) -> dict:
    """Everything needed to rebuild the (untuned) assembly from the zoo and the data."""
    members = analysis.members_by_name
    return {
        "version": PLAN_VERSION,
        "zoo": [{"name": m.name, "spec": m.spec, "weights_sha256": weights_hash(m.module)} for m in analysis.members],
        "data": config.data,
        "num_classes": analysis.train.num_classes,
        "input_shape": list(analysis.train.input_shape),
        "probe": {"fraction": config.probe_fraction, "seed": config.seed},
        "blocks": [
            {
                **b.to_dict(),
                "start_node": members[b.model].positions[b.start].node,
                "end_node": members[b.model].positions[b.end].node,
            }
            for b in blocks
        ],
    }


_INDEX = Where(int, lambda i: i >= 0, "an integer >= 0")
PLAN_SCHEMA = {
    "version": OneOf((PLAN_VERSION,)),
    "zoo": ListOf({"name": str, "spec": str, "weights_sha256": str}, 1),
    "data": str,
    "num_classes": Where(int, lambda n: n >= 2, "an integer >= 2"),
    "probe": {"fraction": Where(NUMBER, lambda f: 0 < f <= 1, "a fraction in (0, 1]"), "seed": int},
    "blocks": ListOf({"model": str, "stage": _INDEX, "start": _INDEX, "end": _INDEX, "start_node": str,
                      "end_node": str}, 1),
}
PLAN_FIX = "pass the plan.json written by zoocompile assemble, or re-run it"


def read_plan(path: str | Path) -> dict:
    """``plan.json`` read and checked against :data:`PLAN_SCHEMA` (``ZooError`` naming the file and field)."""
    return load_json(path, PLAN_SCHEMA, what="assembly plan", fix=PLAN_FIX)


def rebuild(plan: dict, progress: Progress | None = None, *, trust_code: bool = False,
            source: str | Path = "plan.json") -> AssembledNet:
    """The untuned assembly of ``plan`` (stitches and head refitted exactly as ``assemble`` did before tuning).

    ``plan`` is data (``plan.json``, read from ``source``): it is checked against :data:`PLAN_SCHEMA` and every
    zoo spec is checked before anything is loaded; a ``python:`` spec (it imports and calls code) is a
    ``ZooError`` unless ``trust_code`` — pass it only for a plan you made yourself from such a zoo."""
    from ..zoo.members import load_member

    check(plan, PLAN_SCHEMA, source, what="assembly plan", fix=PLAN_FIX)
    zoo = plan["zoo"]
    names = {entry["name"] for entry in zoo}
    for i, b in enumerate(plan["blocks"]):
        if b["model"] not in names:
            raise ZooError(f"assembly plan {source} is malformed: blocks[{i}].model {b['model']!r} is not in its zoo",
                           PLAN_FIX)
    for i, entry in enumerate(zoo):
        check_spec_from_file(entry.get("spec"), f"plan.json zoo[{i}].spec", trust_code=trust_code, fix=TRUST_FIX)
    train = load_dataset(plan["data"], "train")
    members = {}
    for entry in plan["zoo"]:
        if not any(b["model"] == entry["name"] for b in plan["blocks"]):
            continue
        say(progress, f"loading {entry['spec']}")
        member = load_member(entry["spec"], train.input_shape)
        if weights_hash(member.module) != entry["weights_sha256"]:
            raise ZooError(
                f"zoo model {entry['spec']} has other weights than the plan was made with",
                "rebuild with the same zoo weights, or re-run zoocompile assemble",
            )
        members[member.name] = member
    blocks = [ChosenBlock(b["model"], b["stage"], b["start"], b["end"]) for b in plan["blocks"]]
    for b, raw in zip(blocks, plan["blocks"], strict=True):
        m = members[b.model]
        if max(b.start, b.end) >= len(m.positions):
            raise ZooError(f"block {b.key} of {source} has cut points beyond the {len(m.positions)} of {b.model}",
                           PLAN_FIX)
        if (m.positions[b.start].node, m.positions[b.end].node) != (raw["start_node"], raw["end_node"]):
            raise ZooError(f"block {b.key} no longer starts/ends at the plan's cut points", "re-run assemble")
    probe = probe_batch(train, plan["probe"]["fraction"], seed=plan["probe"]["seed"])
    return build_assembly(blocks, members, ProbeActivations(members, probe), train.x, train.y, plan["num_classes"])


def _budget_use(budget: Budget, params: float, macs: float, latency: float | None) -> dict:
    use = {}
    for key, limit, value in (("params", budget.params, params), ("macs", budget.macs, macs)):
        if limit is not None:
            use[key] = value / limit
    if budget.latency_ms is not None and latency is not None:
        use["latency_ms"] = latency / budget.latency_ms
    return use


def _block_rows(analysis: ZooAnalysis, cand: Candidate, opts: AssemblyOptions) -> list[dict]:
    members = analysis.members_by_name
    rows = []
    for index, b in zip(cand.assembly.blocks, cand.blocks, strict=True):
        m = members[b.model]
        o = opts.options[index]
        rows.append(
            {
                "stage": b.stage,
                "set": o.set,
                "model": b.model,
                "cut_range": [m.positions[b.start].node, m.positions[b.end].node],
                "positions": [b.start, b.end],
                "params": int(o.params),
                "macs": int(o.macs),
            }
        )
    return rows


def assemble(
    config: AssembleConfig, out_dir: Path, progress: Progress | None = None, executor: Executor | None = None
) -> dict:
    """Run DeRy end to end and write its outputs into ``out_dir`` (which must exist); returns the report.

    Stages (timed in ``report["timings"]``): analysis, ilp, rerank, build_tune, export.
    """
    from zoocompiler.exports.latency import measure_latency
    from zoocompiler.exports.onnx_export import export_onnx
    from zoocompiler.training import evaluate

    from .plots import plot_candidates, plot_similarity

    config.check()
    stages = Stages(progress)
    with stages("analysis"):
        analysis = analyse_zoo(config, progress, executor)
    with stages("ilp"):
        opts, assemblies, stats = solve(analysis, config, progress)
    batches = f"{config.naswot_batches}×{config.naswot_batch_size}"
    with stages("rerank", f"NASWOT re-rank of {len(assemblies)} stitched candidates ({batches} images)"):
        members = analysis.members_by_name
        probes = ProbeActivations(members, analysis.probe)  # shared: the chosen build reuses the re-rank's activations
        candidates = rank_candidates(analysis, opts, assemblies, config, probes, executor)
    best = candidates[0]
    with stages("build_tune"):
        train = analysis.train
        net = build_assembly(best.blocks, members, probes, train.x, train.y, train.num_classes)
        acc_untuned = evaluate(net, analysis.test)
        say(progress, f"chosen: {' → '.join(b.key for b in best.blocks)} (linear-probe head: {acc_untuned:.1%})")
        tune(net, analysis.train, config)
        acc = evaluate(net, analysis.test)
    shape = tuple(analysis.train.input_shape)
    params = count_params(net)
    macs = model_macs(net, shape)
    _check_within(config.budget, params, macs)
    with stages("export", "exporting ONNX (parity checked) and measuring latency"):
        onnx_path = out_dir / "model.onnx"
        export = export_onnx(net, analysis.test.x[:2], onnx_path)
        latency = measure_latency(onnx_path, (1, *shape), runs=config.latency_runs)
    if config.budget.latency_ms is not None and latency.median_ms > config.budget.latency_ms:
        raise ZooError(
            f"the chosen assembly measures {latency.median_ms:.3f} ms > latency budget {config.budget.latency_ms} ms",
            "raise the latency budget or re-run (per-block latencies are cached and may be stale)",
        )
    blocks = _block_rows(analysis, best, opts)
    plan = plan_dict(analysis, best.blocks, config)
    report = {
        "chosen": blocks,
        "params": params,
        "macs": macs,
        "latency_ms": latency.median_ms,
        "surrogate": best.assembly.surrogate,
        "naswot": best.naswot,
        "accuracy": acc,
        "accuracy_before_tuning": acc_untuned,
        "tune": config.tune,
        "epochs": config.epochs if config.tune != "none" else 0,
        "budget": config.budget.to_dict(),
        "budget_use": _budget_use(config.budget, params, macs, latency.median_ms),
        "solver": stats.to_dict(),
        "partition": analysis.partition.to_dict(),
        "similarity": analysis.similarity.to_dict(),
        "candidates": [c.to_dict() for c in candidates],
        "export": export.to_dict(),
        "data": config.data,
        "zoo": [m.spec for m in analysis.members],
        "timings": stages.timings,
    }
    write_state_dict_atomic(out_dir / "assembly.safetensors", net.state_dict())
    write_text_atomic(out_dir / "plan.json", json.dumps(plan, indent=2))
    plot_similarity(analysis.similarity, analysis.partition, out_dir / "similarity.png")
    plot_candidates(candidates, best, out_dir / "candidates.png")
    write_report(out_dir, report)
    return report


def _check_within(budget: Budget, params: int, macs: int) -> None:
    """The built network's own counts must respect the budget (the ILP's sums are re-verified, not trusted)."""
    for name, limit, value in (("params", budget.params, params), ("MACs", budget.macs, macs)):
        if limit is not None and value > limit:
            raise ZooError(
                f"internal check: the built assembly has {value} {name} > budget {limit:g}",
                "report this bug with --debug output",
            )
