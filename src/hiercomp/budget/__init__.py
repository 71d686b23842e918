"""Say a budget, get the best plan: exact budgets, candidate levels per layer, and three allocators.

    budget.py   parse "3.0bpw" / "150KB" / "0.25x" and count a plan's exact cost (bits, bytes on disk)
    levels.py   candidate levels (method + parameters) and the per-layer candidate database
    cache.py    that database on disk, packed (the compressed layers' own buffers in safetensors)
    space.py    the abstract search space: per-layer cost ladders, a budget limit, genomes
    fitness.py  KL (or cosine) of an assembled model to the original on a token batch
    uniform.py / greedy.py / evo.py   the allocators, each returning a genome -> Plan
    search.py   the orchestration behind `hiercomp search` and :func:`hiercomp.search`
"""

from hiercomp.budget.budget import Budget, SizeModel, parse_budget
from hiercomp.budget.levels import parse_levels
from hiercomp.plan import MethodConfig, Plan

__all__ = ["Budget", "MethodConfig", "Plan", "SizeModel", "parse_budget", "parse_levels"]
