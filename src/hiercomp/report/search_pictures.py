"""Pictures of a search: per-layer allocation and quality vs size (uniform ladder + the plan), beside the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hiercomp.report.plots import layer_allocation, quality_vs_size


def write_pictures(outcome: Any, plan_path: str | Path) -> list[Path]:
    """``outcome``: a :class:`hiercomp.budget.search.SearchOutcome`. PNGs beside the plan file."""
    problem, genome, plan, extra = outcome.problem, outcome.genome, outcome.plan, outcome.extra
    plan_path = Path(plan_path)
    stem = plan_path.with_suffix("")
    metric = plan.fitness.get("metric", "kl")
    series: dict[str, list[tuple[float, float]]] = {}
    labels: dict[str, list[str]] = {}
    uniform = [p for p in extra.get("uniform_points", []) if p.fitness is not None]
    if uniform:
        series["uniform"] = [(problem.totals(p.genome)["size_bytes"], p.fitness) for p in uniform]
        labels["uniform"] = [p.label.replace("gptq:", "") for p in uniform]
    series[f"{plan.search} ({plan.budget})"] = [(plan.cost["size_bytes"], plan.fitness["value"])]
    out = [layer_allocation(problem.allocation_rows(genome), f"{stem}.allocation.png",
                            title=f"{plan.search} plan at {plan.budget}"),
           quality_vs_size(series, f"{stem}.quality_vs_size.png", ylabel=metric, labels=labels,
                           title=f"{metric} vs saved size")]
    return out
