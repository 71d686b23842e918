"""The discrete half of recovery tuning: re-choosing stored codes by a projected gradient step (PV-Tuning's V step).

Malinovskii et al., "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression" (NeurIPS 2024)
alternate a P step (Adam on the continuous parameters, :mod:`hiercomp.tune`) with a V step on the codes. The V step
here is their linearized one restricted to a subspace: with G the distillation loss's gradient with respect to a
layer's dequantized weight W (summed over the P steps since the last V step), the target is T = W − η·G, each code
unit is re-encoded to the codeword nearest T under the layer's current scales, and of the units whose squared
distance to T falls, only the ``fraction`` that gain most take their new code. The rest keep theirs, so a V step
moves a few codes at a time and the held-out checks of :func:`hiercomp.tune.distill` can keep or drop it.

η is set per layer so that the step is ``lr`` times W's root mean square in the direction of G (a step relative to
the weights' size, as the P step's ``lr`` is relative to each tensor's). The unit is what one code decides: a
weight of an integer grid, an 8-vector (all its stages) of the E8 codebook, a sequence of the trellis (a row, or a
column, whose Viterbi path is one piece). Other layer kinds (low rank, HLQ planes, sparse values) keep their codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear
from hiercomp.layers.quantized import QuantizedLinear
from hiercomp.layers.trellis import TrellisLinear, viterbi
from hiercomp.layers.vq import DIM, E8Linear
from hiercomp.methods.vq import encode_vectors
from hiercomp.quant.grid import expand_to_columns, nearest_codes


@dataclass(frozen=True)
class Recoder:
    """How one layer kind re-chooses its codes: ``encode(core, target)`` gives new codes in the form its ``codes()``
    (or ``states()``) returns; ``unit_error(diff)`` sums a weight difference (out, in) per code unit, in a shape
    that broadcasts against every code tensor. The layer's own ``packed_codes`` stores them."""

    attr: str  # the core's method that returns the unpacked codes: "codes" or "states"
    encode: Callable[[Any, torch.Tensor], Any]
    unit_error: Callable[[Any, torch.Tensor], torch.Tensor]


def _grid_encode(core: QuantizedLinear, target: torch.Tensor) -> torch.Tensor:
    s = expand_to_columns(core.scales.float(), core.in_features, core.grid.group_size)
    z = expand_to_columns(core.zeros().float(), core.in_features, core.grid.group_size)
    return nearest_codes(target, s, z, core.grid.maxq).to(torch.int64)  # HQQ's zeros are float16, not integers


def _e8_padded(core: E8Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, core.vectors * DIM - core.in_features))


def _e8_encode(core: E8Linear, target: torch.Tensor) -> list[torch.Tensor]:
    return encode_vectors(_e8_padded(core, target), core.scale_values(), core.stage_bits)


def _trellis_encode(core: TrellisLinear, target: torch.Tensor) -> torch.Tensor:
    normalized = target / core.scale_values().unsqueeze(1)
    return viterbi(normalized.t() if core.by_columns else normalized, core.state_bits, core.bits)


def _trellis_unit_error(core: TrellisLinear, diff: torch.Tensor) -> torch.Tensor:
    """Per sequence (a row, or a column by columns), shaped (sequences, 1) as the states are."""
    return diff.pow(2).sum(0).unsqueeze(1) if core.by_columns else diff.pow(2).sum(1, keepdim=True)


RECODERS: dict[type, Recoder] = {
    QuantizedLinear: Recoder("codes", _grid_encode, lambda core, d: d.pow(2)),
    E8Linear: Recoder("codes", _e8_encode,
                      lambda core, d: _e8_padded(core, d).view(d.shape[0], core.vectors, DIM).pow(2).sum(-1)),
    TrellisLinear: Recoder("states", _trellis_encode, _trellis_unit_error),
}


def recoder_for(core: CompressedLinear) -> Recoder | None:
    """The recoder of ``core``'s exact kind (a subclass may store its codes differently), or None."""
    return RECODERS.get(type(core))


def code_tensors(codes: Any) -> list[torch.Tensor]:
    """A layer's unpacked codes as a list of tensors (E8 has one per stage, the others one)."""
    return list(codes) if isinstance(codes, (list, tuple)) else [codes]


def recode(core: CompressedLinear, recoder: Recoder, codes: Any, weight: torch.Tensor, grad: torch.Tensor,
           dequantize: Callable[[Any], torch.Tensor], lr: float, fraction: float) -> int:
    """One V step on one layer, in place on ``codes`` (the unpacked codes its dequantize reads). ``weight`` is the
    dequantized weight the gradient ``grad`` was taken at; ``dequantize(codes)`` gives the weight for other codes.
    Returns the number of units that took a new code."""
    g_rms = float(grad.pow(2).mean().sqrt())
    if not g_rms > 0 or not math.isfinite(g_rms):
        return 0
    target = weight - (lr * float(weight.pow(2).mean().sqrt()) / g_rms) * grad
    new = recoder.encode(core, target)
    gain = recoder.unit_error(core, weight - target) - recoder.unit_error(core, dequantize(new) - target)
    units = gain.numel()
    k = min(units, max(1, math.ceil(fraction * units)))
    threshold = torch.topk(gain.reshape(-1), k).values[-1]
    take = (gain >= threshold) & (gain > 0)
    for old, fresh in zip(code_tensors(codes), code_tensors(new)):
        old.copy_(torch.where(take.expand_as(old), fresh.to(old.dtype), old))
    return int(take.sum())
