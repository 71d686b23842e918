"""Magnitude pruning: drop the smallest |w| (per layer, as the Wanda paper's baseline), or N:M per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear, SparseLinear
from hiercomp.methods.base import LayerStats, Method, parse_nm, register_method
from hiercomp.methods.prune_masks import check_nm_width, mask_lowest_global, mask_nm

DEFAULT_SPARSITY = 0.5


def check_sparsity(sparsity: float, pattern: str | None) -> float:
    """The sparsity the pruner will reach: ``sparsity`` itself, or with an N:M pattern the 1 - N/M it implies.

    A pattern fixes the sparsity, so a different explicit one (``--pattern 2:4 --sparsity 0.9``) is an error
    instead of a report that claims 0.9 for a 0.5-sparse model; the default is replaced by the implied value."""
    nm = parse_nm(pattern)
    if nm is None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return sparsity
    implied = 1 - nm[0] / nm[1]
    if sparsity != DEFAULT_SPARSITY and abs(sparsity - implied) > 1e-9:
        raise ValueError(f"pattern {pattern} fixes the sparsity at {implied:g}, but sparsity {sparsity:g} was also "
                         "given; drop the sparsity (--sparsity) or the pattern")
    return implied


@register_method
@dataclass(frozen=True)
class Magnitude(Method):
    name = "magnitude"

    sparsity: float = 0.5
    pattern: str | None = None  # "2:4" for N:M; then sparsity is implied

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, self.pattern))

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        nm = parse_nm(self.pattern)
        check_nm_width(weight.shape[1], nm, self.name, layer)
        scores = weight.abs()
        mask = mask_nm(scores, *nm) if nm else mask_lowest_global(scores, self.sparsity)
        return SparseLinear(weight * mask, mask, bias, origin, nm=nm)
