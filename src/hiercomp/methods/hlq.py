"""HLQ (ELUTQ's hierarchical linear quantization), alone (``hlq``) or inside a GPTQ sweep (``hlq_gptq``).

Each row and group of g input columns gets w ≈ z + Σⱼ sⱼ·Bⱼ: b binary bit-planes Bⱼ with a free float16
scale sⱼ each and a float16 offset z (format and storage: :mod:`hiercomp.layers.hlq`). The fit alternates

1. exact assignment: each weight takes the nearest of the 2^b values z + Σⱼ sⱼcⱼ, c ∈ {0,1}^b
   (searched over all of them: the sⱼ are free, so the planes are not ordered by size);
2. least squares for [s, z] with the assignment fixed, batched over all groups;

starting from the uniform min-max grid (z = min, sⱼ = 2ʲ·(max − min)/(2^b − 1)) and keeping, per group,
the best parameters seen. Parameters are rounded to float16 before every assignment, so the codes are
the best ones for what is stored.

``hlq`` is calibration-free and minimises the plain weight error. ``hlq_gptq`` (a separate name rather
than a switch, so that ``hlq`` means the same thing with or without calibration data) runs the GPTQ
sweep with one block per group: when the sweep reaches a group, HLQ is fitted on the group's current,
error-compensated weights and the whole group is fixed at once; the columns' errors then flow, through
the inverse Hessian's Cholesky factor, to the columns of the group not yet visited (which shapes the
error sent on, not the group's own values, already fixed) and to all later groups. With
``reassign=True`` only the group's parameters are fixed when it starts, and each column is rounded to
the nearest level when the sweep reaches it, after the updates from the group's earlier columns (what
GPTQ does with its own grid): same format and bits, lower output error on every real layer measured
(tests/test_hqq_hlq_svd.py). Act-order is not supported (groups stay contiguous).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hiercomp.layers import CompressedLinear
from hiercomp.layers.hlq import HLQLinear, check_hlq_bits, hlq_values
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.methods.hessian import (
    LazyBatchSweep,
    check_obs_params,
    inverse_cholesky_upper,
    layer_hessian,
    zero_dead_inputs,
)
from hiercomp.quant.grid import SCALE_DTYPE

# Least squares on the normal equations of [B, 1]: a ridge this small (the entries are counts of
# weights, ≥ 1 where not zero) only decides the scale of a plane that no weight uses (it becomes 0)
# or the split between two identical planes.
_RIDGE = 1e-6


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: parameters are chosen as they will be stored."""
    return x.to(SCALE_DTYPE).float()


def _combinations(bits: int, device: torch.device) -> torch.Tensor:
    """(2^b, b) float: row k holds the bits of k, bit j in column j."""
    k = torch.arange(2**bits, device=device)
    return ((k.unsqueeze(1) >> torch.arange(bits, device=device)) & 1).float()


def _level_table(scales: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the midpoints between neighbouring sorted levels (N, 2^b − 1), and the codes in that order."""
    combos = _combinations(scales.shape[1], scales.device)
    levels = offsets.unsqueeze(1) + scales @ combos.t()  # (N, 2^b)
    ordered, order = torch.sort(levels, dim=1)
    return ((ordered[:, 1:] + ordered[:, :-1]) / 2).contiguous(), order


def _nearest(rows: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    midpoints, order = table
    return torch.gather(order, 1, torch.searchsorted(midpoints, rows.contiguous()))


def hlq_assign(rows: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Nearest of the 2^b levels for every weight of ``rows`` (N, g): codes (N, g), int64.

    All levels take part (exhaustive), found by sorting the levels and bisecting between neighbours
    instead of measuring g · 2^b distances.
    """
    return _nearest(rows, _level_table(scales, offsets))


def _least_squares(rows: torch.Tensor, codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[s, z] minimising ||w − (z + Σⱼ sⱼBⱼ)||² per row, for fixed codes; float16-rounded.

    Solved on the (b+1)x(b+1) normal equations in float64, where the small ridge is not lost to rounding.
    """
    design = torch.cat([((codes.unsqueeze(-1) >> torch.arange(bits, device=codes.device)) & 1).double(),
                        torch.ones(*codes.shape, 1, dtype=torch.float64, device=codes.device)], dim=-1)
    gram = design.transpose(1, 2) @ design  # (N, b+1, b+1)
    gram += _RIDGE * torch.eye(bits + 1, dtype=torch.float64, device=rows.device)
    rhs = (design.transpose(1, 2) @ rows.double().unsqueeze(-1)).squeeze(-1)
    theta = torch.linalg.solve(gram, rhs).float()
    return _fp16(theta[:, :bits]), _fp16(theta[:, bits])


def fit_hlq_rows(
    rows: torch.Tensor, bits: int, iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit HLQ to each row of ``rows`` (N, g) independently (one row = one group).

    Returns codes (N, g) int64, plane scales (N, b) and offsets (N,), the last two float16 values in
    float32: the best of the uniform start and ``iters`` assignment/least-squares rounds, per row.
    """
    rows = rows.float()
    wmin, wmax = rows.amin(dim=1), rows.amax(dim=1)
    steps = (wmax - wmin) / (2**bits - 1)
    scales = _fp16(steps.unsqueeze(1) * 2.0 ** torch.arange(bits, device=rows.device))
    offsets = _fp16(wmin)
    codes = hlq_assign(rows, scales, offsets)
    best_err = (rows - hlq_values(codes, scales, offsets)).pow(2).sum(dim=1)
    best = [codes, scales, offsets]
    for _ in range(iters):
        scales, offsets = _least_squares(rows, codes, bits)
        codes = hlq_assign(rows, scales, offsets)
        err = (rows - hlq_values(codes, scales, offsets)).pow(2).sum(dim=1)
        better = err < best_err  # False for NaN: a float16 overflow never replaces a finite fit
        best_err = torch.where(better, err, best_err)
        best = [torch.where(better.view(-1, *[1] * (new.dim() - 1)), new, old)
                for new, old in zip((codes, scales, offsets), best)]
    return best[0], best[1], best[2]


FitFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def fit_row_groups(weight: torch.Tensor, group_size: int | None, fit: FitFn) -> tuple[torch.Tensor, ...]:
    """Apply ``fit`` to every (row, group) of ``weight`` (out, in) and reassemble its results.

    ``fit(rows)`` gets (N, g) with one group per row and returns (codes (N, g), *params) with each
    parameter's first dimension N. The result is (codes (out, in), *params shaped (out, groups, ...)).
    A short last group (``in`` not a multiple of g) is fitted on its own, at its real length.
    """
    out_features, in_features = weight.shape
    g = in_features if group_size is None else min(group_size, in_features)
    full = in_features // g
    parts: list[tuple[torch.Tensor, ...]] = []
    if full:
        res = fit(weight[:, : full * g].reshape(out_features * full, g))
        parts.append((res[0].reshape(out_features, full * g),
                      *(p.reshape(out_features, full, *p.shape[1:]) for p in res[1:])))
    if full * g < in_features:
        res = fit(weight[:, full * g :])
        parts.append((res[0], *(p.reshape(out_features, 1, *p.shape[1:]) for p in res[1:])))
    return tuple(torch.cat(pieces, dim=1) for pieces in zip(*parts))


def _check_params(bits: int, group_size: int | None, iters: int) -> None:
    check_hlq_bits(bits)
    if group_size is not None and group_size < 1:
        raise ValueError(f"group size must be a positive integer, got {group_size}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")


@register_method
@dataclass(frozen=True)
class HLQ(Method):
    name = "hlq"

    bits: int = 2
    group_size: int | None = 64
    iters: int = 10

    def __post_init__(self) -> None:
        _check_params(self.bits, self.group_size, self.iters)

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        codes, scales, offsets = fit_row_groups(weight.float(), self.group_size,
                                                lambda rows: fit_hlq_rows(rows, self.bits, self.iters))
        return HLQLinear(self.bits, self.group_size, codes, scales, offsets, bias, origin)


def hlq_gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    iters: int = 10,
    damp: float = 0.01,
    reassign: bool = False,
    method: str = "hlq_gptq",
    layer: str = "?",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HLQ inside the GPTQ sweep. Returns (weight, codes, plane scales (out, groups, b), offsets (out, groups));
    ``weight`` is exactly what the codes and parameters dequantize to.

    ``reassign=False`` is ELUTQ's HLQ-GPTQ: each group's values are all fixed when the group starts.
    ``reassign=True`` fixes only the group's parameters then, and gives each column, when the sweep
    reaches it, the nearest level to its *current* value (after the updates from the group's earlier
    columns), as GPTQ does with its grid; same format, lower output error on every layer measured.
    """
    out_features, in_features = weight.shape
    w, h = zero_dead_inputs(weight, hessian)
    g = in_features if group_size is None else min(group_size, in_features)
    n_groups = -(-in_features // g)
    upper = inverse_cholesky_upper(h, damp, method, layer)
    sweep = LazyBatchSweep(w, upper, g)  # one block per group: the group is fitted when its block starts
    codes = torch.empty(out_features, in_features, dtype=torch.int64)
    scales = torch.empty(out_features, n_groups, bits)
    offsets = torch.empty(out_features, n_groups)
    # The current group: its first column, its parameters, and either its fixed values (g, out) or
    # the level table to round each column on.
    state: dict[str, Any] = {}

    def start_group(i1: int, i2: int) -> None:
        c, s, z = fit_hlq_rows(sweep.current(i1, i2), bits, iters)
        scales[:, i1 // g], offsets[:, i1 // g] = s, z
        state.update(start=i1, scales=s, offsets=z)
        if reassign:
            state["table"] = _level_table(s, z)
        else:
            codes[:, i1:i2] = c
            state["values"] = hlq_values(c, s, z).t().contiguous()  # row k = column i1 + k

    def column(j: int, current: torch.Tensor) -> torch.Tensor:
        if not reassign:
            # Within-group updates only shape the error passed on to later columns.
            return state["values"][j - state["start"]]
        c = _nearest(current.unsqueeze(1), state["table"])
        codes[:, j] = c[:, 0]
        return hlq_values(c, state["scales"], state["offsets"])[:, 0]

    result = sweep.run(column, start_group)
    return result, codes, scales, offsets


@register_method
@dataclass(frozen=True)
class HLQGPTQ(Method):
    name = "hlq_gptq"
    needs_hessian = True
    needs_calibration = True

    bits: int = 2
    group_size: int | None = 64
    iters: int = 10
    damp: float = 0.01
    reassign: bool = False

    def __post_init__(self) -> None:
        _check_params(self.bits, self.group_size, self.iters)
        check_obs_params(self.damp, 1)

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        hessian = layer_hessian(stats, weight, self.name, layer)
        _, codes, scales, offsets = hlq_gptq_quantize(weight, hessian, self.bits, self.group_size, iters=self.iters,
                                                      damp=self.damp, reassign=self.reassign, method=self.name,
                                                      layer=layer)
        return HLQLinear(self.bits, self.group_size, codes, scales, offsets, bias, origin)
