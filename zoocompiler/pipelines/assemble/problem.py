"""Turn traced zoo models into the plain data the DeRy solvers take, and their answers back into blocks.

* :func:`partition_members` — each model's reassembly positions with segment sizes (params or
  per-sample MACs) → ``solvers.partition.partition_zoo`` over the zoo similarity matrix.
* :func:`assembly_options` — every block of the partition as an ILP ``BlockOption`` (params, MACs,
  optional latency, quality), every stage-k → stage-k+1 pair as a ``JoinCost`` (a stitch layer's
  cost and the CKA between what the first block emits and what the second expects; nothing for
  blocks that are contiguous in one model) and every last-stage block's new head.

Surrogate terms (the linear objective the ILP maximises before the re-rank):
``quality`` = the model's accuracy on the *target* task / K — its linear-probe accuracy on the held-out
part of the target's training data when the pipeline passes ``quality`` (default), else its own source
test accuracy (so a zoo model kept whole scores that accuracy), ``compat`` = CKA(output of a, expected
input of b) on the probe images (1 for a direct join). Pairs that cannot be stitched (a flat vector into a
spatial block) are left out of ``joins`` and marked forbidden.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from zoocompiler.core.errors import ZooError
from zoocompiler.passes.rewrite.compose import ChosenBlock, chosen, head_info, joins_directly, stitch_cost
from zoocompiler.solvers.assembly_ilp import Assembly, BlockOption, JoinCost, assembly_of
from zoocompiler.solvers.partition import ModelPositions, Partition, partition_zoo

from ..zoo.members import ZooMember
from ..zoo.similarity import ZooSimilarity

SIZE_METRICS = ("params", "flops")


def model_positions(members: Sequence[ZooMember], sim: ZooSimilarity, size: str = "params") -> list[ModelPositions]:
    """The partition solver's view of each member: global offset and per-segment sizes."""
    if size not in SIZE_METRICS:
        raise ZooError(f"unknown block size metric {size!r}", f"use one of: {', '.join(SIZE_METRICS)}")
    out = []
    for m in members:
        cost = m.params_between if size == "params" else m.macs_between
        sizes = tuple(float(cost(p - 1, p)) for p in range(1, len(m.positions)))
        out.append(ModelPositions(m.name, sim.index(m.name, 0), sizes))
    return out


def partition_members(
    members: Sequence[ZooMember],
    sim: ZooSimilarity,
    *,
    k: int = 4,
    eps: float = 0.2,
    restarts: int = 200,
    seed: int = 0,
    size: str = "params",
    method: str = "dp",
    strict_balance: bool = False,
    distinct: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> Partition:
    """DeRy partition of the zoo into ``k`` blocks per model and ``k`` equivalence sets (``distinct``: each
    model's blocks in ``k`` different sets)."""
    if len(members) < 2:
        raise ZooError(
            f"a reassembly needs at least two zoo models, got {len(members)}", "add models to --zoo (or use demo)"
        )
    if k < 1:
        raise ZooError(f"K must be >= 1, got {k}", "pass -K 4 (the paper's setting)")
    return partition_zoo(
        sim.matrix,
        model_positions(members, sim, size),
        k=k,
        eps=eps,
        restarts=restarts,
        seed=seed,
        method=method,
        size_relax=not strict_balance,
        distinct=distinct,
        progress=progress,
    )


@dataclass
class AssemblyOptions:
    """ILP input for one partition, plus the blocks each option index stands for."""

    blocks: list[ChosenBlock]
    options: list[BlockOption]
    joins: dict[tuple[int, int], JoinCost]
    forbidden: list[tuple[int, int]]
    heads: dict[int, JoinCost]

    def assembly(self, chosen: Sequence[int]) -> Assembly:
        """The assembly of option indices ``chosen`` (stage order), surrogate and totals as the ILP counts them."""
        return assembly_of(self.options, self.joins, self.heads, chosen)

    def whole_models(self) -> dict[str, tuple[int, ...]]:
        """Per zoo model, the option indices of its own K blocks in stage order: the model kept whole."""
        paths: dict[str, list[int]] = {}
        for i, b in enumerate(self.blocks):
            paths.setdefault(b.model, []).append(i)
        return {name: tuple(sorted(idx, key=lambda i: self.blocks[i].stage)) for name, idx in paths.items()}


def _compat(sim: ZooSimilarity, a: ChosenBlock, b: ChosenBlock) -> float:
    return 1.0 if joins_directly(a, b) else sim.similarity(a.model, a.end, b.model, b.start)


def assembly_options(
    partition: Partition,
    members: Sequence[ZooMember],
    sim: ZooSimilarity,
    num_classes: int,
    *,
    latency_ms: Mapping[str, float] | None = None,
    join_latency: Callable[[int], float] | None = None,
    quality: Mapping[str, float] | None = None,
) -> AssemblyOptions:
    """Blocks, joins and heads of ``partition`` as ILP data (see the module docstring).

    ``latency_ms`` maps a block key to its measured latency; ``join_latency(macs)`` estimates a
    stitch's or head's latency. Both are needed only for a latency budget. ``quality`` maps a model name
    to its accuracy on the target (default: its own source accuracy, 0 when unknown).
    """
    by_name = {m.name: m for m in members}
    refs = partition.blocks()
    blocks = [chosen(members, r) for r in refs]
    options = []
    for ref, b in zip(refs, blocks, strict=True):
        m = by_name[b.model]
        options.append(
            BlockOption(
                key=b.key,
                stage=b.stage,
                set=partition.set_of(ref),
                params=float(m.params_between(b.start, b.end)),
                macs=float(m.macs_between(b.start, b.end)),
                latency_ms=None if latency_ms is None else latency_ms[b.key],
                quality=(quality[m.name] if quality is not None else m.accuracy or 0.0) / partition.k,
            )
        )

    def lat(macs: float) -> float | None:
        return None if join_latency is None else join_latency(macs)

    joins: dict[tuple[int, int], JoinCost] = {}
    forbidden: list[tuple[int, int]] = []
    for i, a in enumerate(blocks):
        for j, b in enumerate(blocks):
            if b.stage != a.stage + 1:
                continue
            if joins_directly(a, b):
                joins[i, j] = JoinCost(0.0, 0.0, 0.0 if join_latency else None, 1.0)
                continue
            cost = stitch_cost(by_name[a.model].positions[a.end].tensor, by_name[b.model].positions[b.start].tensor)
            if cost is None:
                forbidden.append((i, j))
                continue
            joins[i, j] = JoinCost(float(cost[0]), float(cost[1]), lat(cost[1]), _compat(sim, a, b))
    heads = {}
    for i, b in enumerate(blocks):
        if b.stage == partition.k - 1:
            params, macs = stitch_cost(by_name[b.model].positions[b.end].tensor, head_info(num_classes))
            heads[i] = JoinCost(float(params), float(macs), lat(macs))
    return AssemblyOptions(blocks, options, joins, forbidden, heads)


@dataclass
class Candidate:
    """One candidate network: ILP assembly (or a zoo model kept whole), its blocks and its proxy scores.

    ``probe`` is the held-out accuracy of its least-squares linear head (stitches LS-fitted too);
    ``naswot`` is computed only when NASWOT is the proxy. ``source`` is "ilp" or "whole".
    """

    assembly: Assembly
    blocks: list[ChosenBlock]
    source: str
    probe: float
    naswot: float | None = None

    def score(self, proxy: str) -> float:
        value = self.probe if proxy == "probe" else self.naswot
        return float("-inf") if value is None else value

    @property
    def key(self) -> str:
        return " → ".join(b.key for b in self.blocks)

    def to_dict(self) -> dict:
        return {"blocks": [b.key for b in self.blocks], "source": self.source, "probe": self.probe,
                "naswot": self.naswot, **self.assembly.to_dict()}
