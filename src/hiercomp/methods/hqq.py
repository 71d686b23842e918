"""HQQ-style half-quadratic quantization: a calibration-free fit of each group's zero point.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). The grid is the
uniform b-bit one, w ≈ s·(q − z), with the scale s fixed by the group's min-max range and the zero z
fitted to minimise an lp norm (p < 1) of the error W − s(Q − z), which cares less about a few large
errors than about many small ones. Half-quadratic splitting adds an auxiliary error variable E and
alternates two closed-form steps:

1. E ← shrink(W − s(Q − z)): the proximal step of the lp norm, a generalised soft threshold
   sign(x)·max(|x| − |x|^(p−1)/β, 0);
2. z ← mean(Q − (W − E)/s) with Q = round(W/s + z): the zero that best explains W − E;

and β grows by κ each round, tightening the coupling. The zero is a real number, stored as float16
(``QuantizedLinear`` with ``zero_format="fp16"``, 16 bits per row and group), and rounded to float16
before any code is chosen so that the codes are the best ones for what is stored.

Which round to keep is decided per group by the squared weight error (the quantity every report here
measures), with RTN's own integer-zero grid as one more candidate: the result is never worse than RTN
at the same bit width and group size (it stores 16-bit zeros where RTN stores b-bit ones, so it spends
more bits for it). The shrinkage threshold |x|^(p−1)/β is in the weights' own units, as in HQQ: with the
default β = 10 and weights of magnitude ~0.01–0.1 it exceeds nearly every rounding error, so E stays 0
and the update is the plain least-squares zero; on weights of order 1 the lp shrinkage takes effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear, QuantizedLinear
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.methods.hlq import fit_row_groups
from hiercomp.quant.grid import SCALE_DTYPE, QuantGrid, nearest_codes, scale_zero_from_range


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(SCALE_DTYPE).float()


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of the lp (p ≤ 1) norm: sign(x)·max(|x| − |x|^(p−1)/β, 0)."""
    mag = x.abs()
    # |x|^(p−1) is infinite at 0; clamping keeps it finite (and the result 0 there all the same).
    return torch.sign(x) * torch.relu(mag - mag.clamp_min(1e-12).pow(p - 1) / beta)


def _codes(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return nearest_codes(rows, scale.unsqueeze(1), zero.unsqueeze(1), maxq)


def _sq_error(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # Same expression as dequantize_weight: s · (q − z).
    return (rows - scale.unsqueeze(1) * (codes - zero.unsqueeze(1))).pow(2).sum(dim=1)


def fit_hqq_rows(
    rows: torch.Tensor, bits: int, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ on each row of ``rows`` (N, g), one group per row: codes (N, g), scale (N,), zero (N,).

    Scale and zero are float16 values held in float32; codes are integers in [0, 2^b − 1] held as float.
    """
    rows = rows.float()
    maxq = 2**bits - 1
    wmin, wmax = rows.amin(dim=1), rows.amax(dim=1)
    # HQQ's range is the group's own min-max (not widened to include 0 as RTN's is): a finer step.
    scale = _fp16((wmax - wmin) / maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups (or float16 underflow)
    zero = -wmin / scale

    best_zero = _fp16(zero)
    best_codes = _codes(rows, scale, best_zero, maxq)
    best_err = _sq_error(rows, best_codes, scale, best_zero)
    for _ in range(iters):
        stored = _fp16(zero)
        codes = _codes(rows, scale, stored, maxq)
        err = _sq_error(rows, codes, scale, stored)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, stored, best_zero)
        best_codes = torch.where(better.unsqueeze(1), codes, best_codes)
        residual = shrink_lp(rows - scale.unsqueeze(1) * (codes - stored.unsqueeze(1)), beta, lp_norm)
        zero = (codes - (rows - residual) / scale.unsqueeze(1)).mean(dim=1)
        beta *= kappa
    stored = _fp16(zero)  # the last update has not been scored yet
    codes = _codes(rows, scale, stored, maxq)
    err = _sq_error(rows, codes, scale, stored)
    better = err < best_err
    best_err, best_zero = torch.where(better, err, best_err), torch.where(better, stored, best_zero)
    best_codes = torch.where(better.unsqueeze(1), codes, best_codes)

    # RTN's grid as a last candidate (its integer zero is exact in float16).
    rtn_scale, rtn_zero = scale_zero_from_range(wmin, wmax, QuantGrid(bits))
    rtn_codes = _codes(rows, rtn_scale, rtn_zero, maxq)
    rtn_better = _sq_error(rows, rtn_codes, rtn_scale, rtn_zero) < best_err
    return (torch.where(rtn_better.unsqueeze(1), rtn_codes, best_codes),
            torch.where(rtn_better, rtn_scale, scale), torch.where(rtn_better, rtn_zero, best_zero))


@register_method
@dataclass(frozen=True)
class HQQ(Method):
    name = "hqq"

    bits: int = 4
    group_size: int | None = 64
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        QuantGrid(self.bits, self.group_size)  # validates bits and group size
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.kappa >= 1:
            raise ValueError(f"kappa must be >= 1, got {self.kappa}")

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        grid = QuantGrid(self.bits, self.group_size)
        codes, scale, zero = fit_row_groups(
            weight.float(), self.group_size,
            lambda rows: fit_hqq_rows(rows, self.bits, self.iters, self.lp_norm, self.beta, self.kappa))
        return QuantizedLinear(grid, codes, scale, zero, bias, origin, zero_format="fp16")
