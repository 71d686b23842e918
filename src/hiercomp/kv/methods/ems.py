"""EMS (evict-then-merge), as reconstructed in methods/KV_CONTEXT.md §6 (no public code; [inferred] there).

Score = global + local, each normalised to sum 1 per head: global = causal column sums of the whole prompt's
attention divided by how many queries see each key (removes the early-token bias of plain sums), local = SnapKV's
window attention. The top tokens per KV head are centres; every evicted token whose key has cosine ≥ ``threshold``
with its nearest centre is merged into it (score-weighted mean of keys and of values); the others are dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiercomp.kv.base import Evictor, ScoreContext, column_attention, gather_tokens, group_reduce
from hiercomp.kv.methods.snapkv import window_scores


@dataclass(frozen=True)
class EMS(Evictor):
    name: ClassVar[str] = "ems"
    window: int = 32
    threshold: float = 0.8

    def protected(self) -> int:
        return self.window

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        glob = group_reduce(column_attention(ctx.need_queries(self.name), ctx.keys, ctx.n_new, normalise=True),
                            ctx.keys.shape[1])
        local = window_scores(ctx, self.window, 5, self.name)
        finite = torch.isfinite(local)
        local = torch.where(finite, local, torch.zeros_like(local))
        score = glob / glob.sum(-1, keepdim=True) + local / local.sum(-1, keepdim=True).clamp(min=1e-12)
        return torch.where(finite, score, torch.full_like(score, float("inf")))

    def reduce(self, ctx: ScoreContext, keep: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = ctx.keys.float(), ctx.values.float()
        b, h, s, _ = keys.shape
        weight = torch.where(torch.isfinite(scores), scores, scores[torch.isfinite(scores)].max()).float()
        centres_k, centres_v = gather_tokens(keys, keep), gather_tokens(values, keep)
        unit = torch.nn.functional.normalize(keys, dim=-1)
        sim = unit @ torch.nn.functional.normalize(centres_k, dim=-1).transpose(-1, -2)  # [B, H, S, n_keep]
        best_sim, best = sim.max(dim=-1)
        is_kept = torch.zeros(b, h, s, dtype=torch.bool, device=keys.device).scatter_(2, keep, True)
        merge = (~is_kept) & (best_sim >= self.threshold)
        w = torch.where(merge, weight, torch.zeros_like(weight)).unsqueeze(-1)
        w_centre = gather_tokens(weight, keep).unsqueeze(-1)
        index = best.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        sum_k = (centres_k * w_centre).scatter_add(2, index, keys * w)
        sum_v = (centres_v * w_centre).scatter_add(2, index, values * w)
        total = w_centre.scatter_add(2, best.unsqueeze(-1), w).clamp(min=1e-12)
        return (sum_k / total).to(ctx.keys.dtype), (sum_v / total).to(ctx.values.dtype)
