"""Trellis-coded quantization (QTIP's bitshift trellis, computed Gaussian codebook), Viterbi-encoded per row.

See :mod:`hiercomp.layers.trellis` for the format. Each row is scaled by its RMS (times a factor that
minimises the MSE on Gaussian rows) and the Viterbi search finds the bit path of least squared error: on a
Gaussian source, k = 2 bits per weight with an L = 16-bit state is ~0.07 bit above the Shannon bound
(benchmarks/results/frontier.md). The search costs T · 2^L · 2^k operations per row, so on a CPU L = 12 is
the practical default (~0.15 bit above); L = 16 is for small layers and measurements.

With the calibration Hessian (``ldlq=True``, the default) the trellis is paired with the Hessian sweep (QTIP
pairs it with BlockLDLQ): the columns are visited in order as GPTQ visits them, each column (all the rows) is one
trellis sequence, Viterbi-encoded from its current, error-updated values, and its error is moved onto the columns
not yet quantized, exactly as GPTQ moves a rounding error. The layer then stores its sequences by columns. The
Viterbi search runs once per column, a sequence of ``out`` steps, and each step costs 2^L: it suits small and
medium layers on a CPU (the 8 real layers of frontier.md's section 1, up to 1536 x 384: 13 s each at L = 12;
stories260K whole: 14 s at L = 12, 87 s at L = 16). The rows should be Gaussian-like: use it under rotation,
``rot_trellis``.

Scales as for the E8 codebook (:mod:`hiercomp.methods.vq`): ``row_scales=False`` keeps one for the whole
layer (on stories260K a loss: KL 0.663 against 0.493 at 3 bits), ``scale_bits=8`` stores the per-row ones in 8
bits (stories260K at 3 bits: KL 0.460 at 3.229 bpw against 0.493 at 3.332; on the real layers of frontier.md the
same output error at 0.06 bpw less).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear
from hiercomp.layers.trellis import TrellisLinear, trellis_codebook, viterbi
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.methods.hessian import (
    LazyBatchSweep,
    check_obs_params,
    inverse_cholesky_upper,
    layer_hessian,
    zero_dead_inputs,
)
from hiercomp.methods.vq import row_rms
from hiercomp.quant import stored_scales
from hiercomp.quant.stored_scales import check_scale_bits

ROW_SCALE = 1.05  # codebook scale / row RMS, MSE-optimal on Gaussian rows (measured at L = 12 and 16, k = 2)


@register_method
@dataclass(frozen=True)
class Trellis(Method):
    name = "trellis"

    bits: int = 2
    state_bits: int = 12
    ldlq: bool = True
    damp: float = 0.01
    block_size: int = 128
    row_scales: bool = True  # False: one scale for the whole layer
    scale_bits: int = 16  # 8: per-row scales as float8 ratios to a per-layer base (hiercomp.quant.stored_scales)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 4:
            raise ValueError(f"bits must be between 1 and 4, got {self.bits}")
        if not self.bits < self.state_bits <= 18:
            raise ValueError(f"state_bits must be above bits and at most 18, got {self.state_bits}")
        check_obs_params(self.damp, self.block_size)
        check_scale_bits(self.scale_bits, self.row_scales)

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.ldlq

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.ldlq

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        w = weight.float()
        scale = stored_scales.fit(row_rms(w, self.row_scales) * ROW_SCALE, self.scale_bits)
        by_columns = self.ldlq and stats is not None and stats.hessian is not None
        if by_columns:
            paths = self._sweep(w, scale, layer_hessian(stats, weight, self.name, layer), layer)
        else:
            paths = viterbi(w / scale.unsqueeze(1), self.state_bits, self.bits)
        return TrellisLinear(self.bits, self.state_bits, paths, scale, bias, origin, shape=tuple(w.shape),
                             by_columns=by_columns, row_scales=self.row_scales, scale_bits=self.scale_bits)

    def _sweep(self, w: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, layer: str) -> torch.Tensor:
        """The state paths (in, out) of the Hessian sweep, one column at a time from its current values."""
        w, h = zero_dead_inputs(w, hessian.float())
        sweep = LazyBatchSweep(w, inverse_cholesky_upper(h, self.damp, self.name, layer), self.block_size)
        paths = torch.empty(w.shape[1], w.shape[0], dtype=torch.int64)
        codebook = trellis_codebook(self.state_bits)

        def quantize_column(j: int, col: torch.Tensor) -> torch.Tensor:
            paths[j] = viterbi((col / scale).unsqueeze(0), self.state_bits, self.bits)[0]
            return scale * codebook[paths[j]]

        sweep.run(quantize_column)
        return paths
