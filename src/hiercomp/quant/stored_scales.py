"""Row scales stored in 16 or 8 bits, for the codebook layers (E8, trellis) whose only side information they are.

16 bits: one float16 per row (and stage). 8 bits: one float8 (e4m3) ratio per row and one float16 base per
column of scales (a stage), a power of two: 2^⌈log2 max⌉ / 2^8, so every ratio is at most 256 (e4m3 reaches 448)
and rows down to 2^-14 of the largest keep e4m3's full 3-bit mantissa. The ratio is off by at most 1/16 of
itself, but the codes are chosen under the stored scale, so that is only a slightly different scale, near the
flat bottom of the error curve: at 3 bits on a 128 x 256 test layer the output error moved by +4.4 % for quip
(0.062 bpw less) and +0.8 % for rot_trellis (0.031 less; tests/methods/test_frontier.py). What it saves is 8 bits
per row and stage: 0.125 bpw on a 64-wide row.

Both forms are floating-point buffers, so recovery tuning (:mod:`hiercomp.tune`) trains them as they are
stored, rounded in the forward to float8 and float16.
"""

from __future__ import annotations

import torch

from hiercomp.quant.grid import SCALE_DTYPE

SCALE8_DTYPE = torch.float8_e4m3fn
BASE_SHIFT = 8
SCALE_BITS_CHOICES = (16, 8)


def check_scale_bits(scale_bits: int, row_scales: bool = True) -> None:
    if scale_bits not in SCALE_BITS_CHOICES:
        raise ValueError(f"scale_bits must be 16 or 8, got {scale_bits!r}")
    if scale_bits == 8 and not row_scales:
        raise ValueError("scale_bits=8 stores per-row scales in 8 bits; with row_scales=false there is one "
                         "float16 scale per layer: leave scale_bits at 16")


def split(scales: torch.Tensor, scale_bits: int) -> dict[str, torch.Tensor]:
    """The stored buffers for float scales (rows, columns): ``scales`` (float16, or float8 ratios) and, in 8 bits,
    ``scale_base`` (columns,) float16."""
    if scale_bits == 16:
        return {"scales": scales.to(SCALE_DTYPE)}
    peak = scales.float().abs().amax(dim=0).clamp_min(2.0**-14)
    base = torch.exp2(torch.ceil(torch.log2(peak)) - BASE_SHIFT).to(SCALE_DTYPE)
    ratios = (scales.float() / base.float()).clamp_min(2.0**-9)  # e4m3's least positive value: never a 0 scale
    return {"scales": ratios.to(SCALE8_DTYPE), "scale_base": base}


def joined(stored: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """The float32 scales a layer computes with, from its stored buffers (``base`` None in 16 bits)."""
    return stored.float() if base is None else stored.float() * base.float()


def representable(scales: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """``scales`` (rows, columns) rounded to what ``scale_bits`` stores, as float32: what the codes must be
    chosen under."""
    parts = split(scales, scale_bits)
    return joined(parts["scales"], parts.get("scale_base"))


def empty_buffers(rows: int, columns: int, scale_bits: int) -> dict[str, torch.Tensor]:
    """Buffers of the right shapes and dtypes, for a layer about to load a saved state."""
    if scale_bits == 16:
        return {"scales": torch.empty(rows, columns, dtype=SCALE_DTYPE)}
    return {"scales": torch.empty(rows, columns, dtype=SCALE8_DTYPE),
            "scale_base": torch.empty(columns, dtype=SCALE_DTYPE)}
