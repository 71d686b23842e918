"""The abstract search space every allocator works in: integers only, no model.

Layer ``i`` has a *ladder* of rungs ``0 .. len(costs[i]) - 1`` with non-decreasing integer costs (bits or bytes,
in the budget's unit); a :class:`Genome` picks one rung per layer and may remove whole groups of layers
(attention / MLP sub-blocks), whose layers then cost nothing. A genome *fits* when its summed cost is at most
``limit``. Keeping costs integral makes "never over budget" an exact comparison.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

MAX_REPAIRS = 8  # a level switch may lower at most this many extra layers to get back under the limit


@dataclass(frozen=True)
class Genome:
    rungs: tuple[int, ...]
    removed: frozenset[int] = field(default_factory=frozenset)

    def to_json(self) -> dict[str, Any]:
        return {"rungs": list(self.rungs), "removed": sorted(self.removed)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Genome:
        return cls(tuple(data["rungs"]), frozenset(data.get("removed", [])))


@dataclass(frozen=True)
class Space:
    costs: tuple[tuple[int, ...], ...]  # costs[i][rung], non-decreasing in rung
    limit: int
    groups: tuple[tuple[int, ...], ...] = ()  # removable groups of layer indices (disjoint)
    max_removed: int = 0  # at most this many groups removed at once (0: no removal)

    def __post_init__(self) -> None:
        for ladder in self.costs:
            if any(b < a for a, b in zip(ladder, ladder[1:])):
                raise ValueError("each ladder's costs must be non-decreasing")

    @property
    def n_layers(self) -> int:
        return len(self.costs)

    def top(self, i: int) -> int:
        return len(self.costs[i]) - 1

    def removed_layers(self, genome: Genome) -> set[int]:
        return {i for g in genome.removed for i in self.groups[g]}

    def cost(self, genome: Genome) -> int:
        gone = self.removed_layers(genome)
        return sum(self.costs[i][r] for i, r in enumerate(genome.rungs) if i not in gone)

    def fits(self, genome: Genome) -> bool:
        return self.cost(genome) <= self.limit

    def smallest_cost(self) -> int:
        """The cheapest reachable genome's cost: every layer on its lowest rung, the costliest groups removed."""
        bottom = sum(ladder[0] for ladder in self.costs)
        freed = sorted((sum(self.costs[i][0] for i in g) for g in self.groups), reverse=True)
        return bottom - sum(freed[: self.max_removed])

    def uniform_fill(self, rng: random.Random) -> Genome | None:
        """EvoPress's start for a non-integer target: every layer at its top rung, then random layers lowered
        one rung at a time until the genome fits; None when even the lowest rungs do not fit."""
        rungs = [self.top(i) for i in range(self.n_layers)]
        total = sum(self.costs[i][r] for i, r in enumerate(rungs))
        while total > self.limit:
            lowerable = [i for i, r in enumerate(rungs) if r > 0]
            if not lowerable:
                return None
            i = rng.choice(lowerable)
            total -= self.costs[i][rungs[i]] - self.costs[i][rungs[i] - 1]
            rungs[i] -= 1
        return Genome(tuple(rungs))


def _lower_until_fits(space: Space, rungs: list[int], active: list[int], protect: int | None,
                      rng: random.Random, max_steps: int) -> bool:
    """Lower random active layers (never ``protect``) one rung at a time until the total fits, in ≤ max_steps."""
    total = sum(space.costs[i][rungs[i]] for i in active)
    steps = 0
    while total > space.limit:
        lowerable = [j for j in active if j != protect and rungs[j] > 0]
        if not lowerable or steps >= max_steps:
            return False
        j = rng.choice(lowerable)
        total -= space.costs[j][rungs[j]] - space.costs[j][rungs[j] - 1]
        rungs[j] -= 1
        steps += 1
    return True


def level_switch(space: Space, genome: Genome, rng: random.Random) -> Genome | None:
    """Raise one layer a rung; unless that alone fits, lower another a rung (then up to MAX_REPAIRS more while
    over the limit). With equal-cost ladders (EvoPress's equal-size groups) this keeps the total exactly constant;
    with unequal ones the total stays at most the limit, and the raise-only case lets a search spend leftover slack.

    Both layers are kept (not removed). Returns None when no valid switch came out; the result always fits.
    """
    gone = space.removed_layers(genome)
    active = [i for i in range(space.n_layers) if i not in gone]
    rungs = list(genome.rungs)
    up = [i for i in active if rungs[i] < space.top(i)]
    if not up:
        return None
    i = rng.choice(up)
    rungs[i] += 1
    if sum(space.costs[k][rungs[k]] for k in active) <= space.limit:
        return Genome(tuple(rungs), genome.removed)  # the raise alone fits: spend the slack
    down = [j for j in active if j != i and rungs[j] > 0]
    if not down:
        return None
    j = rng.choice(down)
    rungs[j] -= 1
    if not _lower_until_fits(space, rungs, active, i, rng, MAX_REPAIRS):
        return None
    return Genome(tuple(rungs), genome.removed)


def depth_switch(space: Space, genome: Genome, rng: random.Random) -> Genome | None:
    """Remove a kept group, restore a removed one, or swap the two; then re-balance the other layers' rungs.

    Removing frees its layers' cost, which is spent by raising random layers while they fit; restoring brings
    the group back at its previous rungs and lowers random layers until the genome fits again.
    """
    removed = set(genome.removed)
    kept = [g for g in range(len(space.groups)) if g not in removed]
    moves = []
    if kept and len(removed) < space.max_removed:
        moves.append("remove")
    if removed:
        moves.append("restore")
    if removed and kept:
        moves.append("swap")
    if not moves:
        return None
    move = rng.choice(moves)
    if move in ("restore", "swap"):
        removed.discard(rng.choice(sorted(removed)))
    if move in ("remove", "swap"):
        removed.add(rng.choice(kept))
    gone = {i for g in removed for i in space.groups[g]}
    active = [i for i in range(space.n_layers) if i not in gone]
    rungs = list(genome.rungs)
    if not _lower_until_fits(space, rungs, active, None, rng, max_steps=sum(len(c) for c in space.costs)):
        return None
    total = sum(space.costs[i][rungs[i]] for i in active)
    for i in rng.sample(active, len(active)):  # spend what the removal freed, in random order
        if rungs[i] < space.top(i) and total + space.costs[i][rungs[i] + 1] - space.costs[i][rungs[i]] <= space.limit:
            total += space.costs[i][rungs[i] + 1] - space.costs[i][rungs[i]]
            rungs[i] += 1
    return Genome(tuple(rungs), frozenset(removed))


def mutate(space: Space, genome: Genome, rng: random.Random, depth_probability: float = 0.2) -> Genome | None:
    """EvoPress's offspring: min(U{1..3}, U{1..3}) switches in a row (biased towards one). None if it failed."""
    count = min(rng.randint(1, 3), rng.randint(1, 3))
    child: Genome | None = genome
    for _ in range(count):
        use_depth = space.max_removed > 0 and space.groups and rng.random() < depth_probability
        child = (depth_switch if use_depth else level_switch)(space, child, rng)
        if child is None:
            return None
    return None if child == genome else child
