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

from hiercomp.quant.grid import SCALE_BITS, SCALE_DTYPE

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


def fit(values: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """Fitted scales (rows,) as a layer will store them: float16-rounded, never 0 (2^-24 for an all-zero row),
    then in ``scale_bits``; float32. The codes are chosen under these."""
    scale = values.to(SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, torch.tensor(2.0**-24, dtype=SCALE_DTYPE)).float()
    return representable(scale.unsqueeze(1), scale_bits).squeeze(1)


class StoredScales:
    """What a codebook layer (E8, trellis) does with its scales: registers them in ``scale_bits`` (per row, or one
    per layer without ``row_scales``), gives the float32 values it computes with, counts their bits and writes
    the options to its config (absent at their defaults, as in folders saved before them)."""

    row_scales: bool
    scale_bits: int

    def _register_scales(self, scales: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        """``shape``: the ``scales`` buffer's, (rows,) or (rows, stages), rows 1 without ``row_scales``."""
        rows, columns = shape[0], (shape[1] if len(shape) > 1 else 1)
        stored = (empty_buffers(rows, columns, self.scale_bits) if scales is None
                  else split(scales.float().reshape(rows, columns), self.scale_bits))
        self.register_buffer("scales", stored["scales"].reshape(shape).clone())  # type: ignore[attr-defined]
        if "scale_base" in stored:
            self.register_buffer("scale_base", stored["scale_base"].clone())  # type: ignore[attr-defined]

    def scale_values(self) -> torch.Tensor:
        """The float32 scales, shaped as the ``scales`` buffer."""
        return joined(self.scales, getattr(self, "scale_base", None))  # type: ignore[attr-defined]

    def scale_storage_bits(self) -> dict[str, int]:
        bits = {"scales": self.scales.numel() * self.scale_bits}  # type: ignore[attr-defined]
        if self.scale_bits != SCALE_BITS:
            bits["scale_base"] = self.scale_base.numel() * SCALE_BITS  # type: ignore[attr-defined]
        return bits

    def scale_config(self) -> dict[str, object]:
        config: dict[str, object] = {}
        if not self.row_scales:
            config["row_scales"] = False
        if self.scale_bits != SCALE_BITS:
            config["scale_bits"] = self.scale_bits
        return config
