"""Wanda: score |W_ij| * ||X_j||, drop the lowest per output row (or N:M per row); no weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear, SparseLinear
from hiercomp.methods.base import LayerStats, Method, parse_nm, register_method
from hiercomp.methods.magnitude import check_sparsity
from hiercomp.methods.prune_masks import check_nm_width, mask_lowest_per_row, mask_nm


@register_method
@dataclass(frozen=True)
class Wanda(Method):
    name = "wanda"
    needs_calibration = True

    sparsity: float = 0.5
    pattern: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, self.pattern))

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        nm = parse_nm(self.pattern)
        check_nm_width(weight.shape[1], nm, self.name, layer)
        scores = weight.abs() * stats.channel_sq_mean.sqrt().unsqueeze(0)
        mask = mask_nm(scores, *nm) if nm else mask_lowest_per_row(scores, self.sparsity)
        return SparseLinear(weight * mask, mask, bias, origin, nm=nm)
