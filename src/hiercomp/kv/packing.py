"""Bit packing of small unsigned codes into uint8 along the last dimension (real bytes, not simulated)."""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (uint8, values < 2**bits) [..., n] → uint8 [..., n·bits/8]; n·bits must be a multiple of 8."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [..., n·bits/8] → uint8 codes [..., n]."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], n)
