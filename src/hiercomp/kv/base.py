"""The two small protocols every KV method implements, and the budget they share.

* An **Evictor** decides which tokens a layer keeps: one scoring function (higher = keep), the same number of tokens
  per KV head so the cache stays rectangular and is physically smaller (no masks). Optionally it folds the evicted
  tokens into the kept ones (EMS merging) instead of dropping them.
* An **Encoder** stores tokens that left the full-precision window in fewer bytes: one encode and one decode
  function over chunks of tokens (KIVI quantization, Mustafar bitmap sparsity, CSKV low rank).

A cache composes at most one of each: eviction first, then the kept tokens are encoded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hiercomp.errors import HiercompError

_BYTES = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """How many tokens an evicting cache keeps per sequence, layer and KV head.

    ``kind`` is ``ratio`` (fraction of the prompt removed, as kvpress's compression_ratio), ``fraction`` (kept, written
    ``0.25x``), ``tokens`` (a count per sequence) or ``bytes`` (the whole cache, all layers and the batch)."""

    kind: str
    value: float

    @staticmethod
    def parse(text: str) -> Budget:
        text = text.strip()
        if text.endswith("x"):
            frac = float(text[:-1])
            if not 0 < frac < 1:
                raise HiercompError(f"budget {text!r}: a kept fraction must lie in (0, 1), e.g. 0.25x")
            return Budget("fraction", frac)
        match = _BYTES.match(text)
        if match:
            return Budget("bytes", float(match.group(1)) * _UNITS[match.group(2).lower()])
        if text.isdigit():
            return Budget("tokens", int(text))
        raise HiercompError(f"budget {text!r} is not a fraction (0.25x), a token count (512) or bytes (64MB)")

    def keep_tokens(self, prompt_len: int, bytes_for_tokens: Callable[[int], float]) -> int:
        """The tokens to keep for a prompt of ``prompt_len``; ``bytes_for_tokens(n)`` is the whole cache's bytes."""
        if self.kind == "ratio":
            return int(prompt_len * (1 - self.value))
        if self.kind == "fraction":
            return int(prompt_len * self.value)
        if self.kind == "tokens":
            return int(self.value)
        low, high = 0, max(prompt_len, 1)
        if bytes_for_tokens(high) <= self.value:
            return high
        while low < high:  # largest n whose bytes fit
            mid = (low + high + 1) // 2
            if bytes_for_tokens(mid) <= self.value:
                low = mid
            else:
                high = mid - 1
        return low


@dataclass
class ScoreContext:
    """What an evictor sees at one update of one layer. ``keys``/``values`` are every physical token including the
    ``n_new`` just added, in the compute dtype; ``state`` holds the evictor's per-token tensors [B, H_kv, S]
    (kept aligned with the tokens by the cache); ``queries(n)`` recomputes the post-RoPE queries [B, H, n, D] of the
    last ``n`` new tokens (None when the cache was built without the model)."""

    keys: torch.Tensor
    values: torch.Tensor
    n_new: int
    is_prefill: bool
    queries: Callable[[int], torch.Tensor] | None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def need_queries(self, method: str) -> Callable[[int], torch.Tensor]:
        if self.queries is None:
            raise HiercompError(f"{method} scores tokens with the model's queries; build the cache with "
                                "hiercomp.kv.make_cache(model, spec), which hooks the attention modules")
        return self.queries


@dataclass(frozen=True)
class Evictor:
    """Base of the eviction methods: a budget, a protected recent window and one scoring function."""

    name: ClassVar[str] = "evictor"
    decode_evict: ClassVar[bool] = False  # keep the budget while decoding (StreamingLLM, H2O), not only at prefill
    budget: Budget = Budget("ratio", 0.5)

    def protected(self) -> int:
        """Tokens always kept (sinks + recent window); a budget below this is refused."""
        return 0

    def observe(self, ctx: ScoreContext) -> None:
        """Update per-token state at every step (H2O accumulates attention here)."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, ctx: ScoreContext, keep: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept keys and values given the sorted kept indices [B, H_kv, n]; EMS overrides this to merge."""
        return gather_tokens(ctx.keys, keep), gather_tokens(ctx.values, keep)


@dataclass(frozen=True)
class Encoder:
    """Base of the storage formats: tokens older than the ``residual`` window are encoded in chunks of ``chunk``."""

    name: ClassVar[str] = "encoder"
    residual: int = 32

    @property
    def chunk(self) -> int:
        return 16

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tensors whose dim 2 runs along tokens (so blocks concatenate along dim 2), except ``fixed_*`` entries
        (per-layer parameters such as CSKV's projections, batch first) that are fit once and reused via
        ``previous`` (the layer's encoded store so far, None when encoding from scratch)."""
        raise NotImplementedError

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def bytes_per_token(self, heads: int, head_dim: int) -> float:
        """Bytes of one encoded token of one layer (K and V, all KV heads, batch 1), metadata included."""
        raise NotImplementedError

    def fixed_bytes(self, heads: int, head_dim: int) -> float:
        """Bytes of the ``fixed_*`` parameters per layer and sequence (CSKV's projections), 0 for most encoders."""
        return 0.0

    def prepare(self, layer_idx: int, heads: int, head_dim: int) -> None:
        """Hook for encoders that check the layer's shape before the first token."""


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, ...] at per-(batch, head) token indices [B, H, n]."""
    shape = list(index.shape) + list(x.shape[3:])
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*shape)
    return torch.gather(x, 2, idx)


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, causal_from: int) -> torch.Tensor:
    """softmax(q·kᵀ/√D) in fp32, [B, H_q, n, S], for n queries whose first sits at key position ``causal_from``
    (query i sees keys ≤ causal_from + i). Keys are repeated to the query heads (GQA)."""
    group = queries.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    logits = queries.float() @ k.transpose(-1, -2) / math.sqrt(queries.shape[-1])
    n, s = logits.shape[-2:]
    rows = torch.arange(n, device=logits.device).unsqueeze(1) + causal_from
    logits = logits.masked_fill(torch.arange(s, device=logits.device).unsqueeze(0) > rows, float("-inf"))
    return logits.softmax(dim=-1)


def group_reduce(per_query_head: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    """[B, H_q, ...] → [B, H_kv, ...]: the query heads sharing a KV head are pooled (GQA-aware scoring)."""
    b, hq = per_query_head.shape[:2]
    grouped = per_query_head.reshape(b, kv_heads, hq // kv_heads, *per_query_head.shape[2:])
    return grouped.mean(dim=2) if how == "mean" else grouped.sum(dim=2)


def column_attention(queries_fn: Callable[[int], torch.Tensor], keys: torch.Tensor, n_rows: int,
                     normalise: bool, rows_per_chunk: int = 256) -> torch.Tensor:
    """Σ over the last ``n_rows`` queries of their attention to each key, [B, H_q, S] (fp32), computed in row
    chunks so that long prompts never materialise H·P² weights. ``normalise`` divides each key's sum by the
    number of those queries that can see it (removes the causal bias towards early tokens)."""
    queries = queries_fn(n_rows)
    s = keys.shape[2]
    start = s - n_rows
    total = None
    for lo in range(0, n_rows, rows_per_chunk):
        probs = attention_probs(queries[:, :, lo:lo + rows_per_chunk], keys, start + lo).sum(dim=2)
        total = probs if total is None else total + probs
    if normalise:
        seen_by = (n_rows - (torch.arange(s, device=keys.device) - start).clamp(min=0)).clamp(min=1)
        total = total / seen_by
    return total
