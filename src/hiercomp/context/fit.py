"""Choose whole units by priority so the rendered text has exactly the budget's number of target tokens.

Tokenization is not additive (``" the"`` + ``"."`` may merge), so costs are only estimates: each unit's cost is
the target-token count of the unit alone with its leading space. The fit runs in two steps:

1. greedy by priority (a knapsack heuristic: priorities are value per token), adding every unit whose estimated
   cost still fits;
2. repair on the **exact** count of the rendered text: over budget, drop the kept unit of lowest priority; under,
   add the best unkept unit whose cost fits the gap, else swap a kept unit for an unkept one that is exactly
   the gap dearer. Every state is tokenized for real; the best state at or under the budget is returned.

With whole words the budget can be unreachable (every word left costs two tokens and one is missing): then the
closest count below it is returned and the result says so. Ties break by position, so the fit is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hiercomp.context.units import Units

MAX_REPAIRS = 200


def unit_costs(units: Units, count: Callable[[str], int]) -> list[int]:
    return [max(1, count(units.standalone(i))) for i in range(len(units))]


def greedy(order: Sequence[int], costs: Sequence[int], budget: int, start: set[int] | None = None) -> set[int]:
    kept = set(start or ())
    total = sum(costs[i] for i in kept)
    for i in order:
        if i not in kept and total + costs[i] <= budget:
            kept.add(i)
            total += costs[i]
    return kept


def fit_exact(units: Units, priority: Sequence[float], costs: Sequence[int], budget: int,
              count: Callable[[str], int], start: set[int] | None = None) -> tuple[tuple[int, ...], int]:
    """(kept unit indices in text order, exact target tokens of their rendering), at most ``budget`` tokens.

    ``start`` is an initial selection (e.g. per-segment choices); it is repaired like a greedy one.
    """
    n = len(units)
    order = sorted(range(n), key=lambda i: (-priority[i], i))
    rank = {i: r for r, i in enumerate(order)}  # 0 = best
    kept = set(start) if start is not None else greedy(order, costs, budget)
    best: tuple[int, float, tuple[int, ...]] | None = None  # (tokens, -rank sum, kept)
    seen: set[frozenset[int]] = set()
    for _ in range(MAX_REPAIRS):
        key = frozenset(kept)
        if key in seen:
            break
        seen.add(key)
        tokens = count(units.render(sorted(kept)))
        if tokens <= budget:
            candidate = (tokens, -sum(rank[i] for i in kept), tuple(sorted(kept)))
            if best is None or candidate[:2] > best[:2]:
                best = candidate
            if tokens == budget:
                break
            gap = budget - tokens
            fits = [i for i in order if i not in kept and costs[i] <= gap]
            if fits:
                kept.add(fits[0])
                continue
            swap = _swap(order, kept, costs, gap)
            if swap is None:
                break
            out, into = swap
            kept.discard(out)
            kept.add(into)
        else:
            worst = max(kept, key=lambda i: rank[i])
            kept.discard(worst)
    if best is None:
        return (), 0
    return best[2], best[0]


def _swap(order: Sequence[int], kept: set[int], costs: Sequence[int], gap: int) -> tuple[int, int] | None:
    """(kept unit to drop, unkept unit to add) whose costs differ by exactly ``gap``: the best unkept unit, paired
    with the worst kept one that makes the difference."""
    kept_by_cost: dict[int, int] = {}
    for i in reversed(order):  # worst first, so the first seen per cost is the worst kept one
        if i in kept and costs[i] not in kept_by_cost:
            kept_by_cost[costs[i]] = i
    for i in order:
        if i not in kept and costs[i] - gap in kept_by_cost:
            return kept_by_cost[costs[i] - gap], i
    return None
