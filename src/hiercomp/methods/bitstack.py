"""BitStack: iterative absolute-value decomposition into ~1-bit residual blocks (any-size models).

Per layer (BitStack, Wang et al. 2024; see the layer's module for the stored form):
1. activation-aware column scaling: s_j ∝ sqrt(E[x_j²]) (the RMS of input channel j over the
   calibration tokens, normalised to mean 1 so the factors stay well inside float16), plus ``eps``,
   rounded to float16 — the scale actually stored; W' = W·diag(s), so ||W' − Ŵ'||²_F is the
   activation-weighted error Σ_j s_j² ||ΔW_j||² the decomposition then reduces;
2. R₀ = W'; for each block i: Sᵢ = sign(R) (sign(0) = +1), |R| ≈ U_k Σ_k V_kᵀ (truncated SVD of the
   *absolute value*), uᵢ = U_k Σ_k^½, vᵢ = Σ_k^½ V_kᵀ rounded to float16, and R ← R − Sᵢ ⊙ (uᵢ vᵢᵀ)
   computed with the rounded factors that are stored (the BitStack repo subtracts the float32 ones and
   drifts). Since Sᵢ ⊙ |R| = R, ||R − Sᵢ⊙A||_F = |||R| − A||_F ≤ ||R||_F: each block lowers the error.
3. the layer records its relative activation-weighted error after each block (``block_errors``); the
   global order of blocks across layers (:mod:`hiercomp.anysize`) is built from those at save time.

Rank k: ``rank``, or by default the largest k ≤ 16 whose factors cost at most 1/8 bit per weight
(16·k·(out+in) ≤ out·in/8), at least 1 — the paper's k = 16 on 4096×4096, k = 1 on small layers where
k = 16 would cost several bits per weight per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.errors import HiercompError
from hiercomp.layers import CompressedLinear
from hiercomp.layers.bitstack import FACTOR_BITS, FACTOR_DTYPE, BitStackLinear, pack_signs
from hiercomp.methods.base import LayerStats, Method, register_method

MAX_AUTO_RANK = 16
FACTOR_SHARE = 8  # default rank: factors cost at most 1/FACTOR_SHARE bit per weight per block


def default_rank(out_features: int, in_features: int) -> int:
    fits = (out_features * in_features) // (FACTOR_SHARE * FACTOR_BITS * (out_features + in_features))
    return max(1, min(MAX_AUTO_RANK, fits))


def activation_scales(stats: LayerStats | None, in_features: int, eps: float, method: str, layer: str
                      ) -> torch.Tensor:
    """s_j ∝ RMS of input channel j (mean 1) + eps, as stored (float16), returned in float32."""
    if stats is None:
        raise HiercompError(f"{method} needs calibration data for layer {layer}: pass --calib FILE")
    sq = stats.channel_sq_mean.double()
    if sq.shape != (in_features,) or not bool(torch.isfinite(sq).all()):
        raise HiercompError(f"{method}: the input statistics of layer {layer} do not fit its {in_features} input "
                            "columns or are not finite")
    rms = sq.clamp_min(0).sqrt()
    mean = float(rms.mean())
    rms = rms / mean if mean > 0 else torch.ones_like(rms)
    return (rms + eps).to(FACTOR_DTYPE).float()


def decompose(scaled: torch.Tensor, n_blocks: int, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Iterative absolute-value decomposition of ``scaled`` (out, in): packed signs (n, bytes), u (n, out, k),
    v (n, k, in) in float16, and the residual after each block (float32)."""
    residual = scaled.float().clone()
    signs, us, vs, residuals = [], [], [], []
    for _ in range(n_blocks):
        sign = torch.where(residual >= 0, 1.0, -1.0)
        left, sigma, right = torch.linalg.svd(residual.abs(), full_matrices=False)
        root = sigma[:rank].sqrt()
        u = (left[:, :rank] * root).to(FACTOR_DTYPE)
        v = (root.unsqueeze(1) * right[:rank]).to(FACTOR_DTYPE)
        residual = residual - sign * (u.float() @ v.float())
        signs.append(pack_signs(sign))
        us.append(u)
        vs.append(v)
        residuals.append(residual.clone())
    return torch.stack(signs), torch.stack(us), torch.stack(vs), residuals


@register_method
@dataclass(frozen=True)
class BitStack(Method):
    name = "bitstack"
    needs_calibration = True

    n_blocks: int = 16
    rank: int | None = None
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def layer_rank(self, out_features: int, in_features: int, layer: str) -> int:
        if self.rank is None:
            return default_rank(out_features, in_features)
        limit = min(out_features, in_features)
        if self.rank > limit:
            raise HiercompError(f"bitstack: rank {self.rank} for layer {layer} is above min(out, in) = {limit} "
                                f"(its weight is {out_features}x{in_features}); pass rank <= {limit}")
        return self.rank

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        out_features, in_features = weight.shape
        rank = self.layer_rank(out_features, in_features, layer)
        scale = activation_scales(stats, in_features, self.eps, self.name, layer)
        scaled = weight.float() * scale
        signs, u, v, residuals = decompose(scaled, self.n_blocks, rank)
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
            raise HiercompError(f"bitstack: the factors of layer {layer} overflow float16; check its weights")
        # Relative activation-weighted error Σ_j E[x_j²]·||ΔW_j||² / Σ_j E[x_j²]·||W_j||² after each block,
        # measured with the stored scale: ΔW = R/s column by column.
        weights = stats.channel_sq_mean.float() / (scale * scale)
        total = float((scaled.pow(2) * weights).sum()) or 1.0
        errors = [1.0] + [float((r.pow(2) * weights).sum()) / total for r in residuals]
        return BitStackLinear(signs, u, v, scale, bias, origin, errors)
