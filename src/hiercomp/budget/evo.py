"""EvoPress-style (1+λ) evolutionary search over a :class:`~hiercomp.budget.space.Space`.

Each generation makes ``offspring`` unique children of the parent by level-switch mutations (every child fits
the budget; see :func:`~hiercomp.budget.space.mutate`), then selects in stages: stage ``j`` draws a fresh batch
of ``tokens`` calibration tokens, scores the surviving candidates on it and keeps the best ``survivors``; the
parent joins only at the last stage (elitism, rescored on that stage's batch, never a stale score). The single
winner is the next parent.

``fitness(genome, batch) -> float`` (lower is better) and ``sample_batch(n_tokens, rng) -> batch`` come from the
caller; the toy tests pass an additive function, the real search KL to the original model
(:class:`~hiercomp.budget.fitness.Fitness`). Everything random is drawn from one seeded ``random.Random`` whose
state goes into the checkpoint after every generation, so an interrupted search resumed from its checkpoint
ends with exactly the plan of an uninterrupted one. With ``fitness_many`` (a whole selection stage at once, e.g.
spread over Ray workers by :mod:`hiercomp.distributed`) the draws stay here, so the genomes, batches and plan are
those of the one-by-one run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hiercomp.budget.space import Genome, Space, mutate
from hiercomp.errors import HiercompError
from hiercomp.io.integrity import read_regular


@dataclass(frozen=True)
class EvoConfig:
    generations: int = 60
    offspring: int = 16  # λ
    stages: tuple[tuple[int, int], ...] = ((4, 1024), (1, 4096))  # (survivors, tokens) per selection stage
    initial_random: int = 8  # random starts (EvoPress's non-integer target init) besides the given ones
    seed: int = 0
    depth_probability: float = 0.2  # share of mutations that remove/restore a sub-block, when removal is allowed
    # Also start from the sensitivity-greedy plan (one single-layer measurement per layer and level, shared with
    # --search greedy): the search then refines greedy instead of rediscovering it, so on its own fitness data it
    # can only match or beat it. EvoPress starts from uniform alone; set False for that.
    start_from_greedy: bool = True

    def fingerprint(self, space: Space, initial: list[Genome]) -> str:
        """What a checkpoint must match to be resumed (the generation count may grow)."""
        data = {k: v for k, v in asdict(self).items() if k != "generations"}
        data["space"] = [space.costs, space.limit, space.groups, space.max_removed]
        data["initial"] = [g.to_json() for g in initial]
        return hashlib.sha256(json.dumps(data, default=list).encode()).hexdigest()[:16]


@dataclass
class EvoResult:
    genome: Genome
    fitness: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per generation
    evaluations: int = 0  # fitness calls
    tokens_scored: int = 0  # Σ batch tokens over all fitness calls
    seconds: float = 0.0
    # What the runs before a resume spent (already inside evaluations / seconds): a caller that counts its own
    # fitness calls adds these to report the whole search, not only its resumed part.
    resumed_evaluations: int = 0
    resumed_seconds: float = 0.0


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


MAX_CHECKPOINT_BYTES = 256 * 2**20


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(read_regular(path, MAX_CHECKPOINT_BYTES, "checkpoint"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HiercompError(f"checkpoint {path} is damaged ({type(err).__name__}); delete it to start the search "
                            "again") from None
    if not isinstance(state, dict):
        raise HiercompError(f"checkpoint {path} is damaged (not a JSON object); delete it to start the search again")
    return state


def evolve(
    space: Space,
    fitness: Callable[[Genome, Any], float],
    sample_batch: Callable[[int, random.Random], Any],
    config: EvoConfig = EvoConfig(),
    initial: list[Genome] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    batch_tokens: Callable[[Any], int] = lambda batch: 0,
    fitness_many: Callable[[list[Genome], Any], list[float]] | None = None,
) -> EvoResult:
    """Run the (1+λ) search; resume from ``checkpoint`` when it holds a run with the same settings.

    ``fitness_many(genomes, batch)``: the scores of several genomes on one batch, in order (the initial pool and
    each selection stage go through it in one call); without it, ``fitness`` scores them one by one."""
    initial = [g for g in (initial or []) if space.fits(g)]
    fingerprint = config.fingerprint(space, initial)
    rng = random.Random(config.seed)
    result = EvoResult(Genome(()), float("inf"))
    start_gen = 0
    path = Path(checkpoint) if checkpoint is not None else None
    started = time.perf_counter()
    spent_before = 0.0

    def score(genomes: list[Genome], batch: Any) -> list[float]:
        result.evaluations += len(genomes)
        result.tokens_scored += batch_tokens(batch) * len(genomes)
        if fitness_many is not None:
            return [float(v) for v in fitness_many(genomes, batch)]
        return [float(fitness(genome, batch)) for genome in genomes]

    if path is not None and path.exists():
        state = _read_checkpoint(path)
        if state.get("fingerprint") != fingerprint:
            raise HiercompError(f"checkpoint {path} belongs to a search with other settings; "
                                "delete it or pass another --checkpoint")
        try:
            _set_rng_state(rng, state["rng"])
            result = EvoResult(Genome.from_json(state["parent"]), float(state["fitness"]), list(state["history"]),
                               int(state["evaluations"]), int(state.get("tokens_scored", 0)))
            start_gen = int(state["generation"])
            spent_before = float(state.get("seconds", 0.0))
            if not space.fits(result.genome) or start_gen < 0:
                raise ValueError("its parent plan does not fit this search")
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise HiercompError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); delete it to start "
                                "the search again") from None
        result.resumed_evaluations, result.resumed_seconds = result.evaluations, spent_before
    else:
        candidates = list(initial)
        for _ in range(config.initial_random):
            genome = space.uniform_fill(rng)
            if genome is not None and genome not in candidates:
                candidates.append(genome)
        if not candidates:
            raise HiercompError("no starting plan fits the budget; raise the budget or add cheaper levels")
        batch = sample_batch(config.stages[0][1], rng)
        scores = score(candidates, batch)
        best = min(range(len(candidates)), key=lambda k: (scores[k], k))
        result.genome, result.fitness = candidates[best], scores[best]
        result.history.append({"generation": 0, "fitness": result.fitness, "tokens": config.stages[0][1],
                               "evaluations": result.evaluations})

    bar = tqdm(total=config.generations, initial=min(start_gen, config.generations), desc="evolutionary search",
               unit="gen", disable=not progress)
    for generation in range(start_gen, config.generations):
        children: list[Genome] = []
        attempts = 0
        while len(children) < config.offspring and attempts < 50 * config.offspring:
            attempts += 1
            child = mutate(space, result.genome, rng, config.depth_probability)
            if child is not None and child not in children:
                children.append(child)
        pool = children
        for stage, (survivors, tokens) in enumerate(config.stages):
            last = stage == len(config.stages) - 1
            if last:
                pool = pool + [result.genome]
            batch = sample_batch(tokens, rng)
            scores = score(pool, batch)
            order = sorted(range(len(pool)), key=lambda k: (scores[k], k))
            keep = 1 if last else survivors
            pool_scores = [scores[k] for k in order[:keep]]
            pool = [pool[k] for k in order[:keep]]
        result.genome, result.fitness = pool[0], pool_scores[0]
        result.history.append({"generation": generation + 1, "fitness": result.fitness,
                               "tokens": config.stages[-1][1], "evaluations": result.evaluations})
        bar.update(1)
        bar.set_postfix(fitness=f"{result.fitness:.5f}")
        if path is not None:
            _write_json_atomic(path, {"fingerprint": fingerprint, "generation": generation + 1,
                                      "parent": result.genome.to_json(), "fitness": result.fitness,
                                      "rng": _rng_state(rng), "history": result.history,
                                      "evaluations": result.evaluations, "tokens_scored": result.tokens_scored,
                                      "seconds": spent_before + time.perf_counter() - started})
    bar.close()
    result.seconds = spent_before + time.perf_counter() - started
    return result
