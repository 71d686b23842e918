"""AWQ: activation-aware weight quantization, on CPU.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (MLSys 2024),
written from the algorithm notes (``mit-han-lab/llm-awq``'s ``auto_scale``/``auto_clip``), not from its code.

Per stage group (the layers that read one tensor: q/k/v, gate/up, o_proj, down_proj), the engine calls
:meth:`AWQ.prepare_group` on the still-float block:

1. s_X = mean |x| per input channel over a sample of calibration tokens;
2. for α in 0, 1/n_grid, …, (n_grid−1)/n_grid: s = s_X^α clamped ≥ 1e-4, divided by √(max s · min s); each
   AWQ member is fake-quantized as Q(W·diag(s))·diag(s)⁻¹ on the RTN grid and the MSE of the *module*
   output (the attention for q/k/v, the MLP for gate/up, the layer itself for o_proj/down_proj) against
   the float output is measured; the best α is kept (α = 0 is plain RTN, so the search never loses to it
   on its sample);
3. the scale is folded **exactly**: the operation producing the group's input is divided by s and every
   layer reading that input (targeted by AWQ or not) has its columns multiplied by s. The group is
   searched with the bits and group size of its first AWQ layer.

Next-block inputs come from the original block, as in AWQ: ``propagate_original`` asks the engine for this,
which it grants when every method of the plan asks (a mixed recipe follows ``propagate``).

Then :meth:`AWQ.compress` searches a clipping range per output row and group (max |w|·(1 − i/n_grid),
i < max_shrink·n_grid; skipped for q/k, whose error passes through the softmax) and stores the RTN grid of
the scaled, clipped weight: a plain :class:`~hiercomp.layers.QuantizedLinear`. Clipping is chosen by each
group's output error δ_g H_gg δ_gᵀ with H = E[x xᵀ] over *all* calibration tokens (the engine gathers H
anyway), which is AWQ's per-group output MSE without its 512-token sub-sample; the reported error of the
layer includes what clipping cost.

Where scales are folded (a scale that cannot be folded exactly is not applied; the layer is still clipped):

=================  ==========================================  ==============================================
family             folded                                      not folded, and why
=================  ==========================================  ==============================================
Llama/Qwen2/       q/k/v → input_layernorm; gate/up →          o_proj under grouped-query attention (v_proj
Mistral            post_attention_layernorm; down_proj → rows  has fewer rows than o_proj has inputs: one v
                   of up_proj; o_proj → rows of v_proj when    row feeds several heads), e.g. stories260K
                   v_proj and o_proj have matching shapes
GPT-2              c_attn → ln_1 (weight and bias);            mlp.c_proj (reads GELU(c_fc x); GELU does not
                   attn.c_proj → value third of c_attn's       commute with a per-channel scale)
                   outputs (and bias); mlp.c_fc → ln_2
BERT               attention.output.dense → rows of            query/key/value and intermediate.dense (post-
                   attention.self.value (and bias)             LN: the LayerNorm before them also feeds the
                                                               residual, which the fold would change);
                                                               output.dense (GELU before it)
=================  ==========================================  ==============================================

After every fold the block's output is recomputed on the calibration sample and compared with the float
block's; a fold that is not exact there (an unknown norm such as Gemma's 1 + w) is undone and reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from hiercomp.hierarchy import linear_origin, linear_shape, linear_weight
from hiercomp.layers import CompressedLinear, QuantizedLinear
from hiercomp.methods.base import LayerStats, Method, register_method
from hiercomp.quant.grid import (
    QuantGrid,
    dequantize_weight,
    fit_grid,
    quantize_codes,
    quantize_weight,
    scale_zero_from_range,
)

# Layers whose output goes through the attention softmax: AWQ does not clip them.
_QUERY_KEY = ("q_proj", "k_proj", "query", "key")


@dataclass(frozen=True)
class Fold:
    """Where a group's scale goes: ``prev`` produces the input that every layer in ``consumers`` reads."""

    prev: str  # a norm (weight and bias divided by s) or a linear (its output rows ``rows`` divided by s)
    consumers: tuple[str, ...]
    module: str  # whose output the scale search compares
    rows: tuple[int, int] | None = None  # for a linear ``prev``: the output rows that form the input


def fake_quantize(weight: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """The RTN grid's dequantized weight, exactly what a QuantizedLinear of ``weight`` would compute with."""
    scale, zero = fit_grid(weight, grid)
    return dequantize_weight(quantize_weight(weight, grid, scale, zero), grid, scale, zero)


def awq_scales(channel_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α clamped at 1e-4, normalised so that max·min = 1."""
    s = channel_abs_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _has(block: nn.Module, position: str) -> bool:
    try:
        block.get_submodule(position)
    except AttributeError:
        return False
    return True


def find_fold(block: nn.Module, position: str) -> Fold | str:
    """The exact fold for the group led by ``position`` (a path inside ``block``), or why there is none."""
    parent, _, leaf = position.rpartition(".")

    def sib(name: str) -> str:
        return f"{parent}.{name}" if parent else name

    # Llama, Qwen2, Mistral: pre-norm decoder layers.
    if leaf in ("q_proj", "k_proj", "v_proj") and _has(block, "input_layernorm"):
        return Fold("input_layernorm", tuple(sib(n) for n in ("q_proj", "k_proj", "v_proj") if _has(block, sib(n))),
                    parent)
    if leaf == "o_proj" and _has(block, sib("v_proj")):
        v_rows = linear_shape(block.get_submodule(sib("v_proj")))[0]
        o_cols = linear_shape(block.get_submodule(position))[1]
        if v_rows != o_cols:
            return (f"{position}: v_proj has {v_rows} output rows but o_proj reads {o_cols} channels (grouped-query "
                    "attention: one v row feeds several heads), so no per-channel scale of o_proj's input folds")
        return Fold(sib("v_proj"), (position,), position, (0, v_rows))
    if leaf in ("gate_proj", "up_proj") and _has(block, "post_attention_layernorm"):
        return Fold("post_attention_layernorm", tuple(sib(n) for n in ("gate_proj", "up_proj") if _has(block, sib(n))),
                    parent)
    if leaf == "down_proj" and _has(block, sib("up_proj")) and _has(block, sib("gate_proj")):
        # down(act(gate x) * up x): up's rows multiply the input of down elementwise.
        return Fold(sib("up_proj"), (position,), position, (0, linear_shape(block.get_submodule(sib("up_proj")))[0]))
    # GPT-2: pre-norm blocks with a fused q/k/v Conv1D.
    if position == "attn.c_attn" and _has(block, "ln_1"):
        return Fold("ln_1", (position,), "attn")
    if position == "attn.c_proj" and _has(block, "attn.c_attn"):
        n = linear_shape(block.get_submodule(position))[1]
        if linear_shape(block.get_submodule("attn.c_attn"))[0] != 3 * n:
            return f"{position}: c_attn is not q/k/v of width {n} each"
        return Fold("attn.c_attn", (position,), position, (2 * n, 3 * n))  # the value third
    if position == "mlp.c_fc" and _has(block, "ln_2"):
        return Fold("ln_2", (position,), "mlp")
    if position == "mlp.c_proj":
        return f"{position}: reads GELU(c_fc x), and GELU does not commute with a per-channel scale"
    # BERT: post-norm blocks.
    if position == "attention.output.dense" and _has(block, "attention.self.value"):
        v_rows = linear_shape(block.get_submodule("attention.self.value"))[0]
        if v_rows != linear_shape(block.get_submodule(position))[1]:
            return f"{position}: value and the attention output have different widths"
        return Fold("attention.self.value", (position,), position, (0, v_rows))
    if position.startswith("attention.self.") or position == "intermediate.dense":
        return (f"{position}: reads a LayerNorm output that is also the residual stream (post-LN), which "
                "dividing the LayerNorm would change")
    if position == "output.dense":
        return f"{position}: reads GELU(intermediate x), and GELU does not commute with a per-channel scale"
    return f"{position}: no known operation before it to fold a scale into"


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) float32 weight into a Linear or GPT-2 Conv1D, in its own layout and dtype."""
    target = module.weight
    with torch.no_grad():
        target.copy_((weight.t() if linear_origin(module) == "conv1d" else weight).to(target.dtype))


def _relative_mse(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def _apply_fold(block: nn.Module, fold: Fold, s: torch.Tensor) -> None:
    """prev ← prev / s (norm weight and bias, or the output rows of a linear); consumers' columns ← · s."""
    prev = block.get_submodule(fold.prev)
    with torch.no_grad():
        if fold.rows is None:
            prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
        else:
            lo, hi = fold.rows
            w = linear_weight(prev).float().clone()
            w[lo:hi] /= s[:, None]
            _set_weight(prev, w)
        bias = getattr(prev, "bias", None)
        if bias is not None:
            b = bias.float().clone()
            if fold.rows is None:
                b /= s
            else:
                b[fold.rows[0]:fold.rows[1]] /= s
            bias.copy_(b.to(bias.dtype))
    for position in fold.consumers:
        module = block.get_submodule(position)
        _set_weight(module, linear_weight(module).float() * s)


def search_clip(
    weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, rows: slice, n_grid: int, max_shrink: float
) -> torch.Tensor:
    """``weight`` with rows ``rows`` clamped to ±max per (row, group), max chosen by the group's output error.

    Candidates are max|w|·(1 − i/n_grid) for i < max_shrink·n_grid (i = 0: no clipping). The error of a
    candidate in group g is δ_g H_gg δ_gᵀ per row, δ = W − Q(clamp(W)): the mean over calibration tokens of
    the squared error of that group's share of the output, as AWQ measures it on sampled tokens.
    """
    in_features = weight.shape[1]
    n_groups, size = grid.num_groups(in_features), grid.effective_group_size(in_features)
    pad = n_groups * size - in_features
    # Rows x groups x columns. Zero padding of a short last group changes neither its max |w| nor its
    # grid (the grid's range always includes 0), nor its error (H is padded with zeros too).
    w = torch.nn.functional.pad(weight[rows], (0, pad)).view(-1, n_groups, size)
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad)).view(n_groups, size, n_groups, size)
    h_blocks = torch.stack([h[k, :, k, :] for k in range(n_groups)])  # (groups, size, size)
    absmax = w.abs().amax(dim=2)
    best_err = torch.full_like(absmax, math.inf)
    best_max = absmax.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        max_val = absmax * (1 - i / n_grid)
        clipped = torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
        scale, zero = scale_zero_from_range(clipped.amin(dim=2), clipped.amax(dim=2), grid)
        codes = quantize_codes(clipped, scale[..., None], zero[..., None], grid.maxq)
        delta = w - scale[..., None] * (codes - zero[..., None])
        err = torch.einsum("rgi,gij,rgj->rg", delta, h_blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    result = weight.clone()
    clipped = torch.maximum(torch.minimum(w, best_max[..., None]), -best_max[..., None])
    result[rows] = clipped.reshape(w.shape[0], -1)[:, :in_features]
    return result


def clip_rows(layer: str, out_features: int) -> slice | None:
    """The output rows AWQ clips: none of q/k; only the value third of GPT-2's fused c_attn."""
    leaf = layer.rsplit(".", 1)[-1]
    if leaf in _QUERY_KEY:
        return None
    if leaf == "c_attn":
        return slice(2 * out_features // 3, out_features)
    return slice(0, out_features)


@register_method
@dataclass(frozen=True)
class AWQ(Method):
    name = "awq"
    needs_hessian = True  # the clipping search weighs errors by E[x xᵀ]
    needs_calibration = True
    propagate_original: ClassVar[bool] = True  # the engine feeds each block the original model's activations
    transforms_groups: ClassVar[bool] = True  # scales are searched per stage group and folded (prepare_group)

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    n_tokens: int = 4096  # calibration tokens (whole sequences) the scale search runs on

    def __post_init__(self) -> None:
        QuantGrid(self.bits, self.group_size, self.symmetric)  # validates the ranges
        if self.n_grid < 1:
            raise ValueError(f"n_grid must be at least 1, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be at least 1, got {self.n_tokens}")

    @property
    def grid(self) -> QuantGrid:
        return QuantGrid(self.bits, self.group_size, self.symmetric)

    def group_tokens(self) -> int:
        return self.n_tokens

    def prepare_group(
        self, block: nn.Module, positions: list[str], inputs: Callable[[], torch.Tensor],
        run_module: Callable[[str], torch.Tensor],
    ) -> str:
        """Search the group's scale, fold it into the operation before it, scale the group. Returns a note.

        Called by the engine on the still-float block: ``positions`` are the group's AWQ layers (paths in
        ``block``), ``inputs()`` a sample of their shared input (tokens, in_features), ``run_module(path)``
        a submodule's output on the calibration sample with the block's current weights.
        """
        fold = find_fold(block, positions[0])
        if isinstance(fold, str):
            return f"not scaled: {fold}"
        touched = [fold.prev, *fold.consumers]
        if any(isinstance(block.get_submodule(p), CompressedLinear) for p in touched):
            return f"not scaled: {', '.join(touched)} already compressed"
        grid = self.grid
        channel_abs_mean = inputs().abs().mean(dim=0)
        block_reference = run_module("")  # the whole block's output, to check the fold by
        reference = run_module(fold.module)
        originals = {p: linear_weight(block.get_submodule(p)).float().clone() for p in fold.consumers}
        searched = [p for p in positions if p in originals]
        best_loss, best_alpha = math.inf, 0.0
        try:
            for i in range(self.n_grid):
                alpha = i / self.n_grid
                s = awq_scales(channel_abs_mean, alpha)
                for p in searched:
                    _set_weight(block.get_submodule(p), fake_quantize(originals[p] * s, grid) / s)
                loss = _relative_mse(run_module(fold.module), reference)
                if loss < best_loss:
                    best_loss, best_alpha = loss, alpha
        finally:
            for p in searched:
                _set_weight(block.get_submodule(p), originals[p])
        if best_alpha == 0.0:
            return f"not scaled: α = 0 (plain RTN) was best for {', '.join(fold.consumers)}"

        s = awq_scales(channel_abs_mean, best_alpha)
        saved = {p: {k: v.detach().clone() for k, v in block.get_submodule(p).named_parameters(recurse=False)}
                 for p in touched}
        _apply_fold(block, fold, s)
        # The fold must leave the float block's output unchanged; undo it where it does not (an unknown
        # norm such as 1 + w, a residual that reads the scaled tensor). Float32 rounding leaves a relative
        # MSE below 1e-12; a wrong fold leaves something of order 1.
        tolerance = 1e-8 if block.get_submodule(fold.prev).weight.dtype == torch.float32 else 1e-4
        drift = _relative_mse(run_module(""), block_reference)
        if drift > tolerance:
            with torch.no_grad():
                for p, params in saved.items():
                    for k, v in params.items():
                        getattr(block.get_submodule(p), k).copy_(v)
            return f"not scaled: folding into {fold.prev} changed the output (relative MSE {drift:.1e}); undone"
        return f"scaled with α = {best_alpha:.2f}, folded into {fold.prev}"

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        grid = self.grid
        rows = clip_rows(layer, weight.shape[0]) if self.clip else None
        if rows is not None and stats is not None and stats.hessian is not None:
            weight = search_clip(weight, stats.hessian, grid, rows, self.n_grid, self.max_shrink)
        scale, zero = fit_grid(weight, grid)
        return QuantizedLinear(grid, quantize_weight(weight, grid, scale, zero), scale, zero, bias, origin)
