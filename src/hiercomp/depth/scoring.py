"""Score each unit's removal by the damage it does alone, and choose which units to remove.

Damage of removing one unit (everything else intact), on calibration token windows:

* causal LMs: KL(P_original ‖ P_removed) of the next-token distributions, nats per position (float32
  log-softmax, mean over every position of every window);
* encoders: 1 − cosine similarity of the last hidden states, mean over tokens.

Rules for choosing ``n`` units from single-removal scores (:func:`choose_removals`):

* ``"score"``: the ``n`` lowest damages (ShortGPT-style ranking by single-removal damage).
* ``"position"`` (HierarchicalPrune's position-aware HPP, the intent of its Score formula as in the method
  notes): the first ``protect_first`` blocks are never removed (default: the first 20% of blocks, at least
  one — early blocks set up what every later block reads), and the others are ranked by
  ``damage / W_pos(i)`` with ``W_pos(i) = exp((i − B) / B)`` (B blocks, i the block index), lowest first.
  The last block's damage counts about ×1.2, block 0's ×e ≈ 2.7: at (near-)equal damage later blocks go first.
* ``"random"``: a seeded uniform draw among the candidates (a baseline).

All rules skip a unit that overlaps one already chosen (a whole block and a sub-block of it, or the same
sub-block twice), so ``n`` units always remove ``n`` distinct things. Single-removal damages do not add up
(EvoPress's point): these rules are cheap heuristics, the evolutionary search is the careful tool.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hiercomp.depth.subblocks import SubBlock, list_subblocks, temporarily_removed
from hiercomp.errors import HiercompError

RULES = ("position", "score", "random")
UNITS = ("block", "attn", "mlp", "any")


@dataclass(frozen=True)
class RemovalScore:
    unit: SubBlock
    damage: float  # KL(original ‖ removed), nats/position (LMs); 1 − cosine of last hidden states (encoders)


def model_outputs(model: nn.Module, ids: torch.Tensor, encoder: bool) -> torch.Tensor:
    """Float32 log-probabilities (causal LMs) or last hidden states (encoders) for a batch of windows."""
    call = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if encoder:
        return model(**call).last_hidden_state.float()
    return F.log_softmax(model(**call, use_cache=False).logits.float(), dim=-1)


def output_damage(reference: torch.Tensor, outputs: torch.Tensor, encoder: bool) -> torch.Tensor:
    """Per-position damage: KL(ref ‖ out) from log-probabilities, or 1 − cosine of hidden states."""
    if encoder:
        return 1.0 - F.cosine_similarity(reference, outputs, dim=-1)
    return (reference.exp() * (reference - outputs)).sum(-1)


def units_of_kind(units: Sequence[SubBlock], unit: str) -> list[SubBlock]:
    if unit not in UNITS:
        raise HiercompError(f"unknown removal unit {unit!r}; choose one of: {', '.join(UNITS)}")
    return [u for u in units if unit == "any" or u.kind == unit]


def score_removals(
    model: nn.Module,
    calibration: torch.Tensor,
    units: Sequence[SubBlock] | None = None,
    *,
    encoder: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> list[RemovalScore]:
    """Damage of removing each unit alone (default: every attention, MLP and block), on ``calibration`` [n, L]."""
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise HiercompError("scoring removals needs calibration token windows; pass --calib TEXT")
    units = list(units) if units is not None else list_subblocks(model)
    totals = [0.0] * len(units)
    positions = 0
    batches = [calibration[i : i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
    bar = tqdm(total=len(batches) * len(units), desc="scoring removals", unit="removal", disable=not progress)
    with torch.inference_mode():
        for ids in batches:
            reference = model_outputs(model, ids, encoder)
            positions += reference.shape[0] * reference.shape[1]
            for k, unit in enumerate(units):
                with temporarily_removed(model, [unit.name]):
                    totals[k] += float(output_damage(reference, model_outputs(model, ids, encoder), encoder)
                                       .double().sum())
                bar.update(1)
    bar.close()
    return [RemovalScore(unit, total / positions) for unit, total in zip(units, totals)]


def _overlaps(a: SubBlock, b: SubBlock) -> bool:
    return a.block_index == b.block_index and (a.kind == b.kind or "block" in (a.kind, b.kind))


def position_weight(index: int, n_blocks: int) -> float:
    """HierarchicalPrune's W_pos(i) = exp((i − B) / B): small for early blocks, near 1 for the last ones."""
    return math.exp((index - n_blocks) / n_blocks)


def default_protected(n_blocks: int) -> int:
    return max(1, round(0.2 * n_blocks))


def choose_removals(
    scores: Sequence[RemovalScore],
    n: int,
    rule: str = "position",
    *,
    seed: int = 0,
    n_blocks: int | None = None,
    protect_first: int | None = None,
) -> list[str]:
    """Names of ``n`` non-overlapping units to remove, by ``rule`` ("position", "score" or "random")."""
    if rule not in RULES:
        raise HiercompError(f"unknown removal rule {rule!r}; choose one of: {', '.join(RULES)}")
    if n < 0:
        raise HiercompError(f"the number of units to remove must be >= 0, got {n}")
    candidates = list(scores)
    if rule == "score":
        candidates.sort(key=lambda s: (s.damage, -s.unit.block_index))
    elif rule == "random":
        random.Random(seed).shuffle(candidates)
    else:
        n_blocks = n_blocks or 1 + max((s.unit.block_index for s in candidates), default=0)
        protect = default_protected(n_blocks) if protect_first is None else protect_first
        candidates = [s for s in candidates if s.unit.block_index >= protect]
        candidates.sort(key=lambda s: (s.damage / position_weight(s.unit.block_index, n_blocks),
                                       -s.unit.block_index))
    chosen: list[SubBlock] = []
    for score in candidates:
        if len(chosen) == n:
            break
        if not any(_overlaps(score.unit, c) for c in chosen):
            chosen.append(score.unit)
    if len(chosen) < n:
        raise HiercompError(f"cannot remove {n} units with rule '{rule}': only {len(chosen)} distinct candidates "
                            "(protected first blocks excluded); ask for fewer")
    return [unit.name for unit in chosen]
