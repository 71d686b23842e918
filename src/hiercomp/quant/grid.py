"""Uniform integer grids per (output row, group of input columns).

A b-bit grid maps a weight w to a code q = clamp(round(w / scale) + zero, 0, 2**b - 1) and back to
scale * (q - zero). Scales are stored as float16, so they are rounded to float16 *before* any code is
chosen: the codes are then optimal for the scale that is actually stored, and a reloaded model is
bit-identical to the one in memory.

Groups run along the input dimension in contiguous runs of ``group_size`` columns; when the input
width is not a multiple of the group size the last group is shorter (stories260K's MLP width 172 at
g=32 gives five groups of 32 and one of 12) and is counted as one more group, exactly.
With ``group_size=None`` each output row is one group (per-channel quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
SCALE_BITS = 16


@dataclass(frozen=True)
class QuantGrid:
    """The shape of a grid: bit width, group size (None = per channel) and symmetry."""

    bits: int
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def overhead_bits(self, out_features: int, in_features: int) -> int:
        """Bits of scales (float16) and zero points (b-bit codes; none when symmetric)."""
        groups = out_features * self.num_groups(in_features)
        return groups * (SCALE_BITS + (0 if self.symmetric else self.bits))


def group_index(in_features: int, group_size: int | None, device: torch.device | None = None) -> torch.Tensor:
    """For each input column, the index of its group."""
    cols = torch.arange(in_features, device=device)
    return torch.zeros_like(cols) if group_size is None else cols // group_size


def scale_zero_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, grid: QuantGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-rounded, returned as float32) and integer zero point for ranges [wmin, wmax].

    The range always includes 0 (as in GPTQ's quantizer) so that exact zeros stay representable.
    """
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if grid.symmetric:
        # Codes 0..2^b-1 around the fixed zero 2^(b-1): steps of max|w| / (2^(b-1) - 1) reach both
        # ends of the range without clipping (the lowest code, -2^(b-1) steps, is left unused).
        scale = torch.maximum(wmax.abs(), wmin.abs()) / ((grid.maxq + 1) // 2 - 1)
    else:
        scale = (wmax - wmin) / grid.maxq
    # All-zero groups: any scale works; 1 keeps the arithmetic finite.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(SCALE_DTYPE)
    # float16 underflow (a group of tiny weights) must not produce a zero scale.
    tiny = torch.tensor(2.0**-24, dtype=SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, tiny).float()
    if grid.symmetric:
        zero = torch.full_like(scale, (grid.maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-wmin / scale), 0, grid.maxq)
    return scale, zero


def fit_grid(weight: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per row and group: scales and zeros of shape (out_features, num_groups)."""
    w = weight.float()
    out_features, in_features = w.shape
    groups = grid.num_groups(in_features)
    g = grid.effective_group_size(in_features)
    pad = groups * g - in_features
    if pad:
        # Pad the short last group with copies of its own first column: min/max are unchanged.
        filler = w[:, (groups - 1) * g : (groups - 1) * g + 1].expand(out_features, pad)
        w = torch.cat([w, filler], dim=1)
    w = w.view(out_features, groups, g)
    return scale_zero_from_range(w.amin(dim=2), w.amax(dim=2), grid)


def quantize_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Codes for ``weight`` given per-element (broadcastable) scale and zero."""
    return torch.clamp(torch.round(weight / scale) + zero, 0, maxq)


def nearest_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The code nearest ``weight`` under s · (q − z) for a real-valued zero (HQQ's float16 zeros): round(w/s + z).
    :func:`quantize_codes`' round(w/s) + z is the same for integer zeros except on exact ties."""
    return torch.clamp(torch.round(weight / scale + zero), 0, maxq)


def expand_to_columns(per_group: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """(rows, groups) -> (rows, in_features) by repeating each group's value over its columns."""
    return per_group[:, group_index(in_features, group_size, per_group.device)]


def quantize_weight(
    weight: torch.Tensor, grid: QuantGrid, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """Integer codes (out, in) of a whole weight matrix on a fitted grid."""
    in_features = weight.shape[1]
    s = expand_to_columns(scale, in_features, grid.group_size)
    z = expand_to_columns(zero, in_features, grid.group_size)
    return quantize_codes(weight.float(), s, z, grid.maxq)


def dequantize_weight(
    codes: torch.Tensor, grid: QuantGrid, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    in_features = codes.shape[1]
    s = expand_to_columns(scale.float(), in_features, grid.group_size)
    z = expand_to_columns(zero.float(), in_features, grid.group_size)
    return s * (codes.float() - z)
