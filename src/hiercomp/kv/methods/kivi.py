"""KIVI: asymmetric min/max quantization, keys per channel (groups of ``group_size`` tokens, so outlier channels get
their own range) and values per token (groups of ``group_size`` channels), the newest ``residual`` tokens kept at
full precision. Codes are packed into uint8; min and step are fp16 (b + 32/G bits per element, the paper's count)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiercomp.errors import HiercompError
from hiercomp.kv.base import Encoder
from hiercomp.kv.packing import pack, unpack


def _quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, fp16 min and fp16 step of x with one range per slice along ``dim`` (the group's axis)."""
    low = x.amin(dim=dim, keepdim=True).half()
    step = ((x.amax(dim=dim, keepdim=True) - low.float()) / (2**bits - 1)).half()
    safe = torch.where(step > 0, step, torch.ones_like(step)).float()
    codes = ((x - low.float()) / safe).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, low, step


@dataclass(frozen=True)
class KIVI(Encoder):
    name: ClassVar[str] = "kivi"
    bits: int = 2
    group_size: int = 32
    residual: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise HiercompError(f"kivi: bits={self.bits} is not supported; use 2, 4 or 8")
        if self.group_size < 1 or self.residual < 0:
            raise HiercompError("kivi: group_size must be ≥ 1 and residual ≥ 0")

    @property
    def chunk(self) -> int:
        return self.group_size

    def _value_group(self, head_dim: int) -> int:
        group = min(self.group_size, head_dim)
        if head_dim % group:
            raise HiercompError(f"kivi: group_size={self.group_size} does not divide head_dim {head_dim}")
        return group

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        b, h, n, d = keys.shape
        g = self.group_size
        if d * self.bits % 8:
            raise HiercompError(f"kivi: head_dim {d} × {self.bits} bits is not a whole number of bytes")
        k_codes, k_min, k_step = _quantize(keys.float().reshape(b, h, n // g, g, d), self.bits, dim=3)
        gv = self._value_group(d)
        v_codes, v_min, v_step = _quantize(values.float().reshape(b, h, n, d // gv, gv), self.bits, dim=4)
        return {
            "k_codes": pack(k_codes.reshape(b, h, n, d), self.bits),
            "k_min": k_min.reshape(b, h, n // g, d).contiguous(),
            "k_step": k_step.reshape(b, h, n // g, d).contiguous(),
            "v_codes": pack(v_codes.reshape(b, h, n, d), self.bits),
            "v_min": v_min.reshape(b, h, n, d // gv).contiguous(),
            "v_step": v_step.reshape(b, h, n, d // gv).contiguous(),
        }

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n = enc["k_codes"].shape[:3]
        d = enc["k_min"].shape[-1]
        g = self.group_size
        gv = self._value_group(d)
        k_codes = unpack(enc["k_codes"], self.bits, d).reshape(b, h, n // g, g, d).float()
        keys = k_codes * enc["k_step"].float().unsqueeze(3) + enc["k_min"].float().unsqueeze(3)
        v_codes = unpack(enc["v_codes"], self.bits, d).reshape(b, h, n, d // gv, gv).float()
        values = v_codes * enc["v_step"].float().unsqueeze(-1) + enc["v_min"].float().unsqueeze(-1)
        return keys.reshape(b, h, n, d).to(dtype), values.reshape(b, h, n, d).to(dtype)

    def bytes_per_token(self, heads: int, head_dim: int) -> float:
        codes = 2 * head_dim * self.bits / 8
        key_meta = head_dim * 2 * 2 / self.group_size
        value_meta = head_dim // self._value_group(head_dim) * 2 * 2
        return heads * (codes + key_meta + value_meta)
