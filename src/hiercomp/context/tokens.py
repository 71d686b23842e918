"""Token-level pruning (LLMLingua's idea, whole words, an exact budget in the target model's tokens).

Each word's value is the self-information of its tokens under a small causal LM, ``-log p(token | kept prefix)``,
computed segment by segment: a segment is scored after the *compressed* text of the segments before it, as the
target will read it, so a word that became unpredictable once its context was dropped gains value (LLMLingua's
iterative compression). With a question and ``question_weight > 0`` the score adds the contrastive term of
LongLLMLingua, ``ℓ(token | prefix) - ℓ(token | question, prefix)``: how much more predictable the question makes
the token, i.e. how much it is about the question. ``question_weight`` scales that term; the self-information
term stays, so words the question says nothing about still compete on their own information.

Words are ranked by value per target token (a word's summed score over its target-token cost), each segment
keeps its share of the budget, and :func:`hiercomp.context.fit.fit_exact` then repairs the whole selection so
the rendered text has exactly the budget's number of **target** tokens (the scorer may tokenize differently).
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.context.fit import fit_exact, greedy, unit_costs
from hiercomp.context.result import (
    CompressionResult,
    TokenBudget,
    check_text,
    parse_token_budget,
    token_counter,
    unchanged,
)
from hiercomp.context.scorer import ScorerLM, as_scorer, load_tokenizer
from hiercomp.context.units import Units, words
from hiercomp.errors import HiercompError


class TokenPruner:
    """``TokenPruner(scorer)(text, question=..., budget="0.25x") -> CompressionResult`` (kept = word indices).

    ``scorer``: a causal LM (folder, hiercomp folder, loaded model with ``.model``/``.tokenizer``, or a module
    with ``tokenizer=``). ``target``: the tokenizer (or model folder) whose tokens the budget counts; default the
    scorer's. ``segment_tokens``: scorer tokens per segment. ``question_weight``: weight of the contrastive
    question term (0 ignores questions).
    """

    uses_question = True
    unit = "words"

    def __init__(self, scorer: Any, tokenizer: Any = None, target: Any = None, segment_tokens: int = 64,
                 question_weight: float = 1.0) -> None:
        if segment_tokens < 1:
            raise HiercompError(f"segment_tokens must be at least 1 (got {segment_tokens})")
        self.scorer: ScorerLM = as_scorer(scorer, tokenizer)
        self.target = load_tokenizer(target) if target is not None else self.scorer.tokenizer
        self.count = token_counter(self.target)
        self.segment_tokens = min(segment_tokens, max(1, self.scorer.window // 2))
        self.question_weight = question_weight

    def ignores_question(self) -> bool:
        return self.question_weight == 0

    def __call__(self, text: str, question: str | None = None,
                 budget: str | int | TokenBudget = "0.5x") -> CompressionResult:
        check_text(text)
        units = words(text)
        original = self.count(text)
        target_tokens = parse_token_budget(budget).tokens_for(original)
        if target_tokens >= original:
            return unchanged(text, self.unit, len(units), original, target_tokens)
        costs = unit_costs(units, self.count)
        scores, segment_choice = self.word_scores(units, question, costs, target_tokens)
        priority = [scores[i] / costs[i] for i in range(len(units))]
        kept, tokens = fit_exact(units, priority, costs, target_tokens, self.count, start=segment_choice)
        note = "" if tokens == target_tokens else (f"whole words reach {tokens} of the {target_tokens} target "
                                                   "tokens asked; no set of whole words hits it exactly")
        return CompressionResult(units.render(kept), kept, self.unit, original, tokens, target_tokens, note)

    def word_scores(self, units: Units, question: str | None, costs: list[int],
                    budget: int) -> tuple[list[float], set[int]]:
        """(each word's summed token score, the per-segment selection): segments are scored after the kept
        prefix, and each keeps its share of the budget greedily."""
        enc = self.scorer.tokenizer(units.text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        owner = _token_owners(units, enc["offset_mapping"])
        question_ids = self.scorer.encode(question.strip() + "\n") if question and self.question_weight else []
        scores = [0.0] * len(units)
        kept: set[int] = set()
        total_cost = sum(costs)
        spent_cost = 0
        for first, last in _segments(owner, self.segment_tokens):  # token ranges [first, last)
            seg_units = sorted({owner[t] for t in range(first, last)})
            prefix = self.scorer.encode(units.render(sorted(kept))) if kept else []
            token_scores = self.scorer.surprisal(prefix, ids[first:last])
            if question_ids:
                with_question = self.scorer.surprisal(question_ids + prefix, ids[first:last])
                token_scores = token_scores + self.question_weight * (token_scores - with_question)
            _check_finite(token_scores)
            for t, value in zip(range(first, last), token_scores.tolist()):
                scores[owner[t]] += value
            # This segment's share of the budget, by its share of the estimated cost (cumulative rounding).
            share_before = round(budget * spent_cost / total_cost)
            spent_cost += sum(costs[u] for u in seg_units)
            share = round(budget * spent_cost / total_cost) - share_before
            order = sorted(seg_units, key=lambda u: (-scores[u] / costs[u], u))
            kept |= greedy(order, costs, share)
        return scores, kept


def _token_owners(units: Units, offsets: Any) -> list[int]:
    """The word each scorer token belongs to: the one holding the token's first non-space character (tokens of
    pure whitespace go to the next word); never decreasing along the text."""
    text = units.text
    char_unit = [0] * (len(text) + 1)
    u = 0
    for c in range(len(text)):
        while u < len(units) - 1 and c >= units.spans[u][1]:
            u += 1
        char_unit[c] = u
    owners = []
    last = 0
    for start, end in offsets:
        c = start
        while c < end and text[c].isspace():
            c += 1
        unit = char_unit[min(c, len(text) - 1)] if text else 0
        last = max(last, unit)
        owners.append(last)
    return owners


def _segments(owner: list[int], size: int) -> list[tuple[int, int]]:
    """Token ranges of about ``size`` tokens that never split a word."""
    out = []
    first = 0
    n = len(owner)
    while first < n:
        last = min(n, first + size)
        while last < n and owner[last] == owner[last - 1]:
            last += 1
        out.append((first, last))
        first = last
    return out


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise HiercompError("the scorer returned non-finite log-probabilities; check the scorer model")
