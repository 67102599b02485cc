"""Deep Model Reassembly end to end on a target task, against its own baselines.

similarity → partition → per-model linear probes on the target → ILP top-M (quality = probe accuracy) →
re-rank (ILP candidates and zoo models kept whole, by held-out linear-probe accuracy or NASWOT) → tune the
best ``tune_top`` and keep the best on the held-out split → baselines (the best single zoo model that fits,
a from-scratch twin of the chosen network; same tuning) → ONNX.

``assemble(config, out_dir)`` writes ``model.onnx`` (parity checked, at ``config.deploy.precision``: fp32,
fp16 or int8 calibrated on the task's training data, see docs/deploy.md), ``report.json``, ``plan.json``,
``assembly.safetensors`` (the kept weights) and three PNG plots into ``out_dir`` and returns the
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
from zoocompiler.data import DataSplit
from zoocompiler.passes.rewrite.compose import (
    AssembledNet,
    ChosenBlock,
    ProbeActivations,
    build_assembly,
    build_body,
)
from zoocompiler.solvers.assembly_ilp import Assembly, fits, solve_assemblies
from zoocompiler.solvers.partition import Partition
from zoocompiler.sources import check_spec_from_file
from zoocompiler.training import evaluate
from zoocompiler.training import train as train_model

from ..base import Executor, LocalExecutor, Progress, Stages, say, write_report
from ..zoo.members import ZooMember, load_members
from ..zoo.similarity import ZooSimilarity, probe_batch, probe_data_key, zoo_similarity
from .config import AssembleConfig
from .naswot import naswot
from .problem import AssemblyOptions, Candidate, assembly_options, partition_members
from .selection import TuneResult, from_scratch, kendall_tau, tune_kept
from .task import TargetTask, load_task, task_image_size

PLAN_VERSION = 2
TRUST_FIX = "pass trust_code=True only if you made that plan yourself from a zoo with this python: spec"


def default_cache_dir() -> Path:
    return cache_dir() / "similarity"


@dataclass
class ZooAnalysis:
    """What partition and assemble share: the target task, the traced zoo, the similarity matrix and the partition."""

    task: TargetTask
    members: list[ZooMember]
    probe: torch.Tensor
    similarity: ZooSimilarity
    partition: Partition

    @property
    def train(self) -> DataSplit:
        """The training data stitches, heads and tuning are fitted on (the task's ``fit`` part)."""
        return self.task.fit

    @property
    def test(self) -> DataSplit:
        return self.task.test

    @property
    def members_by_name(self) -> dict[str, ZooMember]:
        return {m.name: m for m in self.members}


def task_options(config: AssembleConfig) -> dict:
    """How the task is loaded (``task.load_task``'s options, the image size resolved for the zoo): the plan's
    ``task``."""
    return {"image_size": task_image_size(config.data, config.zoo, config.image_size),
            "train_size": config.train_size, "val_fraction": config.val_fraction}


def analyse_zoo(
    config: AssembleConfig, progress: Progress | None = None, executor: Executor | None = None
) -> ZooAnalysis:
    """Load the task and the zoo, compute (or load) the similarity matrix and partition the zoo."""
    task = load_task(config.data, **task_options(config))
    sizes = ", ".join(f"{k} {v}" for k, v in task.sizes().items())
    say(progress, f"task {config.data} at {tuple(task.input_shape)}: {task.num_classes} classes ({sizes})")
    say(progress, f"loading and tracing the zoo ({config.zoo})")
    members = load_members(config.zoo, task.input_shape, executor=executor)
    probe = probe_batch(task.fit, config.probe_fraction, seed=config.seed)
    say(progress, f"cut-point similarity (linear CKA, {config.pool} pooling) on {len(probe)} probe images")
    sim = zoo_similarity(
        {m.name: m.graph for m in members},
        probe,
        pool=config.pool,
        unbiased=config.unbiased_cka,
        cache_dir=config.cache_dir if config.cache_dir is not None else default_cache_dir(),
        data_key=probe_data_key(probe, _data_key(config)),
        executor=executor,
    )
    say(progress, f"partition: K={config.k}, eps={config.eps}, {config.restarts} restarts"
                  f"{', distinct sets' if config.distinct_sets else ''}")
    partition = partition_members(
        members, sim, k=config.k, eps=config.eps, restarts=config.restarts, seed=config.seed, size=config.size,
        distinct=config.distinct_sets,
    )
    return ZooAnalysis(task, members, probe, sim, partition)


def _data_key(config: AssembleConfig) -> str:
    return f"{config.data}@{config.image_size}/{config.train_size}/{config.val_fraction}"


def pickable_per_set(partition: Partition) -> list[dict]:
    """Per equivalence set: its blocks and how many of them some assembly can pick (``Partition.pickable``)."""
    pickable = set(partition.pickable())
    return [{"set": j, "blocks": len(blocks), "pickable": sum(b in pickable for b in blocks)}
            for j, blocks in enumerate(partition.equivalence_sets())]


def member_probes(
    analysis: ZooAnalysis, probes: ProbeActivations, executor: Executor | None = None
) -> dict[str, float]:
    """Each zoo model's linear-probe accuracy on the target: its whole body with a least-squares head fitted on
    ``fit``, evaluated on ``val`` (the ILP's quality term and the whole-model candidates' proxy)."""
    members = analysis.members_by_name
    whole = {m.name: [ChosenBlock(m.name, 0, 0, len(m.positions) - 1)] for m in analysis.members}
    score = functools.partial(_probe_accuracy, members=members, probes=probes, task=analysis.task)
    return dict(zip(whole, (executor or LocalExecutor()).map(score, list(whole.values())), strict=True))


def _probe_accuracy(blocks: list[ChosenBlock], *, members, probes: ProbeActivations, task: TargetTask) -> float:
    return evaluate(_build(blocks, members, probes, task), task.val)


def _build(blocks: list[ChosenBlock], members, probes: ProbeActivations, task: TargetTask) -> AssembledNet:
    """``blocks`` joined by least-squares stitches, with a ridge head fitted on the task's ``fit`` part."""
    return build_assembly(blocks, members, probes, task.fit.x, task.fit.y, task.num_classes)


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
    quality: dict[str, float] | None = None,
) -> list[Candidate]:
    """The ILP's assemblies and, with ``quality`` (the zoo's probe accuracies), every zoo model kept whole that
    fits the budget and is not already among them, best first by ``config.proxy``.

    Each ILP assembly is built (LS stitches, least-squares head on ``fit``) and scored by its ``val`` accuracy
    (``probe``) and, if NASWOT is the proxy, by NASWOT; a whole model's probe accuracy is ``quality``'s.
    ``probes`` lets the caller share the probe-activation cache with later builds (default: a fresh one);
    the candidates are independent items of ``executor`` (default: in-process, in order).
    """
    members = analysis.members_by_name
    probes = probes if probes is not None else ProbeActivations(members, analysis.probe)
    batches = _naswot_batches(analysis.train, config) if config.proxy == "naswot" else None
    score = functools.partial(_score_candidate, opts=opts, members=members, probes=probes, batches=batches,
                              task=analysis.task)
    out = (executor or LocalExecutor()).map(score, assemblies)
    if quality is not None:
        seen = {c.assembly.blocks for c in out}
        for name, path in opts.whole_models().items():
            assembly = opts.assembly(path)
            if path in seen or not fits(assembly, config.budget):
                continue
            blocks = [opts.blocks[i] for i in path]
            nas = None if batches is None else naswot(nn.Sequential(build_body(blocks, members, probes)), batches)
            out.append(Candidate(assembly, blocks, "whole", quality[name], nas))
    return sorted(out, key=lambda c: -c.score(config.proxy))


def _score_candidate(
    assembly: Assembly,
    *,
    opts: AssemblyOptions,
    members: dict[str, ZooMember],
    probes: ProbeActivations,
    batches: list[torch.Tensor] | None,
    task: TargetTask,
) -> Candidate:
    """One ILP candidate: built with LS stitches and a least-squares head, scored on ``val`` (and by NASWOT)."""
    blocks = [opts.blocks[i] for i in assembly.blocks]
    source = "whole" if assembly.blocks in opts.whole_models().values() else "ilp"
    net = _build(blocks, members, probes, task)
    nas = None if batches is None else naswot(net.body, batches)
    return Candidate(assembly, blocks, source, evaluate(net, task.val), nas)


def solve(analysis: ZooAnalysis, config: AssembleConfig, progress: Progress | None = None,
          quality: dict[str, float] | None = None, executor: Executor | None = None):
    """ILP top-M for the config's budget: (AssemblyOptions, assemblies, solver stats); ``quality`` as in
    :func:`problem.assembly_options`. Per-block latencies are measured where ``executor.at_target`` runs (this
    machine or ``--latency-node``)."""
    latency = None
    join_latency = None
    if config.budget.latency_ms is not None:
        from ..zoo.block_latency import block_latencies, fit_join_latency

        say(progress, "measuring per-block latency in ONNX Runtime (cached)")
        latency = (executor or LocalExecutor()).at_target(block_latencies, analysis.members, analysis.partition,
                                                          runs=config.latency_runs)
        join_latency = fit_join_latency(latency, analysis.members, analysis.partition)
    opts = assembly_options(
        analysis.partition,
        analysis.members,
        analysis.similarity,
        analysis.train.num_classes,
        latency_ms=latency,
        join_latency=join_latency,
        quality=quality,
    )
    say(progress, f"assembly ILP (PuLP/CBC): top {config.top} under {config.budget}")
    assemblies, stats = solve_assemblies(
        opts.options, opts.joins, opts.heads, config.budget, top=config.top, forbidden=opts.forbidden
    )
    return opts, assemblies, stats


def tune(net: AssembledNet, train: DataSplit, config: AssembleConfig, mode: str | None = None) -> None:
    """FROZEN-TUNING (stitches + head), FULL-TUNING (everything) or nothing, in place (``mode`` overrides
    ``config.tune``)."""
    mode = mode or config.tune
    if mode == "none":
        return
    if mode == "frozen":
        net.freeze_blocks()
    train_model(net, train, epochs=config.epochs, lr=config.lr, seed=config.seed, desc=f"tune ({mode})")
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
        "task": task_options(config),
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
_SIZE = Where((int, type(None)), lambda i: i is None or i >= 1, "null or an integer >= 1")
PLAN_SCHEMA = {
    "version": OneOf((PLAN_VERSION,)),
    "zoo": ListOf({"name": str, "spec": str, "weights_sha256": str}, 1),
    "data": str,
    "task": {"image_size": _SIZE, "train_size": _SIZE,
             "val_fraction": Where(NUMBER, lambda f: 0 < f < 1, "a fraction in (0, 1)")},
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
    task = load_task(plan["data"], **plan["task"])
    train = task.fit
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

    Stages (timed in ``report["timings"]``): analysis, probe_zoo, ilp, rerank, tune, baselines, export.
    """
    from zoocompiler.exports.deploy import check_deployable

    from .plots import plot_baselines, plot_candidates, plot_similarity

    config.check()
    check_deployable(config.deploy)  # a CUDA provider without a GPU fails before any work
    stages = Stages(progress)
    with stages("analysis"):
        analysis = analyse_zoo(config, progress, executor)
    members = analysis.members_by_name
    probes = ProbeActivations(members, analysis.probe)  # shared by every build below
    with stages("probe_zoo", f"linear probe of each zoo model on {len(analysis.task.val)} held-out images"):
        quality = member_probes(analysis, probes, executor)
    with stages("ilp"):
        opts, assemblies, stats = solve(analysis, config, progress, quality, executor)
    with stages("rerank", f"re-rank of {len(assemblies)} ILP candidates and the whole zoo models by {config.proxy}"):
        candidates = rank_candidates(analysis, opts, assemblies, config, probes, executor, quality)
    with stages("tune", f"{config.tune} tuning of the best {min(config.tune_top, len(candidates))} candidates"):
        top = candidates[: config.tune_top]
        tune_one = functools.partial(_tune_candidate, analysis=analysis, probes=probes, config=config)
        tuned = [(c, *pair) for c, pair in zip(top, (executor or LocalExecutor()).map(tune_one, top), strict=True)]
        best, net, result = max(tuned, key=lambda t: t[2].val)  # first (best proxy) wins a tie
    say(progress, f"chosen: {best.key} (val {result.val:.1%}, test {result.test:.1%}, {result.kept} head)")
    baselines = None
    if config.baselines:
        with stages("baselines", "the best single zoo model that fits, and a from-scratch twin"):
            baselines = _baselines(analysis, candidates, tuned, best, probes, config)
    shape = tuple(analysis.train.input_shape)
    params = count_params(net)
    macs = model_macs(net, shape)
    _check_within(config.budget, params, macs)
    precision = config.deploy.precision
    with stages("export", f"exporting ONNX at {precision} (parity checked) and measuring latency"):
        deploy, latency = export_model(net, analysis.task, out_dir, config, progress, executor)
    export = deploy.export
    plan = plan_dict(analysis, best.blocks, config)
    scores = [c.score(config.proxy) for c, _, _ in tuned]
    report = {
        "chosen": _block_rows(analysis, best, opts),
        "chosen_source": best.source,
        "params": params,
        "macs": macs,
        "latency_ms": latency.median_ms,  # model.onnx as written (at "precision"), ONNX Runtime CPU, batch 1
        "precision": precision,
        "surrogate": best.assembly.surrogate,
        "proxy": config.proxy,
        "probe": best.probe,
        "naswot": best.naswot,
        "accuracy": result.test,
        "accuracy_before_tuning": result.test_before,
        "val_accuracy": result.val,
        "kept_head": result.kept,
        "tune": config.tune,
        "epochs": config.epochs if config.tune != "none" else 0,
        "task": {"data": config.data, "input_shape": list(shape), "num_classes": analysis.task.num_classes,
                 **analysis.task.sizes()},
        "budget": config.budget.to_dict(),
        "budget_use": _budget_use(config.budget, params, macs, latency.median_ms),
        "solver": stats.to_dict(),
        "partition": analysis.partition.to_dict(),
        "sets": pickable_per_set(analysis.partition),
        "zoo_probe": quality,
        "similarity": analysis.similarity.to_dict(),
        "candidates": [c.to_dict() for c in candidates],
        "tuned": [{"blocks": c.key, "source": c.source, "score": c.score(config.proxy), **r.to_dict()}
                  for c, _, r in tuned],
        "kendall_tau": kendall_tau(scores, [r.val for _, _, r in tuned]),
        "baselines": baselines,
        "verdict": _verdict(result.test, baselines, best.blocks[0].model if best.source == "whole" else None),
        # the verified fp32 export every precision derives from; its path is model.onnx when that is what was
        # written (fp32), else "" (relative paths: out_dir is a staging directory here)
        "export": {**export.to_dict(), "path": "model.onnx" if precision == "fp32" else ""},
        "deploy": deploy.to_dict("model.onnx"),
        "data": config.data,
        "zoo": [m.spec for m in analysis.members],
        "timings": stages.timings,
    }
    write_state_dict_atomic(out_dir / "assembly.safetensors", net.state_dict())
    write_text_atomic(out_dir / "plan.json", json.dumps(plan, indent=2))
    plot_similarity(analysis.similarity, analysis.partition, out_dir / "similarity.png")
    plot_candidates(candidates, best, config.proxy, out_dir / "candidates.png")
    if baselines is not None:
        plot_baselines(report, out_dir / "baselines.png")
    write_report(out_dir, report)
    return report


def export_model(net: nn.Module, task: TargetTask, out_dir: Path, config: AssembleConfig,
                 progress: Progress | None = None, executor: Executor | None = None):
    """Write ``out_dir/model.onnx`` at ``config.deploy.precision`` (``export_deployable``: the fp32 export checked
    against PyTorch, int8 calibrated on the task's training data, every precision scored on its test split) and
    measure the written file's ONNX Runtime latency at batch 1 (median of ``config.latency_runs``), both where
    ``executor.at_target`` runs (this machine or ``--latency-node``): the ``(DeployReport, LatencyReport)``.
    ``ZooError`` when that latency exceeds the budget's."""
    from zoocompiler.exports.deploy import export_timed

    deploy, latency = export_timed(net, task.test.x[:2], out_dir / "model.onnx", config.deploy,
                                   runs=config.latency_runs, at=(executor or LocalExecutor()).at_target,
                                   calibration=task.fit.x, evaluation=(task.test.x, task.test.y), progress=progress)
    limit = config.budget.latency_ms
    if limit is not None and latency.median_ms > limit:
        raise ZooError(
            f"the chosen assembly measures {latency.median_ms:.3f} ms ({deploy.precision} model.onnx, batch 1) > "
            f"latency budget {limit} ms",
            "raise the latency budget or re-run (per-block latencies are cached, measured in fp32, and may be stale)",
        )
    return deploy, latency


def _tune_candidate(
    cand: Candidate, analysis: ZooAnalysis, probes: ProbeActivations, config: AssembleConfig, mode: str | None = None
) -> tuple[AssembledNet, TuneResult]:
    net = _build(cand.blocks, analysis.members_by_name, probes, analysis.task)
    mode = mode or config.tune
    return net, tune_kept(net, analysis.task, mode, lambda n, fit: tune(n, fit, config, mode))


def _baselines(analysis: ZooAnalysis, candidates: list[Candidate], tuned: list, best: Candidate,
               probes: ProbeActivations, config: AssembleConfig) -> dict:
    """(a) the zoo model kept whole that fits the budget with the best probe accuracy, tuned like the candidates
    (re-used when it was one of them); (b) a from-scratch twin of the chosen network, all weights trained for the
    same epochs (``full``; ``none`` leaves its least-squares head)."""
    wholes = [c for c in candidates if c.source == "whole"]
    single = None
    if wholes:
        top = max(wholes, key=lambda c: c.probe)
        done = {c.assembly.blocks: r for c, _, r in tuned}
        result = done.get(top.assembly.blocks) or _tune_candidate(top, analysis, probes, config)[1]
        single = {"model": top.blocks[0].model, "params": top.assembly.params, "macs": top.assembly.macs,
                  "probe": top.probe, **result.to_dict()}
    last = best.blocks[-1]
    features = analysis.members_by_name[last.model].positions[last.end].tensor
    untuned = _build(best.blocks, analysis.members_by_name, probes, analysis.task)
    twin, not_reset = from_scratch(untuned, features, analysis.task, config.seed)
    mode = "none" if config.tune == "none" else "full"
    result = tune_kept(twin, analysis.task, mode, lambda n, fit: tune(n, fit, config, mode))
    scratch = {"blocks": best.key, "params": count_params(twin), "tune": mode, "not_reset": not_reset,
               **result.to_dict()}
    return {"single": single, "scratch": scratch,
            "single_note": None if single else "no zoo model fits the budget on its own"}


def _verdict(accuracy: float, baselines: dict | None, whole: str | None = None) -> dict:
    """Test-accuracy margins of the chosen network over the baselines and a sentence that says who wins
    (``whole``: the zoo model the chosen network keeps whole, if it does)."""
    if baselines is None:
        return {"message": "baselines not evaluated (--no-baselines)"}
    out: dict = {}
    parts = []
    for name, label in (("single", "the best single zoo model"), ("scratch", "the from-scratch twin")):
        base = baselines[name]
        if base is None:
            parts.append(f"{label}: none fits the budget")
            continue
        margin = accuracy - base["test"]
        out[f"vs_{name}"] = margin
        if name == "single" and whole is not None and whole == base.get("model"):
            parts.append(f"is {label} ({whole}, kept whole: no reassembly beat it on held-out data)")
            continue
        word = "beats" if margin > 0 else "ties" if margin == 0 else "LOSES TO"
        parts.append(f"{word} {label} ({accuracy:.1%} vs {base['test']:.1%})")
    out["loses"] = [k[3:] for k, v in out.items() if v < 0]
    out["message"] = "the chosen network " + "; ".join(parts)
    return out


def _check_within(budget: Budget, params: int, macs: int) -> None:
    """The built network's own counts must respect the budget (the ILP's sums are re-verified, not trusted)."""
    for name, limit, value in (("params", budget.params, params), ("MACs", budget.macs, macs)):
        if limit is not None and value > limit:
            raise ZooError(
                f"internal check: the built assembly has {value} {name} > budget {limit:g}",
                "report this bug with --debug output",
            )
