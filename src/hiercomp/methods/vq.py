"""E8 lattice vector quantization with BlockLDLQ error feedback (the codebook half of QuIP#).

Tseng et al., "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice Codebooks"
(ICML 2024). Every 8 consecutive weights of a row are one codeword of a ball of 2^16 E8 lattice points
(2 bits per weight; see :mod:`hiercomp.layers.vq`), optionally followed by residual stages (2.5 / 3 / 3.5 /
4 bpw). With a Hessian (``ldlq=True``) the columns are visited in blocks of 8 as in GPTQ: a block is
quantized as a whole from its current, error-updated values, and its error is moved onto the columns
not yet quantized through the upper Cholesky factor of H⁻¹ (the LDL form of BlockLDLQ). Without one, each
vector is rounded to its nearest codeword.

Scales, one float16 per output row and stage, are fixed before the sweep: stage 1's is the row's RMS
(on Gaussian rows the MSE-optimal codebook scale in lattice units), stage s's the RMS of what the
stages before left, times the factor that minimises the MSE on a Gaussian source (measured once: 1.6 for
the 256-point codebook, 1.1 for the 16-point one, 1.0 for a second 2^16 one). The codebook is a ball,
so it suits Gaussian-like rows: use it under incoherence processing (``quip`` = ``rot_e8``).

``row_scales=False`` keeps one scale per stage for the whole layer, the RMS of all its rows, as QuIP# does:
after a rotation of both sides every row is a random mix of all of them, so their RMS often differ little, and
the per-row scales cost 16 bits per row and stage (0.056 bpw per stage on a 576-wide row, 0.25 on a 64-wide
one). On SmolLM2 that holds (output error +1-3 % on five real layers at 3 bpw); on stories260K it does not (its
rows keep unequal norms: quip bits=3.0 KL 1.43 against 0.68), so per-row is the default. ``scale_bits=8`` keeps
them per row but stores each in 8 bits (:mod:`hiercomp.quant.stored_scales`), half the cost, for a small loss
(stories260K quip bits=3.0: KL 0.667 at 3.244 bpw against 0.677 at 3.451 in float16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiercomp.layers import CompressedLinear
from hiercomp.layers.vq import DIM, E8Linear, decode, e8_codebook, encode_stage, stages_for_bits
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.methods.hessian import (
    LazyBatchSweep,
    check_obs_params,
    inverse_cholesky_upper,
    layer_hessian,
    zero_dead_inputs,
)
from hiercomp.quant import stored_scales
from hiercomp.quant.stored_scales import check_scale_bits

RESIDUAL_SCALE = {16: 1.0, 8: 1.6, 4: 1.1}  # residual-stage scale / residual RMS, fitted on Gaussian residuals


def row_rms(x: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """The RMS of each row (rows,), or of the whole matrix (1,); 1 where it is 0."""
    rms = x.pow(2).mean(dim=1).sqrt() if per_row else x.pow(2).mean().sqrt().reshape(1)
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def fit_scales(weight: torch.Tensor, stage_bits: tuple[int, ...], per_row: bool = True, scale_bits: int = 16
               ) -> torch.Tensor:
    """Scales (rows, stages), or (1, stages) for the whole layer, for a padded weight (rows, 8·vectors), each
    exactly as ``scale_bits`` stores it (:mod:`hiercomp.quant.stored_scales`)."""
    scales = torch.empty(weight.shape[0] if per_row else 1, len(stage_bits))
    residual = weight.float()
    for s, bits in enumerate(stage_bits):
        factor = 1.0 if s == 0 else RESIDUAL_SCALE[bits]
        scale = stored_scales.fit(row_rms(residual, per_row) * factor, scale_bits)
        scales[:, s] = scale
        if s + 1 < len(stage_bits):
            codes = encode_stage((residual / scale.unsqueeze(1)).reshape(-1, DIM), bits)
            residual = residual - scale.unsqueeze(1) * e8_codebook(bits)[0][codes].view_as(residual)
    return scales


def encode_vectors(block: torch.Tensor, scales: torch.Tensor, stage_bits: tuple[int, ...]) -> list[torch.Tensor]:
    """Codes (rows, vectors) per stage for a block (rows, 8·vectors), stage by stage on the residual."""
    rows = block.shape[0]
    codes = []
    residual = block.float()
    for s, bits in enumerate(stage_bits):
        scale = scales[:, s : s + 1]
        idx = encode_stage((residual / scale).reshape(-1, DIM), bits).view(rows, -1)
        codes.append(idx)
        if s + 1 < len(stage_bits):
            residual = residual - scale * e8_codebook(bits)[0][idx.reshape(-1)].view_as(residual)
    return codes


def e8_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, stage_bits: tuple[int, ...], *,
                damp: float = 0.01, block_size: int = 128, method: str = "e8", layer: str = "?",
                row_scales: bool = True, scale_bits: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Codes per stage (out, ⌈in/8⌉) and scales (out, stages), or (1, stages) without ``row_scales``, for
    ``weight`` (out, in)."""
    out_features, in_features = weight.shape
    pad = (-in_features) % DIM
    w = torch.nn.functional.pad(weight.float(), (0, pad))
    scales = fit_scales(w, stage_bits, row_scales, scale_bits)
    if hessian is None:
        return encode_vectors(w, scales, stage_bits), scales
    h = torch.nn.functional.pad(hessian.float(), (0, pad, 0, pad))  # padded inputs are dead: zero_dead_inputs
    w, h = zero_dead_inputs(w, h)
    upper = inverse_cholesky_upper(h, damp, method, layer)
    sweep = LazyBatchSweep(w, upper, block_size)
    n_vec = w.shape[1] // DIM
    codes = [torch.empty(out_features, n_vec, dtype=torch.int64) for _ in stage_bits]
    decoded: dict[str, torch.Tensor] = {}

    def quantize_column(j: int, col: torch.Tensor) -> torch.Tensor:
        if j % DIM == 0:  # a vector block starts: quantize all 8 columns from their current values
            block_codes = encode_vectors(sweep.current(j, j + DIM), scales, stage_bits)
            for s, c in enumerate(block_codes):
                codes[s][:, j // DIM] = c[:, 0]
            decoded["block"] = decode(block_codes, scales, stage_bits)
        return decoded["block"][:, j % DIM]

    sweep.run(quantize_column)
    return codes, scales


@register_method
@dataclass(frozen=True)
class E8(Method):
    name = "e8"
    needs_hessian = True
    needs_calibration = True

    bits: float = 2.0
    ldlq: bool = True
    damp: float = 0.01
    block_size: int = 128
    row_scales: bool = True  # False: one scale per stage for the whole layer (see the module docstring)
    scale_bits: int = 16  # 8: per-row scales as float8 ratios to a per-stage base (hiercomp.quant.stored_scales)

    def __post_init__(self) -> None:
        stages_for_bits(self.bits)  # validates bits
        check_scale_bits(self.scale_bits, self.row_scales)
        check_obs_params(self.damp, self.block_size)
        if self.block_size % DIM:
            raise ValueError(f"block_size must be a multiple of {DIM} (whole vectors), got {self.block_size}")

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        stage_bits = stages_for_bits(self.bits)
        hessian = None
        if self.ldlq and stats is not None and stats.hessian is not None:
            hessian = layer_hessian(stats, weight, self.name, layer)
        codes, scales = e8_quantize(weight, hessian, stage_bits, damp=self.damp, block_size=self.block_size,
                                    method=self.name, layer=layer, row_scales=self.row_scales,
                                    scale_bits=self.scale_bits)
        return E8Linear(stage_bits, codes, scales, bias, origin, shape=tuple(weight.shape),
                        row_scales=self.row_scales, scale_bits=self.scale_bits)
