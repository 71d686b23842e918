"""StreamingLLM: attention sinks (the first tokens) + the most recent window, the same for every layer and head.

Keys stay post-RoPE at their original positions (no re-rotation): positions keep growing with the logical length,
which is what a long prompt of a model within its trained context needs (re-rotation matters only beyond it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiercomp.kv.base import Evictor, ScoreContext


@dataclass(frozen=True)
class StreamingLLM(Evictor):
    name: ClassVar[str] = "streaming"
    decode_evict: ClassVar[bool] = True
    sinks: int = 4

    def protected(self) -> int:
        return self.sinks + 1

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        b, h, s = ctx.keys.shape[:3]
        # newer is better; sinks best of all — top-k of this is "sinks + most recent"
        recency = torch.arange(s, dtype=torch.float32, device=ctx.keys.device)
        recency[: self.sinks] = float("inf")
        return recency.expand(b, h, s)
