"""Weight-only integer quantization: packed b-bit codes, float16 scales, and zero points per row and group.

Zero points are b-bit integer codes (``zero_format="int"``, GPTQ/RTN's grid) or float16 values
(``zero_format="fp16"``: HQQ fits a real-valued zero, which an integer code cannot hold; 16 bits each).
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear, register_layer
from hiercomp.layers.packing import pack_bits, packed_nbytes, unpack_bits, unpack_rows_uint8
from hiercomp.quant.grid import SCALE_BITS, SCALE_DTYPE, QuantGrid, dequantize_weight

ZERO_FORMATS = ("int", "fp16")


@register_layer
class QuantizedLinear(CompressedLinear):
    kind = "quantized"

    def __init__(
        self,
        grid: QuantGrid,
        codes: torch.Tensor | None,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        bias: torch.Tensor | None,
        origin: str = "linear",
        shape: tuple[int, int] | None = None,
        zero_format: str = "int",
    ) -> None:
        out_features, in_features = codes.shape if codes is not None else shape
        super().__init__(in_features, out_features, bias, origin)
        if zero_format not in ZERO_FORMATS:
            raise ValueError(f"zero_format must be one of {ZERO_FORMATS}, got {zero_format!r}")
        if zero_format == "fp16" and grid.symmetric:
            raise ValueError("a symmetric grid has a fixed zero point; zero_format='fp16' needs symmetric=False")
        self.grid = grid
        self.zero_format = zero_format
        groups = grid.num_groups(in_features)
        if codes is None:  # empty layer, to be filled by load_state_dict
            self.register_buffer("qweight", torch.empty(packed_nbytes(out_features * in_features, grid.bits),
                                                        dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
            if zero_format == "fp16":
                self.register_buffer("fzeros", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
            elif not grid.symmetric:
                self.register_buffer("qzeros", torch.empty(packed_nbytes(out_features * groups, grid.bits),
                                                           dtype=torch.uint8))
            return
        self.register_buffer("qweight", self.packed_codes(codes)["qweight"])
        self.register_buffer("scales", scale.to(SCALE_DTYPE).reshape(out_features, groups))
        if zero_format == "fp16":
            # The caller chose its codes for the float16-rounded zero, so storing it loses nothing.
            self.register_buffer("fzeros", zero.to(SCALE_DTYPE).reshape(out_features, groups))
        elif not grid.symmetric:
            self.register_buffer("qzeros", pack_bits(zero.reshape(-1), grid.bits))

    def packed_codes(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored buffers for unpacked codes (out, in): what the constructor and tuning's V steps write."""
        return {"qweight": pack_bits(codes, self.grid.bits)}

    def codes(self) -> torch.Tensor:
        if self.released():
            return self.kernel.codes()
        return unpack_bits(self.qweight, self.grid.bits, self.out_features * self.in_features).view(
            self.out_features, self.in_features
        )

    def codes_uint8(self) -> torch.Tensor:
        """The codes as uint8 (bits ≤ 8), unpacked a block of rows at a time: what kernels are built from, at a
        tenth of the transient memory of :meth:`codes`."""
        if self.released():
            return self.kernel.codes().to(torch.uint8)
        return unpack_rows_uint8(self.qweight, self.grid.bits, self.out_features, self.in_features)

    # -- the fast runtime keeps the codes once, in the kernel's form -----------------------------------
    def released(self) -> bool:
        return self.kernel is not None and self.qweight.device.type == "meta"

    def release_stored(self) -> None:
        """The kernel's codes are the only copy (half the memory of keeping both); ``qweight`` comes back from
        them exactly when something reads it (saving, ``dequantize``)."""
        if self.kernel is not None and hasattr(self.kernel, "codes") and not self.released():
            self.qweight = torch.empty_like(self.qweight, device="meta")

    def restore_stored(self) -> None:
        if self.released():
            self.qweight = pack_bits(self.kernel.codes(), self.grid.bits)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.released():
            destination[prefix + "qweight"] = pack_bits(self.kernel.codes(), self.grid.bits)

    def zeros(self) -> torch.Tensor:
        groups = self.grid.num_groups(self.in_features)
        if self.zero_format == "fp16":
            return self.fzeros.float()
        if self.grid.symmetric:
            return torch.full((self.out_features, groups), float((self.grid.maxq + 1) // 2))
        return unpack_bits(self.qzeros, self.grid.bits, self.out_features * groups).view(self.out_features, groups)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.grid, self.scales, self.zeros())

    def weight_storage_bits(self) -> dict[str, int]:
        groups = self.out_features * self.grid.num_groups(self.in_features)
        bits = {"codes": self.out_features * self.in_features * self.grid.bits, "scales": groups * 16}
        if self.zero_format == "fp16":
            bits["zeros"] = groups * SCALE_BITS
        elif not self.grid.symmetric:
            bits["zeros"] = groups * self.grid.bits
        return bits

    def layer_config(self) -> dict[str, Any]:
        return {"bits": self.grid.bits, "group_size": self.grid.group_size, "symmetric": self.grid.symmetric,
                "zero_format": self.zero_format}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> QuantizedLinear:
        grid = QuantGrid(config["bits"], config["group_size"], config["symmetric"])
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        return cls(grid, None, None, None, bias, config["origin"],
                   shape=(config["out_features"], config["in_features"]),
                   # Folders saved before float zeros existed have no zero_format: integer zeros.
                   zero_format=config.get("zero_format", "int"))
