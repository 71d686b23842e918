"""Coarse to fine: a document or sentence filter keeps ``coarse_factor`` times the budget, then a finer
compressor (usually a :class:`hiercomp.context.TokenPruner`) cuts that to the budget exactly (LLMLingua's
budget controller followed by token pruning)."""

from __future__ import annotations

import math
from typing import Any

from hiercomp.context.result import CompressionResult, TokenBudget, check_text, parse_token_budget
from hiercomp.errors import HiercompError


class Cascade:
    def __init__(self, coarse: Any, fine: Any, coarse_factor: float = 2.0) -> None:
        if coarse_factor < 1:
            raise HiercompError(f"coarse_factor must be at least 1 (got {coarse_factor})")
        self.coarse, self.fine, self.coarse_factor = coarse, fine, coarse_factor
        self.count = fine.count
        self.unit = f"{fine.unit} of the {coarse.unit} kept"
        self.uses_question = coarse.uses_question or fine.uses_question

    def ignores_question(self) -> bool:
        return self.coarse.ignores_question() and self.fine.ignores_question()

    def __call__(self, text: str, question: str | None = None,
                 budget: str | int | TokenBudget = "0.5x") -> CompressionResult:
        check_text(text)
        original = self.count(text)
        target_tokens = parse_token_budget(budget).tokens_for(original)
        coarse_tokens = min(original, math.ceil(self.coarse_factor * target_tokens))
        first = self.coarse(text, question=question, budget=coarse_tokens)
        if not first.text:
            return CompressionResult("", (), self.unit, original, 0, target_tokens, first.note)
        second = self.fine(first.text, question=question, budget=target_tokens)
        return CompressionResult(second.text, second.kept, self.unit, original, second.kept_tokens, target_tokens,
                                 "; ".join(n for n in (first.note, second.note) if n))
