"""Trellis-coded quantization (QTIP's bitshift trellis, computed Gaussian codebook), Viterbi-encoded per row.

See :mod:`hiercomp.layers.trellis` for the format. Each row is scaled by its RMS (times a factor that
minimises the MSE on Gaussian rows) and the Viterbi search finds the bit path of least squared error: on a
Gaussian source, k = 2 bits per weight with an L = 16-bit state is ~0.07 bit above the Shannon bound
(benchmarks/results/frontier.md). The search costs T · 2^L · 2^k operations per row, so on a CPU L = 12 is
the practical default (~0.15 bit above); L = 16 is for small layers and measurements. No Hessian error
feedback here (QTIP pairs the trellis with BlockLDLQ): use it under rotation, ``rot_trellis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear
from hiercomp.layers.trellis import TrellisLinear, viterbi
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.quant.grid import SCALE_DTYPE

ROW_SCALE = 1.05  # codebook scale / row RMS, MSE-optimal on Gaussian rows (measured at L = 12 and 16, k = 2)


@register_method
@dataclass(frozen=True)
class Trellis(Method):
    name = "trellis"

    bits: int = 2
    state_bits: int = 12

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 4:
            raise ValueError(f"bits must be between 1 and 4, got {self.bits}")
        if not self.bits < self.state_bits <= 18:
            raise ValueError(f"state_bits must be above bits and at most 18, got {self.state_bits}")

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        w = weight.float()
        rms = w.pow(2).mean(dim=1).sqrt()
        scale = (torch.where(rms > 0, rms, torch.ones_like(rms)) * ROW_SCALE).to(SCALE_DTYPE)
        scale = torch.where(scale > 0, scale, torch.tensor(2.0**-24, dtype=SCALE_DTYPE)).float()
        paths = viterbi(w / scale.unsqueeze(1), self.state_bits, self.bits)
        return TrellisLinear(self.bits, self.state_bits, paths, scale, bias, origin, shape=tuple(w.shape))
