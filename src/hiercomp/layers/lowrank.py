"""Low-rank weights: W ≈ A·B with A (out, r) and B (r, in) in float16, computed as y = A(Bx) + bias.

Storage is 16·r·(out + in) bits (plus the bias), which is below the dense 16·out·in only while
r < out·in / (out + in).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hiercomp.layers.base import CompressedLinear, register_layer

FACTOR_DTYPE = torch.float16
FACTOR_BITS = 16


@register_layer
class LowRankLinear(CompressedLinear):
    kind = "lowrank"

    def __init__(
        self,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        bias: torch.Tensor | None,
        origin: str = "linear",
        shape: tuple[int, int] | None = None,
        rank: int | None = None,
    ) -> None:
        if a is not None and b is not None:
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
            out_features, rank = a.shape
            in_features = b.shape[1]
        else:
            out_features, in_features = shape
        super().__init__(in_features, out_features, bias, origin)
        self.rank = rank
        if a is None:  # empty layer, to be filled by load_state_dict
            self.register_buffer("a_factor", torch.empty(out_features, rank, dtype=FACTOR_DTYPE))
            self.register_buffer("b_factor", torch.empty(rank, in_features, dtype=FACTOR_DTYPE))
            return
        self.register_buffer("a_factor", a.to(FACTOR_DTYPE).contiguous())
        self.register_buffer("b_factor", b.to(FACTOR_DTYPE).contiguous())

    def dequantize(self) -> torch.Tensor:
        return self.a_factor.float() @ self.b_factor.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.device.type == "cpu":  # the same two products, factors cast once
            return self.kernel_forward(x)
        # Two thin products instead of the dense (out, in) weight: the point of a low-rank layer.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.b_factor.to(x.dtype)), self.a_factor.to(x.dtype), bias)

    def weight_storage_bits(self) -> dict[str, int]:
        return {"a_factor": self.out_features * self.rank * FACTOR_BITS,
                "b_factor": self.rank * self.in_features * FACTOR_BITS}

    def layer_config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> LowRankLinear:
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        return cls(None, None, bias, config["origin"], shape=(config["out_features"], config["in_features"]),
                   rank=config["rank"])
