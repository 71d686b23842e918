"""The search behind `hiercomp search` and :func:`hiercomp.search`: budget -> candidates -> allocator -> Plan.

1. the budget becomes an integer limit on the compressible layers' summed cost (bits or bytes, budget.py);
2. every level's candidate layers come from the on-disk database (levels.py, cache.py);
3. each layer gets a *ladder*: the levels sorted by that layer's cost; removable sub-blocks become groups;
4. the allocator (uniform, greedy or evo) picks rungs on the abstract space (space.py);
5. the chosen genome becomes a :class:`~hiercomp.plan.Plan` with its exact cost and fitness history.

Fitness evaluations that do not depend on each other (a selection stage, the single-layer table, the uniform
levels) go through :meth:`SearchProblem.fitness_many`; with an executor from :mod:`hiercomp.distributed` they
are spread over Ray workers, each holding its own :class:`Fitness` built once from the original model and the
candidates (sent once through the object store). Same requests, same thread count: the same floats.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercomp.budget.budget import Budget, SizeModel, parse_budget
from hiercomp.budget.cache import LevelCache, model_fingerprint
from hiercomp.budget.evo import EvoConfig, evolve
from hiercomp.budget.fitness import Fitness, TokenBatch
from hiercomp.budget.greedy import greedy_allocate
from hiercomp.budget.levels import DEFAULT_LEVELS, Candidate, build_candidates, parse_levels
from hiercomp.budget.space import Genome, Space
from hiercomp.budget.uniform import uniform_allocate
from hiercomp.depth import list_subblocks
from hiercomp.distributed import ClusterConfig, Executor, Shared, executor_for
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import walk
from hiercomp.plan import MethodConfig, Plan

SEARCHES = ("uniform", "greedy", "evo")


@dataclass
class SearchProblem:
    """A model's layers and candidates laid out as an abstract :class:`Space` in the budget's unit."""

    layers: list[str]
    levels: list[MethodConfig]
    candidates: list[dict[str, Candidate]]
    size: SizeModel
    unit: str  # "bits" | "bytes"
    ladders: list[list[int]]  # per layer: level indices by increasing cost
    groups: list[str]  # removable sub-block names, parallel to space.groups
    space: Space
    fitness_fn: Fitness | None = None
    calibration: torch.Tensor | None = None
    evaluations: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    executor: Executor | None = None  # where fitness_many runs; None = here, one by one
    _shared: tuple[Executor, Shared] | None = field(default=None, repr=False)  # the workers' Fitness, per executor

    @classmethod
    def build(cls, layers: list[str], levels: list[MethodConfig], candidates: list[dict[str, Candidate]],
              size: SizeModel, budget: Budget, subblocks: list[Any] = (), max_removed: int = 0) -> SearchProblem:
        unit, limit = size.limit(budget)

        def cost(c: Candidate) -> int:
            return c.bits if unit == "bits" else c.nbytes

        ladders = [sorted(range(len(levels)), key=lambda k, n=name: (cost(candidates[k][n]), k)) for name in layers]
        costs = tuple(tuple(cost(candidates[k][name]) for k in ladder) for name, ladder in zip(layers, ladders))
        index = {name: i for i, name in enumerate(layers)}
        usable = [sb for sb in subblocks if sb.linear_names and all(n in index for n in sb.linear_names)]
        groups = tuple(tuple(index[n] for n in sb.linear_names) for sb in usable)
        space = Space(costs, limit, groups, max_removed if groups else 0)
        return cls(layers, levels, candidates, size, unit, ladders, [sb.name for sb in usable], space)

    # -- genome <-> layers -------------------------------------------------------------------------
    def assignment(self, genome: Genome) -> tuple[dict[str, int], frozenset[str]]:
        removed = frozenset(self.groups[g] for g in genome.removed)
        return {name: self.ladders[i][r] for i, (name, r) in enumerate(zip(self.layers, genome.rungs))}, removed

    def uniform_genome(self, level: int) -> Genome:
        return Genome(tuple(ladder.index(level) for ladder in self.ladders))

    def single_layer(self, i: int, rung: int) -> dict[str, int]:
        return {self.layers[i]: self.ladders[i][rung]}

    def totals(self, genome: Genome) -> dict[str, float]:
        assignment, removed = self.assignment(genome)
        gone = tuple(f"{n}." for n in removed)
        kept = {n: k for n, k in assignment.items() if not (n + ".").startswith(gone)}
        bits = sum(self.candidates[k][n].bits for n, k in kept.items())
        nbytes = sum(self.candidates[k][n].nbytes for n, k in kept.items())
        return self.size.report(bits, nbytes)

    # -- fitness -----------------------------------------------------------------------------------
    def fitness(self, genome: Genome, batch: TokenBatch) -> float:
        assert self.fitness_fn is not None
        self.evaluations += 1
        assignment, removed = self.assignment(genome)
        return self.fitness_fn(assignment, removed, batch)

    def evaluate_many(self, requests: list[tuple[dict[str, int], frozenset[str]]], batch: TokenBatch) -> list[float]:
        """``fitness_fn(assignment, removed, batch)`` for each request, in order: here, or on the executor's
        workers (the fitness is a pure function of its arguments, so where it runs does not change it)."""
        assert self.fitness_fn is not None
        self.evaluations += len(requests)
        if self.executor is None or type(self.executor) is Executor:
            return [self.fitness_fn(assignment, removed, batch) for assignment, removed in requests]
        if self._shared is None or self._shared[0] is not self.executor:
            fn = self.fitness_fn
            self._shared = (self.executor, self.executor.share(_worker_fitness, fn.original, fn.candidates, fn.encoder,
                                                               fn.batch_size))
        shared = self._shared[1]
        # The batch rides with the function (sent once per call), each request is a few hundred bytes.
        return self.executor.map(functools.partial(_score_on_worker, shared, batch), requests)

    def fitness_many(self, genomes: list[Genome], batch: TokenBatch) -> list[float]:
        return self.evaluate_many([self.assignment(g) for g in genomes], batch)

    def sample_batch(self, n_tokens: int, rng: random.Random) -> TokenBatch:
        """A fresh random subset of whole calibration sequences holding at least ``n_tokens`` tokens."""
        assert self.calibration is not None
        n_seq, length = self.calibration.shape
        count = min(n_seq, max(1, math.ceil(n_tokens / length)))
        indices = tuple(sorted(rng.sample(range(n_seq), count)))
        return TokenBatch(indices, self.calibration[list(indices)])

    def to_plan(self, genome: Genome, *, budget: Budget, search: str, model: str | None,
                fitness: dict[str, Any], history: list[list[float]]) -> Plan:
        assignment, removed = self.assignment(genome)
        return Plan({n: self.levels[k] for n, k in assignment.items()}, sorted(removed), str(budget), search, model,
                    self.totals(genome), fitness, history)

    def allocation_rows(self, genome: Genome) -> list[dict[str, Any]]:
        """Per-layer rows for :func:`hiercomp.report.plots.layer_allocation`."""
        assignment, removed = self.assignment(genome)
        gone = tuple(f"{n}." for n in removed)
        rows = []
        for name in self.layers:
            cand = self.candidates[assignment[name]][name]
            sparsity = getattr(cand.layer, "sparsity", None)
            rows.append({"name": name, "bits_per_weight": cand.bits / self.size.layer_weights[name],
                         "sparsity": sparsity() if callable(sparsity) else None,
                         "removed": (name + ".").startswith(gone), "rel_error": cand.rel_output_error,
                         "level": self.levels[assignment[name]].label})
        return rows


def _worker_fitness(original: nn.Module, candidates: list[dict[str, Candidate]], encoder: bool,
                    batch_size: int) -> Fitness:
    return Fitness(original, candidates, encoder=encoder, batch_size=batch_size)


def _score_on_worker(shared: Shared, batch: TokenBatch, request: tuple[dict[str, int], frozenset[str]]) -> float:
    assignment, removed = request
    return shared.get()(assignment, removed, batch)


def impossible_message(problem: SearchProblem, budget: Budget) -> str:
    smallest = problem.space.smallest_cost()
    removal = f" with {problem.space.max_removed} sub-block(s) removed" if problem.space.max_removed else ""
    reach = problem.size.describe(problem.unit, smallest)
    return (f"budget {budget} cannot be met: the smallest reachable size is {reach} (every layer at its "
            f"cheapest level{removal}); raise the budget or add cheaper --levels")


def prepare_problem(
    model: nn.Module, budget: Budget, levels: list[MethodConfig], calibration: torch.Tensor, *, encoder: bool,
    allow_remove: bool = False, max_removed: int = 2, cache_dir: str | Path | None = None, progress: bool = True,
) -> SearchProblem:
    """Everything a search needs: the candidate database (built or read from the cache) and the abstract space."""
    hierarchy = walk(model)
    layers = [lin.name for block in hierarchy.blocks for lin in block.linears]
    size = SizeModel.of(model, layers)
    cache = LevelCache(cache_dir)
    candidates, summary = build_candidates(model, layers, levels, calibration, encoder=encoder, cache=cache,
                                           model_fingerprint=model_fingerprint(model), progress=progress)
    subblocks: list[Any] = []
    if allow_remove:
        subblocks = [sb for sb in list_subblocks(model, hierarchy) if sb.kind in ("attn", "mlp")]
    problem = SearchProblem.build(layers, levels, candidates, size, budget, subblocks,
                                  max_removed if allow_remove else 0)
    problem.notes["candidates"] = summary
    problem.fitness_fn = Fitness(model, candidates, encoder=encoder)
    problem.calibration = calibration
    if problem.space.smallest_cost() > problem.space.limit:
        raise HiercompError(impossible_message(problem, budget))
    return problem


def single_layer_table(problem: SearchProblem, batch: TokenBatch, progress: bool = True) -> list[list[float]]:
    """``table[i][rung]``: fitness with only layer i compressed (to that rung), the rest original, on ``batch``.

    Kept on the problem per batch, so several budgets (or the error-additivity check) measure it once.
    """
    from tqdm.auto import tqdm

    tables = problem.notes.setdefault("single", {})
    if batch.indices not in tables:
        if problem.executor is None or type(problem.executor) is Executor:
            table = []
            for i in tqdm(range(problem.space.n_layers), desc="single-layer sensitivity", unit="layer",
                          disable=not progress):
                table.append(problem.evaluate_many([(problem.single_layer(i, r), frozenset())
                                                    for r in range(problem.space.top(i) + 1)], batch))
        else:  # every (layer, rung) at once, so all workers stay busy
            cells = [(i, r) for i in range(problem.space.n_layers) for r in range(problem.space.top(i) + 1)]
            values = iter(problem.evaluate_many([(problem.single_layer(i, r), frozenset()) for i, r in cells], batch))
            table = [[next(values) for _ in range(problem.space.top(i) + 1)] for i in range(problem.space.n_layers)]
        tables[batch.indices] = table
    return tables[batch.indices]


def removal_damages(problem: SearchProblem, batch: TokenBatch) -> list[float] | None:
    """``damages[g]``: fitness with only sub-block group g removed (the rest original); None when the space has
    no removal. Kept on the problem per batch, like the single-layer table."""
    if problem.space.max_removed == 0 or not problem.groups:
        return None
    tables = problem.notes.setdefault("removal", {})
    if batch.indices not in tables:
        tables[batch.indices] = problem.evaluate_many([({}, frozenset({name})) for name in problem.groups], batch)
    return tables[batch.indices]


def greedy_genome(problem: SearchProblem, batch: TokenBatch, progress: bool = True) -> Genome | None:
    """The sensitivity-greedy plan from the single-layer (and, with removal, single-removal) measurements."""
    return greedy_allocate(problem.space, single_layer_table(problem, batch, progress),
                           removal_damages(problem, batch))


def run_allocator(problem: SearchProblem, budget: Budget, search: str, *, evo: EvoConfig | None = None,
                  checkpoint: str | Path | None = None, model_name: str | None = None,
                  progress: bool = True) -> tuple[Plan, Genome, dict[str, Any]]:
    """Run one allocator on a prepared problem. Returns the plan, its genome and the uniform points scored."""
    evo = evo or EvoConfig()
    if search not in SEARCHES:
        raise HiercompError(f"unknown --search {search!r}; choose one of {', '.join(SEARCHES)}")
    start = time.perf_counter()
    evals_before = problem.evaluations
    rng = random.Random(evo.seed + 7919)  # the final-stage batch used by uniform and greedy scoring
    final_tokens = evo.stages[-1][1]
    batch = problem.sample_batch(final_tokens, rng)
    metric = "cosine_distance" if problem.fitness_fn is not None and problem.fitness_fn.encoder else "kl"
    uniform = [(problem.levels[k].label, problem.uniform_genome(k)) for k in range(len(problem.levels))]
    fitting = iter(problem.fitness_many([g for _, g in uniform if problem.space.fits(g)], batch))
    best_uniform, points = uniform_allocate(problem.space, uniform, lambda g, b: next(fitting), batch)
    extra: dict[str, Any] = {"uniform_points": points}
    history: list[list[float]] = []
    if search == "uniform":
        if best_uniform is None:
            cheapest = min(points, key=lambda p: p.cost)
            raise HiercompError(f"no single level fits budget {budget}: the cheapest uniform level "
                                f"({cheapest.label}) costs {problem.size.describe(problem.unit, cheapest.cost)}; "
                                "use --search greedy or evo, or raise the budget")
        genome, value, tokens = best_uniform.genome, best_uniform.fitness, batch.n_tokens
    elif search == "greedy":
        found = greedy_genome(problem, batch, progress)
        extra["single"] = single_layer_table(problem, batch, progress)
        if found is None:
            raise HiercompError(impossible_message(problem, budget))
        genome, tokens = found, batch.n_tokens
        value = problem.fitness(genome, batch)
    else:
        initial = [best_uniform.genome] if best_uniform is not None else []
        if evo.start_from_greedy:
            found = greedy_genome(problem, batch, progress)
            if found is not None and found not in initial:
                initial.append(found)
        result = evolve(problem.space, problem.fitness, problem.sample_batch, evo, initial, checkpoint, progress,
                        batch_tokens=lambda b: b.n_tokens, fitness_many=problem.fitness_many)
        genome, tokens = result.genome, evo.stages[-1][1]
        # On the same batch as uniform/greedy, for a fair comparison. Each generation is selected on a small fresh
        # batch, so the final parent can score worse on this batch than a plan the walk started from (search.md
        # saw it on MiniLM); never return worse than a start.
        value, *start_values = problem.fitness_many([genome, *initial], batch)
        kept_start = False
        for start_genome, start_value in zip(initial, start_values):
            if start_value < value:
                genome, value, kept_start = start_genome, start_value, True
        history = [[row["generation"], row["fitness"]] for row in result.history]
        extra["evo"] = {"generations": evo.generations, "offspring": evo.offspring, "stages": evo.stages,
                        "seed": evo.seed, "tokens_scored": result.tokens_scored,
                        "start_from_greedy": evo.start_from_greedy, "kept_start": kept_start}
    if not problem.space.fits(genome):  # the invariant every allocator keeps; never write an over-budget plan
        raise HiercompError(f"internal error: the {search} plan exceeds budget {budget}")
    seconds = time.perf_counter() - start
    fitness = {"metric": metric, "value": value, "tokens": tokens,
               "evaluations": problem.evaluations - evals_before, "seconds": round(seconds, 2)}
    plan = problem.to_plan(genome, budget=budget, search=search, model=model_name, fitness=fitness, history=history)
    return plan, genome, extra


@dataclass
class SearchOutcome:
    """What a search found (the plan) and what it looked at, for the pictures (hiercomp.report.search_pictures)."""

    plan: Plan
    problem: SearchProblem
    genome: Genome
    extra: dict[str, Any]


def search(
    loaded: Any,
    budget: str | Budget,
    *,
    calibration: torch.Tensor,
    search: str = "evo",
    levels: str | list[MethodConfig] = DEFAULT_LEVELS,
    max_removed: int = 2,
    evo: EvoConfig | None = None,
    cache_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    cluster: ClusterConfig | None = None,
) -> SearchOutcome:
    """Find a plan for a loaded model (:class:`hiercomp.io.hf.LoadedModel`) that fits ``budget``; nothing is
    compressed. ``calibration``: (N, L) tokens; the same tokens build the candidates and score the search.
    ``levels``: a level spec (see :mod:`hiercomp.budget.levels`; ``;remove`` lets the search drop up to
    ``max_removed`` attention/MLP sub-blocks). :func:`hiercomp.search` is the user's entry (it loads, reads the
    calibration text and writes the plan and pictures). ``cluster``: score on Ray workers
    (:class:`hiercomp.distributed.ClusterConfig`), started after the candidates are built and stopped at the end.
    """
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    if cluster is not None:
        cluster.preflight()  # before the candidates are built
    level_list, allow_remove = parse_levels(levels) if isinstance(levels, str) else (list(levels), False)
    problem = prepare_problem(loaded.model, budget, level_list, calibration, encoder=loaded.is_encoder,
                              allow_remove=allow_remove, max_removed=max_removed, cache_dir=cache_dir,
                              progress=progress)
    with executor_for(cluster) as executor:
        problem.executor = executor
        try:
            plan, genome, extra = run_allocator(problem, budget, search, evo=evo, checkpoint=checkpoint,
                                                model_name=loaded.source, progress=progress)
        finally:
            problem.executor, problem._shared = None, None  # the workers are gone after this block
    extra["executor"] = executor.describe()
    return SearchOutcome(plan, problem, genome, extra)
