"""Activation-aware truncated SVD: W ≈ A·B with A (out, r), B (r, in), stored in float16.

What matters is the output error tr(ΔW H ΔWᵀ) = ||ΔW·S||²_F for any S with S Sᵀ = H = E[x xᵀ]. So the
SVD is taken of W·S, truncated to rank r (Eckart–Young: the best rank-r approximation in that norm),
and mapped back: W·S ≈ U_r Σ_r V_rᵀ gives A = U_r Σ_r^½ and B = Σ_r^½ V_rᵀ S⁻¹ (Σ split evenly between
the factors so that neither leaves the float16 range).

``whiten`` picks S:
- ``"hessian"`` (default): S = L, the lower Cholesky factor of H + λI (as SVD-LLM). The truncation is
  then optimal for the output error itself, input correlations included.
- ``"channel"``: S = diag(sqrt(E[x_j²] + λ)), which only weighs the input channels (ASVD-like); it needs
  only the per-channel statistic.
λ = damp · mean(diag H) keeps S invertible where an input is (nearly) never active.

Rank: ``rank`` directly, or ``rank_ratio`` × min(out, in) (rounded, at least 1); with neither, a quarter
of min(out, in) (so that ``--method svd`` works from the command line, which has no rank option). Storage is
16·r·(out + in) bits, smaller than dense float16 only for r < out·in / (out + in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.errors import HiercompError
from hiercomp.layers import CompressedLinear
from hiercomp.layers.lowrank import FACTOR_DTYPE, LowRankLinear
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.methods.hessian import CHOLESKY_RETRIES, layer_hessian

WHITENINGS = ("hessian", "channel")
DEFAULT_RANK_RATIO = 0.25


def _cholesky_lower(h: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """Lower Cholesky factor of H + λI, λ = damp · mean(diag H), raising λ tenfold when H is singular."""
    mean_diag = float(torch.diagonal(h).mean().clamp_min(1e-30))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    factor = damp if damp > 0 else 1e-6
    for _ in range(CHOLESKY_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + factor * mean_diag * eye)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            return lower
        factor *= 10
    raise HiercompError(f"svd: the Hessian of layer {layer} is not positive definite even with damp={factor / 10:g}; "
                        "pass a larger damp or whiten='channel'")


@register_method
@dataclass(frozen=True)
class SVD(Method):
    name = "svd"
    needs_calibration = True

    rank: int | None = None
    rank_ratio: float | None = None
    whiten: str = "hessian"
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError("give rank or rank_ratio, not both")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}")
        if self.whiten not in WHITENINGS:
            raise ValueError(f"whiten must be one of {', '.join(WHITENINGS)}, got {self.whiten!r}")
        if not self.damp >= 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        # Only the Cholesky whitening reads E[x xᵀ]; the channel one gets by with E[x²].
        return self.whiten == "hessian"

    def layer_rank(self, out_features: int, in_features: int, layer: str) -> int:
        """The rank used for a layer of this shape (one-line error when it cannot be had)."""
        limit = min(out_features, in_features)
        ratio = DEFAULT_RANK_RATIO if self.rank_ratio is None else self.rank_ratio
        rank = self.rank if self.rank is not None else max(1, round(ratio * limit))
        if rank < 1:
            raise HiercompError(f"svd: rank must be >= 1 for layer {layer}, got {rank}")
        if rank > limit:
            raise HiercompError(f"svd: rank {rank} for layer {layer} is above min(out, in) = {limit} "
                                f"(its weight is {out_features}x{in_features})")
        return rank

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        out_features, in_features = weight.shape
        rank = self.layer_rank(out_features, in_features, layer)
        w = weight.double()
        if self.whiten == "hessian":
            lower = _cholesky_lower(layer_hessian(stats, weight, self.name, layer).double(), self.damp, layer)
        else:
            if stats is None:
                raise HiercompError(f"svd needs calibration data for layer {layer}: pass --calib FILE")
            sq = stats.channel_sq_mean.double()
            if sq.shape != (in_features,) or not bool(torch.isfinite(sq).all()):
                raise HiercompError(f"svd: the input statistics of layer {layer} do not fit its weight "
                                    f"{out_features}x{in_features} or are not finite")
            lower = torch.diag((sq + self.damp * float(sq.mean()) + 1e-30).sqrt())
        u, sigma, vh = torch.linalg.svd(w @ lower, full_matrices=False)
        root = sigma[:rank].sqrt()
        a = u[:, :rank] * root
        # B = Σ^½ Vᵀ S⁻¹, from the triangular solve B·S = Σ^½ Vᵀ rather than an explicit inverse.
        b = torch.linalg.solve_triangular(lower, root.unsqueeze(1) * vh[:rank], upper=False, left=False)
        limit = torch.finfo(FACTOR_DTYPE).max
        if float(a.abs().max()) > limit or float(b.abs().max()) > limit:
            raise HiercompError(f"svd: the factors of layer {layer} exceed the float16 range; "
                                "raise damp or use whiten='channel'")
        return LowRankLinear(a.float(), b.float(), bias, origin)
