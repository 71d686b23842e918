"""H2O: heavy hitters (accumulated attention) + a recent window, kept at a fixed budget while decoding.

The accumulated attention of every physical token, summed over the query heads of its KV head, is stored next to
it (fp32, counted in the bytes). At prefill it is the causal column sum over all prompt queries (computed in row
chunks); every decode step adds the new query's probabilities, recomputed from its post-RoPE query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiercomp.kv.base import Evictor, ScoreContext, column_attention, group_reduce


@dataclass(frozen=True)
class H2O(Evictor):
    name: ClassVar[str] = "h2o"
    decode_evict: ClassVar[bool] = True
    recent: int = 32

    def protected(self) -> int:
        return self.recent

    def observe(self, ctx: ScoreContext) -> None:
        acc = column_attention(ctx.need_queries(self.name), ctx.keys, ctx.n_new, normalise=False)
        acc = group_reduce(acc, ctx.keys.shape[1], "sum")
        ctx.state["h2o_acc"] = ctx.state.get("h2o_acc", torch.zeros_like(acc)) + acc

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        scores = ctx.state["h2o_acc"].clone()
        scores[..., -self.recent:] = float("inf")
        return scores
