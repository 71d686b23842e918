"""BitStack layers: a weight peeled into a stack of ~1-bit residual blocks, usable from any prefix.

With the input-channel scales s (activation-aware, see :mod:`hiercomp.methods.bitstack`), the scaled
weight W' = W·diag(s) is approximated by a sum of blocks, Ŵ' = Σ_{i<active} Sᵢ ⊙ (uᵢ vᵢᵀ), with Sᵢ a ±1
sign matrix and uᵢ (out, k), vᵢ (k, in) float16 factors of a rank-k approximation of the residual's
magnitude. The layer computes y = Ŵ'·(x ⊘ s) + b, i.e. uses the weight Ŵ'·diag(1/s).

Stored: ``signs`` (n_blocks, ⌈out·in/8⌉) uint8, one bit per weight per block (1 = +1), each block
padded to whole bytes on its own so that the first b blocks are a byte-aligned prefix a budget load
can read alone; ``u`` (n_blocks, out, k) and ``v`` (n_blocks, k, in) float16; ``col_scale`` (in,)
float16. The scales are stored rather than folded into the previous operation: 16·in bits per layer
(under 0.3% of one block on any layer here) buys a layer that needs no change to the rest of the model.
One block costs 8·⌈out·in/8⌉ + 16·k·(out + in) bits.

``active`` (≤ the stored blocks) is how many blocks the forward uses; ``storage_bits`` counts those.
``block_errors[i]`` is the layer's relative activation-weighted error with i blocks (recorded at
compression, used to order blocks across layers).
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear, register_layer
from hiercomp.layers.packing import pack_bits, packed_nbytes, unpack_bits

FACTOR_DTYPE = torch.float16
FACTOR_BITS = 16
SCALE_BITS = 16


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """A ±1 (out, in) matrix as one bit per weight (1 = +1), ⌈out·in/8⌉ bytes."""
    return pack_bits((signs > 0).to(torch.int32), 1)


def block_bits(out_features: int, in_features: int, rank: int) -> int:
    """Stored bits of one residual block: packed signs (whole bytes) + two float16 factors."""
    return 8 * packed_nbytes(out_features * in_features, 1) + FACTOR_BITS * rank * (out_features + in_features)


@register_layer
class BitStackLinear(CompressedLinear):
    kind = "bitstack"

    def __init__(
        self,
        signs: torch.Tensor | None,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        col_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        origin: str = "linear",
        block_errors: list[float] | None = None,
        *,
        shape: tuple[int, int] | None = None,
        rank: int | None = None,
        n_blocks: int | None = None,
        active: int | None = None,
    ) -> None:
        """Either the packed tensors (``signs`` (n, ⌈out·in/8⌉) uint8, ``u`` (n, out, k), ``v`` (n, k, in),
        ``col_scale`` (in,)), or ``shape``, ``rank`` and ``n_blocks`` for an empty layer to be filled
        by ``load_state_dict``."""
        if u is not None and v is not None:
            n_blocks, out_features, rank = u.shape
            in_features = v.shape[2]
        else:
            out_features, in_features = shape
        super().__init__(in_features, out_features, bias, origin)
        self.rank = int(rank)
        self.n_blocks = int(n_blocks)
        self.active = self.n_blocks if active is None else int(active)
        if not 1 <= self.active <= self.n_blocks:
            raise ValueError(f"active blocks must be in 1..{self.n_blocks}, got {self.active}")
        self.block_errors = list(block_errors or [])
        row_bytes = packed_nbytes(out_features * in_features, 1)
        if u is None:
            self.register_buffer("signs", torch.empty(self.n_blocks, row_bytes, dtype=torch.uint8))
            self.register_buffer("u", torch.empty(self.n_blocks, out_features, self.rank, dtype=FACTOR_DTYPE))
            self.register_buffer("v", torch.empty(self.n_blocks, self.rank, in_features, dtype=FACTOR_DTYPE))
            self.register_buffer("col_scale", torch.empty(in_features, dtype=FACTOR_DTYPE))
            return
        if signs.shape != (self.n_blocks, row_bytes) or v.shape != (self.n_blocks, self.rank, in_features) or \
                col_scale.shape != (in_features,):
            raise ValueError(f"BitStack tensors do not fit together: signs {tuple(signs.shape)}, u {tuple(u.shape)}, "
                             f"v {tuple(v.shape)}, col_scale {tuple(col_scale.shape)}")
        self.register_buffer("signs", signs.to(torch.uint8).contiguous())
        self.register_buffer("u", u.to(FACTOR_DTYPE).contiguous())
        self.register_buffer("v", v.to(FACTOR_DTYPE).contiguous())
        self.register_buffer("col_scale", col_scale.to(FACTOR_DTYPE).contiguous())

    def block_bits(self) -> int:
        return block_bits(self.out_features, self.in_features, self.rank)

    def set_active(self, active: int) -> None:
        """Use only the first ``active`` stored blocks from now on."""
        if not 1 <= active <= self.n_blocks:
            raise ValueError(f"active blocks must be in 1..{self.n_blocks}, got {active}")
        self.active = int(active)
        if self.kernel is not None:  # the fast path was built for the old prefix of blocks
            from hiercomp.layers.kernels import select_kernel

            self.kernel = select_kernel(self)

    def scaled_weight(self, blocks: int | None = None) -> torch.Tensor:
        """Ŵ' = Σ_{i<blocks} Sᵢ ⊙ (uᵢ vᵢᵀ) in float32 (default: the active blocks)."""
        blocks = self.active if blocks is None else blocks
        count = self.out_features * self.in_features
        bits = torch.stack([unpack_bits(self.signs[i], 1, count) for i in range(blocks)])
        signs = (bits * 2 - 1).float().view(blocks, self.out_features, self.in_features)
        magnitudes = torch.bmm(self.u[:blocks].float(), self.v[:blocks].float())
        return (signs * magnitudes).sum(dim=0)

    def dequantize(self) -> torch.Tensor:
        return self.scaled_weight() / self.col_scale.float()

    def _bits(self, blocks: int) -> dict[str, int]:
        m, n, k = self.out_features, self.in_features, self.rank
        return {"signs": blocks * 8 * self.signs.shape[1], "u": blocks * m * k * FACTOR_BITS,
                "v": blocks * k * n * FACTOR_BITS, "col_scale": n * SCALE_BITS}

    def weight_storage_bits(self) -> dict[str, int]:
        """Bits of what the forward uses: the active blocks (and the column scales)."""
        return self._bits(self.active)

    def stack_storage_bits(self) -> dict[str, int]:
        """Bits of every stored block (the whole stack as saved at full size)."""
        return self._bits(self.n_blocks)

    def layer_config(self) -> dict[str, Any]:
        return {"rank": self.rank, "n_blocks": self.n_blocks, "active": self.active,
                "block_errors": self.block_errors}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> BitStackLinear:
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        return cls(None, None, None, None, bias, config["origin"], config.get("block_errors"),
                   shape=(config["out_features"], config["in_features"]), rank=config["rank"],
                   n_blocks=config["n_blocks"], active=config.get("active"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks {self.active}/{self.n_blocks}, rank {self.rank}"
