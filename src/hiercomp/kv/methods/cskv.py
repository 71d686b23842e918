"""CSKV-style low-rank channels, training-free: per layer, keys and values (all KV heads together, H_kv·D
channels) are projected on the top ``rank`` principal directions and only the ``rank`` coordinates are stored;
the newest ``residual`` tokens stay exact.

Differences from CSKV (methods/KV_CONTEXT.md §8), stated: (1) the projection is fit by an SVD of the layer's own
first encoded tokens (the prefill), not of offline calibration data, and it is stored with the cache (fp16 basis and
mean, counted in the bytes) — so it needs no calibration set and adapts to the prompt, at a fixed per-layer cost;
(2) keys are projected **post-RoPE** as transformers caches them (no pre-RoPE cache and re-rotation), which needs a
higher rank than CSKV's pre-RoPE factorisation for the same error; (3) no fine-tuning of the projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiercomp.errors import HiercompError
from hiercomp.kv.base import Encoder


def _fit(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row: mean [B, 1, 1, C] and the top-``rank`` right singular vectors [B, 1, C, r] of x [B, T, C]."""
    mean = x.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:, :rank].transpose(1, 2)  # [B, C, r']
    if basis.shape[-1] < rank:  # fewer tokens than the rank: pad with zero directions (they store nothing)
        basis = torch.nn.functional.pad(basis, (0, rank - basis.shape[-1]))
    return mean.unsqueeze(1).half(), basis.unsqueeze(1).half()


@dataclass(frozen=True)
class CSKV(Encoder):
    name: ClassVar[str] = "cskv"
    rank: int = 64
    residual: int = 32

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise HiercompError(f"cskv: rank={self.rank} must be ≥ 1 (a number of channels per layer)")

    @property
    def chunk(self) -> int:
        return 16

    def prepare(self, layer_idx: int, heads: int, head_dim: int) -> None:
        if self.rank >= heads * head_dim:
            raise HiercompError(f"cskv: rank={self.rank} is not below the layer's {heads * head_dim} K/V channels")

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        b, h, t, d = keys.shape
        out: dict[str, torch.Tensor] = {}
        for name, x in (("k", keys), ("v", values)):
            flat = x.float().transpose(1, 2).reshape(b, t, h * d)
            if previous is None:
                mean, basis = _fit(flat, self.rank)
                mean = mean.reshape(b, 1, h, d).contiguous()  # [B, 1, H, D]: decode reads the head split here
            else:
                mean, basis = previous[f"fixed_{name}_mean"], previous[f"fixed_{name}_basis"]
            out[f"fixed_{name}_mean"], out[f"fixed_{name}_basis"] = mean, basis
            latent = (flat.unsqueeze(1) - mean.float().reshape(b, 1, 1, h * d)) @ basis.float()  # [B, 1, T, r]
            out[f"{name}_latent"] = latent.half().contiguous()
        return out

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name in ("k", "v"):
            basis, mean = enc[f"fixed_{name}_basis"].float(), enc[f"fixed_{name}_mean"].float()
            b, _, heads, d = mean.shape
            flat = enc[f"{name}_latent"].float() @ basis.transpose(-1, -2) + mean.reshape(b, 1, 1, heads * d)
            out.append(flat.reshape(b, -1, heads, d).transpose(1, 2).to(dtype))
        return out[0], out[1]

    def bytes_per_token(self, heads: int, head_dim: int) -> float:
        return 2 * self.rank * 2

    def fixed_bytes(self, heads: int, head_dim: int) -> float:
        return 2 * (heads * head_dim * self.rank + heads * head_dim) * 2
