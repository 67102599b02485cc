"""DeRy reassembly as a 0-1 integer program (paper Eqs. 8-11), solved with PuLP + CBC; top-M by no-good cuts.

Input is plain data: ``BlockOption`` per candidate block (stage index, equivalence set, costs, a quality
term), ``JoinCost`` per pair of blocks in consecutive stages (the stitch layer between them) and per
last-stage block (the new head), and a ``Budget``. With K stages (and K sets) the program is::

    z_b ∈ {0, 1}                       block b is chosen
    y_ab ∈ [0, 1]                      a (stage k) is followed by b (stage k+1); set(a) ≠ set(b)
    Σ_{b ∈ set j}   z_b = 1            for j = 0..K-1      (Eq. 10: one block per equivalence set)
    Σ_{b ∈ stage k} z_b = 1            for k = 0..K-1      (Eq. 11: one block per stage index)
    Σ_b y_ab = z_a,  Σ_a y_ab = z_b    for every pair of consecutive stages (flow linearisation)
    Σ_b z_b cost_b + Σ_ab y_ab join_ab.cost + Σ_{b ∈ stage K-1} z_b head_b.cost ≤ C
                                       for each metric the budget names (params, macs, latency_ms)
    max Σ_b quality_b z_b + compat_weight · Σ_ab compat_ab y_ab

With z integral, the flow constraints force y_ab = z_a·z_b exactly (exactly one a and one b per stage
are 1), so y is continuous and adds no branching. Pairs within one set are left out (they can never
both be chosen). The paper replaces the task performance P_T by a training-free proxy; here the
surrogate is linear (per-block quality plus pairwise compatibility) and candidates are re-ranked
afterwards (e.g. by NASWOT, see ``pipelines/assemble/naswot.py``).

Before CBC runs, blocks and pairs whose cheapest completion already exceeds a bound are fixed to 0 or left
out (a lower bound by dynamic programming over the stage DAG, ignoring the sets; costs are non-negative).
On tight budgets this shrinks the program several-fold; on a 30-model K=4 zoo top-20 takes ~2-5 s.

Top-M: after each optimal solve a no-good cut Σ_{b ∈ chosen} z_b ≤ K-1 removes that assembly and the
program is solved again, so assemblies come out in non-increasing surrogate order. Budget rows are
scaled by 1/C; every returned assembly is re-checked against the budget in exact arithmetic (a
solver-tolerance violation is cut off, never returned).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pulp

from ..core.budget import BUDGET_TOLERANCE, METRIC_KEY, METRIC_LABEL, METRICS, Budget, human_metric
from ..core.errors import InfeasibleBudgetError, SolverError

# Measured on a 30-model K=4 zoo: CBC's root heuristics, preprocessing, strong branching and cut generators cost
# more than they save on these small programs (top-20 in ~2.7 s instead of ~16 s); optimality is still proven.
_CBC_OPTIONS = ("heuristicsOnOff off", "preprocess off", "strongBranching 0", "cutsOnOff off")


@dataclass(frozen=True)
class BlockOption:
    """One candidate block: its stage index, equivalence set, costs and surrogate quality term."""

    key: str  # e.g. "resnet_s[3:17]" (unique)
    stage: int  # 0..K-1
    set: int  # equivalence set 0..K-1
    params: float
    macs: float
    latency_ms: float | None = None
    quality: float = 0.0  # per-block surrogate term (higher is better)


@dataclass(frozen=True)
class JoinCost:
    """What joins two blocks (a stitch layer) or follows the last one (the new head)."""

    params: float = 0.0
    macs: float = 0.0
    latency_ms: float | None = None
    compat: float = 0.0  # pairwise surrogate term (e.g. CKA of a's output and b's input); unused for heads


@dataclass
class Assembly:
    """One reassembled model: block indices in stage order, its surrogate and its total costs."""

    blocks: tuple[int, ...]  # indices into the BlockOption list, in stage order 0..K-1
    surrogate: float
    params: float  # totals include joins and the head
    macs: float
    latency_ms: float | None  # None when some block, join or head has no latency

    def keys(self, options: Sequence[BlockOption]) -> list[str]:
        """The block keys, in stage order."""
        return [options[i].key for i in self.blocks]

    def to_dict(self) -> dict:
        return {
            "blocks": list(self.blocks),
            "surrogate": self.surrogate,
            "params": self.params,
            "macs": self.macs,
            "latency_ms": self.latency_ms,
        }


@dataclass
class SolverStats:
    """How the search went. status: optimal (``top`` found), exhausted (every feasible assembly found,
    fewer than ``top``) or time_limit (stopped by ``time_limit``; the last one may be unproven)."""

    status: str
    solves: int
    seconds: float
    variables: int
    constraints: int
    cuts: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def infeasible_budget(budget: Budget, minimum: dict[str, float]) -> InfeasibleBudgetError:
    """The error for a budget no assembly fits, naming the cheapest total per metric (each on its own)."""
    least = ", ".join(f"{METRIC_LABEL[m]}={human_metric(v, m, round_up=True)}" for m, v in minimum.items())
    short = [m for m, v in budget.to_dict().items() if m in minimum and v < minimum[m]]
    if short:
        cause = f"no assembly fits the budget {budget}: the smallest for this zoo is {least} (each metric alone)"
        fix = "raise the budget to at least that (together the metrics may need more) or add smaller models"
    else:
        cause = f"no assembly fits all of the budget {budget} at once (each metric alone fits: {least})"
        fix = "raise one of the bounds or add smaller models"
    return InfeasibleBudgetError(cause, fix, budget=budget, minimum=minimum)


def solve_assemblies(
    blocks: Sequence[BlockOption],
    joins: Mapping[tuple[int, int], JoinCost],
    heads: Mapping[int, JoinCost],
    budget: Budget,
    *,
    top: int = 20,
    compat_weight: float = 1.0,
    time_limit: float | None = None,
    threads: int = 1,
    forbidden: Collection[tuple[int, int]] = (),
) -> tuple[list[Assembly], SolverStats]:
    """The ``top`` best assemblies under ``budget``, in solve order (non-increasing surrogate).

    ``joins`` must hold every (a, b) with stage(b) = stage(a) + 1 and set(a) ≠ set(b) (other keys are
    ignored) except the ``forbidden`` pairs, which no assembly may contain (blocks that cannot be joined);
    ``heads`` every last-stage block. Raises ``InfeasibleBudgetError`` when nothing fits the
    budget, ``SolverError`` for missing joins/heads/latencies or sets that cannot cover the stages.
    ``time_limit`` (seconds) bounds the whole search; ``threads`` is CBC's (1 keeps ties deterministic).
    """
    if top < 1:
        raise SolverError(f"top={top} asks for no assembly", "pass top >= 1")
    if not math.isfinite(compat_weight):
        raise SolverError(f"compat_weight={compat_weight} is not finite", "pass a finite weight (default 1.0)")
    problem = _Problem(blocks, joins, heads, set(forbidden))
    if budget.latency_ms is not None:
        problem.require_latency()
    start = time.perf_counter()
    prob, z, y = problem.lp("assembly", pulp.LpMaximize, budget)
    prob += problem.surrogate_expr(z, y, compat_weight)
    found: list[Assembly] = []
    solves = cuts = 0
    status = "exhausted"
    while len(found) < top:
        remaining = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if remaining is not None and remaining <= 0:
            status = "time_limit"
            break
        outcome = _solve(prob, threads, remaining)
        solves += 1
        if outcome == "infeasible":
            break
        if outcome == "no_solution":
            status = "time_limit"
            break
        chosen = problem.chosen(z)
        prob += pulp.lpSum(z[i] for i in chosen) <= problem.stages_count - 1, f"cut_{cuts}"
        cuts += 1
        assembly = problem.assembly(chosen, compat_weight)
        if fits(assembly, budget):
            found.append(assembly)
        if outcome == "time_limit":
            status = "time_limit"
            break
    else:
        status = "optimal"
    if not found and status == "time_limit":
        raise SolverError(f"CBC found no assembly within time_limit={time_limit} s", "raise time_limit or drop it")
    if not found:
        minimum = {m: problem.cheapest(m) for m in METRICS if m != "latency_ms" or problem.has_latency()}
        raise infeasible_budget(budget, minimum)
    stats = SolverStats(
        status=status,
        solves=solves,
        seconds=time.perf_counter() - start,
        variables=len(z) + len(y),
        constraints=prob.numConstraints(),
        cuts=cuts,
    )
    return found, stats


def cheapest(
    blocks: Sequence[BlockOption],
    joins: Mapping[tuple[int, int], JoinCost],
    heads: Mapping[int, JoinCost],
    metric: str,
    forbidden: Collection[tuple[int, int]] = (),
) -> float:
    """Minimum total ``metric`` (params, macs/flops, latency_ms/latency) over structurally valid assemblies."""
    name = METRIC_KEY.get(metric)
    if name is None:
        raise SolverError(f"unknown cost metric {metric!r}", "use one of: params, macs (flops), latency_ms")
    problem = _Problem(blocks, joins, heads, set(forbidden))
    if name == "latency_ms":
        problem.require_latency()
    return problem.cheapest(name)


class _Problem:
    """Validated assembly data plus the shared constraint structure of every program built from it."""

    def __init__(
        self,
        blocks: Sequence[BlockOption],
        joins: Mapping[tuple[int, int], JoinCost],
        heads: Mapping[int, JoinCost],
        forbidden: Collection[tuple[int, int]] = (),
    ):
        self.blocks = list(blocks)
        if not self.blocks:
            raise SolverError("no candidate blocks", "partition at least one model before assembling")
        _check_numbers(self.blocks)
        keys = [b.key for b in self.blocks]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise SolverError(f"block key {dup!r} is not unique", "give every BlockOption its own key")
        self.stages_count = max(b.stage for b in self.blocks) + 1
        self.stages = _group(self.blocks, "stage", self.stages_count)
        self.sets = _group(self.blocks, "set", self.stages_count)
        self.pairs = [
            (a, b)
            for k in range(self.stages_count - 1)
            for a in self.stages[k]
            for b in self.stages[k + 1]
            if self.blocks[a].set != self.blocks[b].set and (a, b) not in forbidden
        ]
        missing = [p for p in self.pairs if p not in joins]
        if missing:
            a, b = missing[0]
            raise SolverError(
                f"no join cost for blocks {keys[a]!r} → {keys[b]!r} (pair {a}, {b}; {len(missing)} pairs missing)",
                "pass a JoinCost for every pair of blocks in consecutive stages (JoinCost() when nothing joins them)",
            )
        last = self.stages[-1]
        missing_heads = [b for b in last if b not in heads]
        if missing_heads:
            raise SolverError(
                f"no head cost for last-stage block {keys[missing_heads[0]]!r} ({len(missing_heads)} missing)",
                "pass a JoinCost in heads for every block of the last stage (JoinCost() for a free head)",
            )
        self.joins = {p: joins[p] for p in self.pairs}
        self.heads = {b: heads[b] for b in last}
        _check_numbers(list(self.joins.values()) + list(self.heads.values()))

    def has_latency(self) -> bool:
        return not self._missing_latency()

    def require_latency(self) -> None:
        missing = self._missing_latency()
        if missing:
            raise SolverError(
                f"latency budget but no latency_ms for {missing[0]} ({len(missing)} items missing)",
                "measure latency for every block, join and head, or drop latency from the budget",
            )

    def _missing_latency(self) -> list[str]:
        keys = [b.key for b in self.blocks]
        missing = [f"block {b.key!r}" for b in self.blocks if b.latency_ms is None]
        missing += [f"join {keys[a]!r} → {keys[b]!r}" for (a, b), j in self.joins.items() if j.latency_ms is None]
        missing += [f"head of {keys[b]!r}" for b, h in self.heads.items() if h.latency_ms is None]
        return missing

    def lp(self, name: str, sense: int, budget: Budget | None = None) -> tuple[pulp.LpProblem, list, dict]:
        """A program with the structure constraints (sets, stages, flow) and the budget rows, no objective.

        Blocks and pairs that cannot be part of any assembly within the budget (by ``_lower_bounds``) are
        fixed to 0 (blocks) or left out (pairs) before CBC sees them.
        """
        excluded_blocks, excluded_pairs = self._over_budget(budget) if budget is not None else (set(), set())
        prob = pulp.LpProblem(name, sense)
        z = [  # binary; an excluded block gets the upper bound 0 (LpBinary would reset it to 1)
            prob.add_variable(f"z_{i}", 0, 0 if i in excluded_blocks else 1, cat=pulp.LpInteger)
            for i in range(len(self.blocks))
        ]
        y = {(a, b): prob.add_variable(f"y_{a}_{b}", 0, 1) for a, b in self.pairs if (a, b) not in excluded_pairs}
        for j, members in enumerate(self.sets):
            prob += pulp.lpSum(z[i] for i in members) == 1, f"set_{j}"
        for k, members in enumerate(self.stages):
            prob += pulp.lpSum(z[i] for i in members) == 1, f"stage_{k}"
        outgoing: dict[int, list] = defaultdict(list)
        incoming: dict[int, list] = defaultdict(list)
        for (a, b), var in y.items():
            outgoing[a].append(var)
            incoming[b].append(var)
        for k in range(self.stages_count - 1):
            for a in self.stages[k]:
                prob += pulp.lpSum(outgoing[a]) - z[a] == 0, f"out_{a}"
            for b in self.stages[k + 1]:
                prob += pulp.lpSum(incoming[b]) - z[b] == 0, f"in_{b}"
        for metric, bound in (budget.to_dict() if budget is not None else {}).items():
            prob += self.cost_expr(metric, z, y) * (1.0 / bound) <= 1.0, f"budget_{metric}"
        return prob, z, y

    def _over_budget(self, budget: Budget) -> tuple[set[int], set[tuple[int, int]]]:
        """Blocks and pairs whose cheapest completion already exceeds some bound of ``budget``."""
        blocks: set[int] = set()
        pairs: set[tuple[int, int]] = set()
        for metric, bound in budget.to_dict().items():
            limit = bound * (1 + BUDGET_TOLERANCE)
            block_least, pair_least = self._lower_bounds(metric)
            blocks |= {i for i, least in enumerate(block_least) if least > limit}
            pairs |= {p for p, least in pair_least.items() if least > limit}
        return blocks, pairs

    def _lower_bounds(self, metric: str) -> tuple[list[float], dict[tuple[int, int], float]]:
        """Least total ``metric`` of an assembly through each block / pair, ignoring the set constraints.

        Dynamic programming over the stage DAG: ``before[b]`` = cheapest prefix ending with b (b included),
        ``after[b]`` = cheapest suffix after b (joins, later blocks, head). A valid lower bound because every
        cost is non-negative and dropping the set constraints only adds paths.
        """
        cost = [getattr(b, metric) for b in self.blocks]
        join = {p: getattr(j, metric) for p, j in self.joins.items()}
        before = [math.inf] * len(self.blocks)
        after = [math.inf] * len(self.blocks)
        for i in self.stages[0]:
            before[i] = cost[i]
        for (a, b), c in join.items():  # pairs are listed stage by stage, so every before[a] is final when read
            before[b] = min(before[b], before[a] + c + cost[b])
        for b, head in self.heads.items():
            after[b] = getattr(head, metric)
        for (a, b), c in reversed(join.items()):
            after[a] = min(after[a], c + cost[b] + after[b])
        block_least = [before[i] + after[i] for i in range(len(self.blocks))]
        pair_least = {(a, b): before[a] + c + cost[b] + after[b] for (a, b), c in join.items()}
        return block_least, pair_least

    def surrogate_expr(self, z: list, y: dict, compat_weight: float) -> pulp.LpAffineExpression:
        block_terms = [(z[i], b.quality) for i, b in enumerate(self.blocks)]
        pair_terms = [(var, compat_weight * self.joins[p].compat) for p, var in y.items()]
        return pulp.LpAffineExpression(block_terms + pair_terms)

    def cost_expr(self, metric: str, z: list, y: dict) -> pulp.LpAffineExpression:
        block_terms = [(z[i], self._block_cost(i, metric)) for i in range(len(self.blocks))]
        pair_terms = [(var, getattr(self.joins[p], metric)) for p, var in y.items()]
        return pulp.LpAffineExpression(block_terms + pair_terms)

    def _block_cost(self, i: int, metric: str) -> float:
        cost = getattr(self.blocks[i], metric)
        return cost + getattr(self.heads[i], metric) if i in self.heads else cost

    def chosen(self, z: list) -> list[int]:
        picked = sorted((i for i, var in enumerate(z) if var.value() > 0.5), key=lambda i: self.blocks[i].stage)
        if [self.blocks[i].stage for i in picked] != list(range(self.stages_count)):
            raise SolverError(f"CBC returned an invalid assembly {picked}", "report this as a bug")
        return picked

    def assembly(self, chosen: list[int], compat_weight: float) -> Assembly:
        """Surrogate and totals recomputed from the data (not read back from the solver)."""
        return assembly_of(self.blocks, self.joins, self.heads, chosen, compat_weight)

    def cheapest(self, metric: str) -> float:
        """Minimum total ``metric``; SolverError when no assembly satisfies the structure at all."""
        prob, z, y = self.lp(f"cheapest_{metric}", pulp.LpMinimize)
        prob += self.cost_expr(metric, z, y)
        if _solve(prob, threads=1, time_limit=None) != "optimal":
            raise SolverError(
                "the equivalence sets do not cover the stages: no choice of one block per stage uses every set once",
                "re-run the partition with another seed or a different K",
            )
        return getattr(self.assembly(self.chosen(z), 0.0), metric)


def assembly_of(
    blocks: Sequence[BlockOption],
    joins: Mapping[tuple[int, int], JoinCost],
    heads: Mapping[int, JoinCost],
    chosen: Sequence[int],
    compat_weight: float = 1.0,
) -> Assembly:
    """The :class:`Assembly` of the blocks ``chosen`` (indices, stage order): surrogate and totals of blocks,
    joins and head, as the program counts them (``KeyError`` for a join or head that is not in the data)."""
    links = list(zip(chosen, chosen[1:]))
    surrogate = sum(blocks[i].quality for i in chosen) + compat_weight * sum(joins[p].compat for p in links)
    totals: dict[str, float | None] = {}
    for metric in METRICS:
        parts = [getattr(blocks[i], metric) for i in chosen]
        parts += [getattr(joins[p], metric) for p in links] + [getattr(heads[chosen[-1]], metric)]
        totals[metric] = None if any(v is None for v in parts) else float(sum(parts))
    return Assembly(tuple(chosen), float(surrogate), totals["params"], totals["macs"], totals["latency_ms"])


def fits(assembly: Assembly, budget: Budget) -> bool:
    """Whether ``assembly``'s totals are within every bound of ``budget`` (float-summation slack only)."""
    return all(getattr(assembly, m) is not None and getattr(assembly, m) <= bound * (1 + BUDGET_TOLERANCE)
               for m, bound in budget.to_dict().items())


def _solve(prob: pulp.LpProblem, threads: int, time_limit: float | None) -> str:
    """Run CBC: 'optimal', 'time_limit' (a solution, unproven), 'no_solution' (time ran out) or 'infeasible'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 3 deprecates its bundled CBC in favour of pulp[cbc]
        solver = pulp.PULP_CBC_CMD(msg=False, threads=threads, timeLimit=time_limit, options=list(_CBC_OPTIONS))
    prob.solve(solver)
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "optimal"
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit"
    if prob.status == pulp.LpStatusNotSolved:
        return "no_solution"
    return "infeasible"


def _group(blocks: list[BlockOption], attr: str, count: int) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(count)]
    for i, b in enumerate(blocks):
        index = getattr(b, attr)
        if not 0 <= index < count:
            raise SolverError(
                f"block {b.key!r} has {attr} {index}, outside 0..{count - 1} (K={count} stages)",
                "number stages and equivalence sets 0..K-1 with one K for both",
            )
        groups[index].append(i)
    for index, members in enumerate(groups):
        if not members:
            raise SolverError(
                f"the equivalence sets do not cover the stages: {attr} {index} has no block (K={count})",
                "re-run the partition with another seed or a different K",
            )
    return groups


def _check_numbers(items: list) -> None:
    for item in items:
        for name in ("params", "macs", "latency_ms", "quality", "compat"):
            value = getattr(item, name, 0.0)
            if value is None:
                continue
            if not math.isfinite(value) or (name in METRICS and value < 0):
                what = getattr(item, "key", type(item).__name__)
                raise SolverError(f"{what} has {name}={value}", "give finite, non-negative costs and finite scores")
