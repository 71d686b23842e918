"""Hierarchical linear quantization (ELUTQ's HLQ): b binary bit-planes with a free scale each.

Per output row and group of input columns, a weight is w ≈ z + Σⱼ sⱼ·Bⱼ with Bⱼ ∈ {0, 1}: the uniform
b-bit grid z + s·q is the special case sⱼ = s·2ʲ, and freeing the b plane scales gives a non-uniform
2^b-level grid that follows a bell-shaped group better. A bit-serial LUT kernel computes each plane's
partial product Bⱼ·x anyway, so scaling it by sⱼ instead of s·2ʲ costs nothing at inference.

Stored: the b bit-planes, each packed one bit per weight (``bitplanes``, b rows of ⌈out·in/8⌉ bytes),
float16 plane scales (out, groups, b) and float16 offsets z (out, groups):
out·in·b + out·groups·16·(b+1) bits, i.e. b + 16(b+1)/g per weight. Groups are contiguous runs of
``group_size`` input columns; a shorter last group counts as a whole group.
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear, register_layer
from hiercomp.layers.packing import pack_bits, packed_nbytes, unpack_bits
from hiercomp.quant.grid import SCALE_BITS, SCALE_DTYPE, expand_to_columns

HLQ_MAX_BITS = 4  # the fit searches all 2^b level combinations; beyond 16 levels a uniform grid is as good


def check_hlq_bits(bits: int) -> None:
    if not 1 <= bits <= HLQ_MAX_BITS:
        raise ValueError(f"HLQ bits must be between 1 and {HLQ_MAX_BITS}, got {bits}")


def hlq_values(codes: torch.Tensor, plane_scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """z + Σⱼ sⱼ·bitⱼ(code) in float32, for codes (..., n) with per-row scales (..., b) and offsets (...).

    The one formula used both by the fit (to hand GPTQ the values it fixes) and by the layer's
    ``dequantize``, so the two agree bit for bit.
    """
    codes = codes.to(torch.int32)
    out = offsets.float().unsqueeze(-1).expand(codes.shape).clone()
    for j in range(plane_scales.shape[-1]):
        out += plane_scales[..., j : j + 1].float() * ((codes >> j) & 1).float()
    return out


@register_layer
class HLQLinear(CompressedLinear):
    kind = "hlq"

    def __init__(
        self,
        bits: int,
        group_size: int | None,
        codes: torch.Tensor | None,
        plane_scales: torch.Tensor | None,
        offsets: torch.Tensor | None,
        bias: torch.Tensor | None,
        origin: str = "linear",
        shape: tuple[int, int] | None = None,
    ) -> None:
        """``codes`` (out, in) hold each weight's b plane bits as one integer (bit j = plane j)."""
        out_features, in_features = codes.shape if codes is not None else shape
        super().__init__(in_features, out_features, bias, origin)
        check_hlq_bits(bits)
        if group_size is not None and group_size < 1:
            raise ValueError(f"group size must be a positive integer, got {group_size}")
        self.bits = bits
        self.group_size = group_size
        groups = self.num_groups()
        count = out_features * in_features
        if codes is None:  # empty layer, to be filled by load_state_dict
            self.register_buffer("bitplanes", torch.empty(bits, packed_nbytes(count, 1), dtype=torch.uint8))
            self.register_buffer("plane_scales", torch.empty(out_features, groups, bits, dtype=SCALE_DTYPE))
            self.register_buffer("offsets", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
            return
        codes = codes.to(torch.int32)
        self.register_buffer("bitplanes", torch.stack([pack_bits((codes >> j) & 1, 1) for j in range(bits)]))
        self.register_buffer("plane_scales", plane_scales.to(SCALE_DTYPE).reshape(out_features, groups, bits))
        self.register_buffer("offsets", offsets.to(SCALE_DTYPE).reshape(out_features, groups))

    def num_groups(self) -> int:
        g = self.group_size
        return 1 if g is None else -(-self.in_features // g)

    def codes(self) -> torch.Tensor:
        """Each weight's plane bits as one integer (out, in), bit j from plane j."""
        count = self.out_features * self.in_features
        codes = torch.zeros(count, dtype=torch.int32)
        for j in range(self.bits):
            codes |= unpack_bits(self.bitplanes[j], 1, count) << j
        return codes.view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        scales = torch.stack([expand_to_columns(self.plane_scales[..., j], self.in_features, self.group_size)
                              for j in range(self.bits)], dim=-1)
        offsets = expand_to_columns(self.offsets, self.in_features, self.group_size)
        return hlq_values(self.codes().unsqueeze(-1), scales, offsets).squeeze(-1)

    def weight_storage_bits(self) -> dict[str, int]:
        groups = self.out_features * self.num_groups()
        return {"bitplanes": self.out_features * self.in_features * self.bits,
                "plane_scales": groups * self.bits * SCALE_BITS, "offsets": groups * SCALE_BITS}

    def layer_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> HLQLinear:
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        return cls(config["bits"], config["group_size"], None, None, None, bias, config["origin"],
                   shape=(config["out_features"], config["in_features"]))
