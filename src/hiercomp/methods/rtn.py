"""Round-to-nearest: the min-max grid per row and group, no calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear, QuantizedLinear
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.quant.grid import QuantGrid, fit_grid, quantize_weight


@register_method
@dataclass(frozen=True)
class RTN(Method):
    name = "rtn"

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        QuantGrid(self.bits, self.group_size, self.symmetric)  # validates the ranges

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        grid = QuantGrid(self.bits, self.group_size, self.symmetric)
        scale, zero = fit_grid(weight, grid)
        return QuantizedLinear(grid, quantize_weight(weight, grid, scale, zero), scale, zero, bias, origin)
