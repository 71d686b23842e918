"""Mustafar: per-token magnitude pruning of keys and values (each token's head vector keeps its largest
``1 - sparsity`` entries), stored exactly as a bitmap of the kept positions plus their fp16 values; the newest
``residual`` tokens stay dense. Every token keeps the same count, so no offsets are needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiercomp.errors import HiercompError
from hiercomp.kv.base import Encoder
from hiercomp.kv.packing import pack, unpack


@dataclass(frozen=True)
class Mustafar(Encoder):
    name: ClassVar[str] = "mustafar"
    sparsity: float = 0.5
    residual: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise HiercompError(f"mustafar: sparsity={self.sparsity} must lie in (0, 1)")

    def kept(self, head_dim: int) -> int:
        return max(head_dim - int(self.sparsity * head_dim), 1)

    def _encode_one(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        d = x.shape[-1]
        if d % 8:
            raise HiercompError(f"mustafar: head_dim {d} is not a multiple of 8 (the bitmap packs 8 per byte)")
        idx = x.abs().topk(self.kept(d), dim=-1).indices.sort(dim=-1).values
        mask = torch.zeros(x.shape, dtype=torch.uint8, device=x.device).scatter_(-1, idx, 1)
        return {f"{prefix}_bitmap": pack(mask, 1), f"{prefix}_values": x.gather(-1, idx).half().contiguous()}

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return {**self._encode_one(keys, "k"), **self._encode_one(values, "v")}

    def _decode_one(self, enc: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> torch.Tensor:
        bitmap, vals = enc[f"{prefix}_bitmap"], enc[f"{prefix}_values"]
        mask = unpack(bitmap, 1, bitmap.shape[-1] * 8).bool()
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_scatter_(mask, vals.to(dtype))

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode_one(enc, "k", dtype), self._decode_one(enc, "v", dtype)

    def bytes_per_token(self, heads: int, head_dim: int) -> float:
        return 2 * heads * (head_dim / 8 + 2 * self.kept(head_dim))
