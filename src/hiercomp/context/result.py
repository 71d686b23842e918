"""What every context compressor returns, and the token budget it is given.

A budget counts tokens of the **target** model (the reader that will see the compressed text), never the
scorer's: ``"0.25x"`` keeps a quarter of the text's target tokens (rounded, at least one), an integer ``N`` keeps
N target tokens. Counts are of the text alone, tokenized without special tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hiercomp.errors import HiercompError

_RATIO_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[xX]\s*$")


@dataclass(frozen=True)
class TokenBudget:
    """Either ``fraction`` of the text's target tokens (0 < f <= 1) or an absolute ``count`` of them."""

    fraction: float | None = None
    count: int | None = None
    text: str = ""

    def tokens_for(self, original_tokens: int) -> int:
        if self.count is not None:
            return self.count
        assert self.fraction is not None
        return max(1, round(self.fraction * original_tokens))

    def __str__(self) -> str:
        return self.text


def parse_token_budget(budget: str | int | float | TokenBudget) -> TokenBudget:
    """``"0.25x"`` (a fraction of the text's target tokens), ``"300"`` or ``300`` (a count of target tokens)."""
    if isinstance(budget, TokenBudget):
        return budget
    if isinstance(budget, bool):
        raise HiercompError(f"cannot read context budget {budget!r}; write e.g. 0.25x or 300 (target tokens)")
    if isinstance(budget, int):
        count, text = budget, str(budget)
    else:
        text = str(budget).strip()
        match = _RATIO_RE.match(text)
        if match is not None:
            fraction = float(match.group(1))
            if fraction <= 0:
                raise HiercompError(f"context budget {text!r} keeps nothing; give a positive fraction such as 0.25x")
            if fraction > 1:
                raise HiercompError(f"context budget {text!r} is more than the whole text; a ratio budget keeps a "
                                    "fraction, at most 1x (0.25x keeps a quarter)")
            return TokenBudget(fraction=fraction, text=text)
        if not re.fullmatch(r"\s*-?[0-9]+\s*", text):
            raise HiercompError(f"cannot read context budget {text!r}; write a fraction such as 0.25x or a count "
                                "of target tokens such as 300")
        count = int(text)
    if count <= 0:
        raise HiercompError(f"context budget {text!r} keeps nothing; give at least 1 target token or a fraction "
                            "such as 0.25x")
    return TokenBudget(count=count, text=text)


@dataclass(frozen=True)
class CompressionResult:
    """The compressed text and how it was made.

    ``kept`` indexes the units (``unit``: words, sentences or documents, in the order :mod:`units` splits them)
    that survive, in text order. Token counts are in the target model's tokens; ``ratio`` = kept / original
    (the achieved fraction, 0.25 for a 4x compression). ``note`` says what the caller should know (returned
    unchanged, nothing cleared the threshold, the budget could not be met exactly with whole units).
    """

    text: str
    kept: tuple[int, ...]
    unit: str
    original_tokens: int
    kept_tokens: int
    budget_tokens: int
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.kept_tokens / self.original_tokens if self.original_tokens else 1.0

    @property
    def exact(self) -> bool:
        """The kept text has exactly the budget's number of target tokens."""
        return self.kept_tokens == self.budget_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "kept": list(self.kept), "unit": self.unit,
                "original_tokens": self.original_tokens, "kept_tokens": self.kept_tokens,
                "budget_tokens": self.budget_tokens, "ratio": self.ratio, "exact": self.exact, "note": self.note}


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``count(text)`` = number of ``tokenizer`` tokens of ``text`` without special tokens (the budget's unit)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    return count


def check_text(text: str) -> None:
    if not isinstance(text, str):
        raise HiercompError(f"context text must be a string (got {type(text).__name__})")
    if not text.strip():
        raise HiercompError("the context text is empty; give the text to compress")


def unchanged(text: str, unit: str, n_units: int, original_tokens: int, budget_tokens: int) -> CompressionResult:
    """The budget covers the whole text: nothing to remove."""
    return CompressionResult(text, tuple(range(n_units)), unit, original_tokens, original_tokens, budget_tokens,
                             note=f"budget of {budget_tokens} tokens covers the whole text ({original_tokens} "
                                  "tokens); returned unchanged")
