"""SnapKV: the last ``window`` prompt tokens vote (mean attention over the window's queries, pooled over
neighbouring keys, averaged over the query heads that share a KV head), and each KV head keeps its top tokens plus
the window. Runs once, at prefill; later tokens are appended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from hiercomp.kv.base import Evictor, ScoreContext, attention_probs, group_reduce


def window_scores(ctx: ScoreContext, window: int, kernel: int, method: str) -> torch.Tensor:
    """Pooled mean attention of the last ``window`` queries to every key, [B, H_kv, S]; the window itself is +inf."""
    keys = ctx.keys
    s = keys.shape[2]
    w = min(window, ctx.n_new, s)
    queries = ctx.need_queries(method)(w)
    probs = attention_probs(queries, keys, s - w).mean(dim=2)  # [B, H_q, S]
    scores = group_reduce(probs, keys.shape[1])
    if kernel > 1:
        b, h, _ = scores.shape
        scores = F.avg_pool1d(scores.reshape(b * h, 1, s), kernel, stride=1, padding=kernel // 2,
                              count_include_pad=False).reshape(b, h, -1)[..., :s]
    scores = scores.clone()
    scores[..., s - w:] = float("inf")
    return scores


@dataclass(frozen=True)
class SnapKV(Evictor):
    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 5

    def protected(self) -> int:
        return self.window

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return window_scores(ctx, self.window, self.kernel, self.name)
