"""Baselines fitted to the same exact budget as the TokenPruner: keep the first words, or random words."""

from __future__ import annotations

import random
from typing import Any

from hiercomp.context.fit import fit_exact, unit_costs
from hiercomp.context.result import (
    CompressionResult,
    TokenBudget,
    check_text,
    parse_token_budget,
    token_counter,
    unchanged,
)
from hiercomp.context.scorer import load_tokenizer
from hiercomp.context.units import Units, words


class _WordBaseline:
    unit = "words"
    uses_question = False

    def __init__(self, target: Any) -> None:
        self.target = load_tokenizer(target)
        self.count = token_counter(self.target)

    def ignores_question(self) -> bool:
        return True

    def priority(self, units: Units, text: str) -> list[float]:
        raise NotImplementedError

    def __call__(self, text: str, question: str | None = None,
                 budget: str | int | TokenBudget = "0.5x") -> CompressionResult:
        check_text(text)
        units = words(text)
        original = self.count(text)
        target_tokens = parse_token_budget(budget).tokens_for(original)
        if target_tokens >= original:
            return unchanged(text, self.unit, len(units), original, target_tokens)
        kept, tokens = fit_exact(units, self.priority(units, text), unit_costs(units, self.count), target_tokens,
                                 self.count)
        note = "" if tokens == target_tokens else f"whole words reach {tokens} of {target_tokens} tokens"
        return CompressionResult(units.render(kept), kept, self.unit, original, tokens, target_tokens, note)


class Truncation(_WordBaseline):
    """Keep the text's first words (whole words, exact budget)."""

    def priority(self, units: Units, text: str) -> list[float]:
        return [-float(i) for i in range(len(units))]


class RandomWords(_WordBaseline):
    """Keep random whole words; seeded by ``seed`` and the text, so the same call gives the same words."""

    def __init__(self, target: Any, seed: int = 0) -> None:
        super().__init__(target)
        self.seed = seed

    def priority(self, units: Units, text: str) -> list[float]:
        rng = random.Random(f"{self.seed}:{text}")
        return [rng.random() for _ in range(len(units))]
