"""Remove units from a model before it is compressed, optionally recovering by distillation first.

Order matters: units are removed, the remaining blocks are (optionally) distilled against the original,
and only then are the remaining linear layers quantized / pruned (by the engine), so the compressed layers
encode the recovered weights. Layers inside removed units are not compressed; they are simply gone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hiercomp.depth.recovery import RecoveryConfig, recover
from hiercomp.depth.subblocks import describe_removals, remove_subblocks
from hiercomp.errors import HiercompError


def apply_removals(
    model: nn.Module,
    names: Sequence[str],
    calibration: torch.Tensor | None = None,
    recovery: RecoveryConfig | None = None,
    *,
    encoder: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Remove ``names`` in place (and recover when ``recovery`` is given); the facts for the saved metadata."""
    rows = describe_removals(model, names)
    teacher = copy.deepcopy(model) if recovery is not None else None  # the original, before removal
    remove_subblocks(model, names)
    facts: dict[str, Any] = {"removed": rows}
    if teacher is not None:
        if calibration is None:
            raise HiercompError("recovery distillation needs calibration data; pass --calib TEXT")
        report = recover(model, teacher, calibration, recovery, encoder=encoder, progress=progress)
        facts["recovery"] = {**report.to_dict(), "lr": recovery.lr, "batch_size": recovery.batch_size,
                             "seed": recovery.seed}
    return facts
