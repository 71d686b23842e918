"""`hiercomp compress --drop N`: score the candidate units and choose N by a rule (the plan then removes them)."""

from __future__ import annotations

import torch
from torch import nn

from hiercomp.depth.scoring import RemovalScore, choose_removals, score_removals, units_of_kind
from hiercomp.depth.subblocks import list_subblocks
from hiercomp.errors import HiercompError


def choose_drops(
    model: nn.Module,
    calibration: torch.Tensor | None,
    n: int,
    unit: str = "block",
    rule: str = "position",
    *,
    encoder: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """The names of ``n`` units to remove, chosen by ``rule`` among ``unit`` units."""
    candidates = units_of_kind(list_subblocks(model), unit)
    if rule == "random":  # no scoring needed: a seeded draw
        scores = [RemovalScore(u, float("nan")) for u in candidates]
    else:
        if calibration is None:
            raise HiercompError(f"--drop-rule {rule} scores each removal on calibration data; pass --calib TEXT "
                                "(or use --drop-rule random)")
        scores = score_removals(model, calibration, candidates, encoder=encoder, progress=progress)
    n_blocks = 1 + max((u.block_index for u in list_subblocks(model) if u.kind == "block"), default=0)
    return list(choose_removals(scores, n, rule, seed=seed, n_blocks=n_blocks))
