"""Sensitivity-greedy allocation: marginal damage per unit of cost, from single-layer measurements.

``single[i][r]`` is the fitness (KL to the original) of the model in which ONLY layer ``i`` is compressed, to rung
``r``, and every other layer is original. Assuming these damages add up, start with every layer on its top
rung; while over the limit, make the move (any layer, to any cheaper rung) that adds the least damage per unit
of cost saved; then, with what is left, make the affordable upgrades that remove the most damage per unit of
cost.

When the space allows sub-block removal, ``removal[g]`` is the damage of removing group ``g`` alone (the rest
original). Removing is then one more downgrade move: it saves what the group's layers cost at their current
rungs and adds ``removal[g]`` minus the damage those layers were already charged. Removal damages are far from
additive (see search.md), which is why the evolutionary search, scoring whole plans, is the one to trust there.
"""

from __future__ import annotations

from collections.abc import Sequence

from hiercomp.budget.space import Genome, Space


def greedy_allocate(space: Space, single: list[list[float]],
                    removal: Sequence[float] | None = None) -> Genome | None:
    rungs = [space.top(i) for i in range(space.n_layers)]
    removed: set[int] = set()
    can_remove = removal is not None and space.max_removed > 0

    def gone() -> set[int]:
        return {i for g in removed for i in space.groups[g]}

    total = sum(space.costs[i][r] for i, r in enumerate(rungs))
    while total > space.limit:
        out = gone()
        best: tuple[float, int, int] | None = None  # (damage per unit saved, layer or -1 - group, rung)
        for i, r in enumerate(rungs):
            if i in out:
                continue
            for lower in range(r):
                saved = space.costs[i][r] - space.costs[i][lower]
                if saved <= 0:
                    continue
                ratio = (single[i][lower] - single[i][r]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, i, lower)
        if can_remove and len(removed) < space.max_removed:
            for g, layers in enumerate(space.groups):
                if g in removed:
                    continue
                saved = sum(space.costs[i][rungs[i]] for i in layers)
                added = removal[g] - sum(single[i][rungs[i]] for i in layers)  # type: ignore[index]
                if saved > 0 and (best is None or added / saved < best[0]):
                    best = (added / saved, -1 - g, 0)
        if best is None:
            return None
        _, i, lower = best
        if i < 0:
            removed.add(-1 - i)
            total = sum(space.costs[k][rungs[k]] for k in range(space.n_layers) if k not in gone())
            continue
        total -= space.costs[i][rungs[i]] - space.costs[i][lower]
        rungs[i] = lower
    out = gone()
    while True:  # spend what is left
        best = None
        for i, r in enumerate(rungs):
            if i in out:
                continue
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
    return Genome(tuple(rungs), frozenset(removed))
