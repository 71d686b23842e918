"""Magnitude pruning: drop the smallest |w| (per layer, as the Wanda paper's baseline), or N:M per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear, SparseLinear
from hiercomp.methods.base import LayerStats, Method, parse_nm, register_method
from hiercomp.methods.prune_masks import mask_lowest_global, mask_nm


def check_sparsity(sparsity: float, pattern: str | None) -> None:
    parse_nm(pattern)
    if pattern is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@register_method
@dataclass(frozen=True)
class Magnitude(Method):
    name = "magnitude"

    sparsity: float = 0.5
    pattern: str | None = None  # "2:4" for N:M; then sparsity is implied

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, self.pattern)

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        nm = parse_nm(self.pattern)
        scores = weight.abs()
        mask = mask_nm(scores, *nm) if nm else mask_lowest_global(scores, self.sparsity)
        return SparseLinear(weight * mask, mask, bias, origin, nm=nm)
