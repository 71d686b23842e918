"""GPTQ: quantize one input column at a time and let the columns not yet quantized absorb its error.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023). The grid is the same min-max grid as RTN (float16 scales, b-bit zero points, contiguous
groups along the input dimension), so the result is a plain :class:`~hiercomp.layers.QuantizedLinear`.

Group parameters are either fitted when the sweep reaches a group, on its current error-updated
weights (``static_groups=False``, the original GPTQ), or fitted once on the original weight before
any update (``static_groups=True``). With ``act_order`` the columns are visited by descending H_jj;
groups stay defined on the original column indices, which requires static groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear, QuantizedLinear
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.methods.hessian import (
    LazyBatchSweep,
    check_obs_params,
    inverse_cholesky_upper,
    layer_hessian,
    zero_dead_inputs,
)
from hiercomp.quant.grid import QuantGrid, fit_grid


@dataclass
class GPTQResult:
    """What the sweep produced: ``weight`` (out, in) equals ``scale * (codes − zero)`` per group, exactly."""

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor  # (out, groups), float16-representable values in float32
    zero: torch.Tensor  # (out, groups)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantGrid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    method: str = "gptq",
    layer: str = "?",
) -> GPTQResult:
    """GPTQ on one weight (out, in) with H = E[x xᵀ] (in, in), both float32."""
    out_features, in_features = weight.shape
    if act_order and grid.group_size is not None and not static_groups:
        raise ValueError("act_order with group_size needs static_groups=True")
    w, h = zero_dead_inputs(weight, hessian)
    group = grid.effective_group_size(in_features)
    n_groups = grid.num_groups(in_features)
    # Static groups (and per-channel grids, which GPTQ always fits up front) come from the original W.
    fixed = grid.group_size is None or static_groups
    if fixed:
        scale, zero = fit_grid(w, grid)
    else:
        scale = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
        zero = torch.empty_like(scale)
    # Row-per-group copies for contiguous reads in the column loop.
    scale_t, zero_t = scale.t().contiguous(), zero.t().contiguous()

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(in_features, device=w.device)
    original = perm.tolist()
    upper = inverse_cholesky_upper(h, damp, method, layer)
    sweep = LazyBatchSweep(w, upper, block_size)
    codes_t = torch.empty(in_features, out_features, dtype=torch.float32, device=w.device)
    maxq = grid.maxq
    column_grid = QuantGrid(grid.bits, None, grid.symmetric)

    def quantize_column(j: int, col: torch.Tensor) -> torch.Tensor:
        orig = original[j]
        g = orig // group
        if not fixed and orig % group == 0:  # a group starts (no act-order here): fit it now
            s, z = fit_grid(sweep.current(j, min(j + group, in_features)), column_grid)
            scale_t[g], zero_t[g] = s[:, 0], z[:, 0]
        s, z = scale_t[g], zero_t[g]
        code = torch.clamp(torch.round(col / s) + z, 0, maxq)
        codes_t[orig] = code
        return s * (code - z)

    q = sweep.run(quantize_column)
    result_weight = torch.empty_like(q)
    result_weight[:, perm] = q
    return GPTQResult(result_weight, codes_t.t().contiguous(), scale_t.t().contiguous(), zero_t.t().contiguous())


@register_method
@dataclass(frozen=True)
class GPTQ(Method):
    name = "gptq"
    needs_hessian = True
    needs_calibration = True

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = True

    def __post_init__(self) -> None:
        QuantGrid(self.bits, self.group_size, self.symmetric)  # validates bits and group size
        check_obs_params(self.damp, self.block_size)
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ValueError("act_order with group_size needs static_groups=True (act-order groups fitted during "
                             "the sweep would need a stored column permutation, which is not supported)")

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        hessian = layer_hessian(stats, weight, self.name, layer)
        grid = QuantGrid(self.bits, self.group_size, self.symmetric)
        res = gptq_quantize(weight, hessian, grid, damp=self.damp, block_size=self.block_size,
                            act_order=self.act_order, static_groups=self.static_groups, method=self.name, layer=layer)
        return QuantizedLinear(grid, res.codes, res.scale, res.zero, bias, origin)

