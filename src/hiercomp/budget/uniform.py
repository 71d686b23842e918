"""Uniform allocation: the same level on every layer; the best (lowest fitness) level whose cost fits.

Pure by design: a mix of two adjacent levels is left to the other allocators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hiercomp.budget.space import Genome, Space


@dataclass
class UniformPoint:
    label: str
    genome: Genome
    cost: int
    fits: bool
    fitness: float | None


def uniform_allocate(
    space: Space, uniform: list[tuple[str, Genome]], fitness: Callable[[Genome, Any], float], batch: Any,
    score_all: bool = False,
) -> tuple[UniformPoint | None, list[UniformPoint]]:
    """Score every fitting uniform genome (all of them with ``score_all``, for a quality-vs-size curve).

    Returns the best fitting point (None if no uniform level fits) and every point in the given order.
    """
    points = []
    for label, genome in uniform:
        fits = space.fits(genome)
        value = fitness(genome, batch) if (fits or score_all) else None
        points.append(UniformPoint(label, genome, space.cost(genome), fits, value))
    fitting = [p for p in points if p.fits]
    best = min(fitting, key=lambda p: (p.fitness, p.cost)) if fitting else None
    return best, points
