"""Stand-in modules that take the place of a removed attention or MLP sub-block.

A removed sub-block must *add nothing to the residual stream* while its parent block keeps calling it
exactly as before (same arguments, same return shape), so no Hugging Face block code has to change:

* pre-norm blocks (Llama, Qwen2, Mistral, GPT-2) compute ``h + attn(norm(h))`` and ``h + mlp(norm(h))``:
  the stand-ins return zeros, so the block becomes an exact skip of that sub-block;
* post-norm blocks (BERT) compute ``LayerNorm(h + dense(...))`` inside the sub-block itself: with the
  sub-block's contribution set to zero what remains is ``LayerNorm(h)``, so the stand-in keeps that
  LayerNorm (``norm``) — not an exact skip, see :mod:`hiercomp.depth.subblocks`. For a whole removed block
  the stand-ins get ``norm=None`` and pass ``h`` through, so the block is an exact identity.

Removed attention still advances the KV cache by one placeholder entry per token: Hugging Face models read
the cache length from layer 0 (``cache.get_seq_length()``) for positions and masks, so a cache layer that
never grows would silently restart positions at 0 during generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class RemovedSubBlock(nn.Module):
    """Marker base class: ``unit`` is "attn", "mlp" or "block" (removed as part of a whole block)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def extra_repr(self) -> str:
        return f"removed={self.unit}"


def _hidden_from(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def advance_cache(kwargs: dict[str, Any], layer_idx: int | None, hidden: torch.Tensor) -> None:
    """Append a (batch, 1, tokens, 1) zero placeholder to cache layer ``layer_idx`` so its length stays right."""
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None or layer_idx is None or not kwargs.get("use_cache", True):
        return
    cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it in an EncoderDecoderCache
    if hasattr(cache, "update"):
        placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
        cache.update(placeholder, placeholder, layer_idx)


class ZeroAttention(RemovedSubBlock):
    """Pre-norm attention that contributes zeros; returns ``(output, attention_weights=None)`` like HF attention."""

    def __init__(self, unit: str, layer_idx: int | None) -> None:
        super().__init__(unit)
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = _hidden_from(args, kwargs)
        advance_cache(kwargs, self.layer_idx, hidden)
        return torch.zeros_like(hidden), None


class ZeroMLP(RemovedSubBlock):
    """Pre-norm MLP that contributes zeros."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden)


class PostNormAttention(RemovedSubBlock):
    """BERT-style attention (self-attention + dense + LayerNorm(· + input)) with a zero contribution.

    Returns ``(norm(h), None)``; with ``norm=None`` (whole block removed) it passes ``h`` through.
    """

    def __init__(self, unit: str, norm: nn.Module | None, layer_idx: int | None) -> None:
        super().__init__(unit)
        self.norm = norm
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = _hidden_from(args, kwargs)
        advance_cache(kwargs, self.layer_idx, hidden)
        return (hidden if self.norm is None else self.norm(hidden)), None


class PostNormOutput(RemovedSubBlock):
    """BERT-style MLP output ``LayerNorm(dense(x) + input)`` with a zero contribution: ``norm(input)``."""

    def __init__(self, unit: str, norm: nn.Module | None) -> None:
        super().__init__(unit)
        self.norm = norm

    def forward(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor if self.norm is None else self.norm(input_tensor)


class SkippedIntermediate(RemovedSubBlock):
    """BERT-style MLP up-projection whose result is no longer used (its output stand-in ignores it)."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden
