"""Sensitivity-greedy allocation: marginal damage per unit of cost, from single-layer measurements.

``single[i][r]`` is the fitness (KL to the original) of the model in which ONLY layer ``i`` is compressed, to rung
``r``, and every other layer is original. Assuming these damages add up, start with every layer on its top
rung; while over the limit, make the move (any layer, to any cheaper rung) that adds the least damage per unit
of cost saved; then, with what is left, make the affordable upgrades that remove the most damage per unit of
cost. Sub-block removal is not considered here (its damage is far from additive); the evolutionary search does.
"""

from __future__ import annotations

from hiercomp.budget.space import Genome, Space


def greedy_allocate(space: Space, single: list[list[float]]) -> Genome | None:
    rungs = [space.top(i) for i in range(space.n_layers)]
    total = sum(space.costs[i][r] for i, r in enumerate(rungs))
    while total > space.limit:
        best: tuple[float, int, int] | None = None
        for i, r in enumerate(rungs):
            for lower in range(r):
                saved = space.costs[i][r] - space.costs[i][lower]
                if saved <= 0:
                    continue
                ratio = (single[i][lower] - single[i][r]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, i, lower)
        if best is None:
            return None
        _, i, lower = best
        total -= space.costs[i][rungs[i]] - space.costs[i][lower]
        rungs[i] = lower
    while True:  # spend what is left
        best = None
        for i, r in enumerate(rungs):
            for higher in range(r + 1, space.top(i) + 1):
                extra = space.costs[i][higher] - space.costs[i][r]
                gain = single[i][r] - single[i][higher]
                if gain <= 0 or total + extra > space.limit:
                    continue
                ratio = gain / max(extra, 1e-9)
                if best is None or ratio > best[0]:
                    best = (ratio, i, higher)
        if best is None:
            break
        _, i, higher = best
        total += space.costs[i][higher] - space.costs[i][rungs[i]]
        rungs[i] = higher
    return Genome(tuple(rungs))
