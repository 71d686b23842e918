"""Build a context compressor by name, as the CLI and the task runner name them."""

from __future__ import annotations

from typing import Any

from hiercomp.errors import HiercompError

# Cascade: the sentences kept cover this many times the budget before token pruning cuts them to it. 1.25 was
# chosen on held-out SQuAD questions (500-559, not the benchmark's): at 4x, 2.0 kept the answer span in fewer
# passages than truncation, because word-level pruning at 2x breaks multi-word answers inside kept sentences.
DEFAULT_COARSE = 1.25
METHODS = ("tokens", "sentences", "documents", "cascade", "truncate", "random")
DESCRIPTIONS = {
    "tokens": "drop low-information words (self-information under the scorer LM, question-aware), exact budget",
    "sentences": "keep the sentences most similar to the question (MiniLM), at or under the budget",
    "documents": "keep the blank-line-separated documents most similar to the question, at or under the budget",
    "cascade": "the best sentences until they cover 1.25x the budget, then tokens to the budget exactly",
    "truncate": "keep the first words (baseline), exact budget",
    "random": "keep random words (baseline, seeded), exact budget",
}


def build_compressor(method: str, target: Any, scorer: Any = None, question_weight: float = 1.0,
                     threshold: float | None = None, ranker: str = "embedding", encoder: Any = None,
                     segment_tokens: int = 64, seed: int = 0, coarse_factor: float | None = None) -> Any:
    """A compressor ``c(text, question=..., budget=...) -> CompressionResult``; ``target`` counts the budget
    (a tokenizer or model folder); ``scorer`` is the causal LM of the tokens method and the likelihood ranker;
    ``coarse_factor`` (cascade) defaults to :data:`DEFAULT_COARSE`."""
    from hiercomp.context import Cascade, DocumentFilter, RandomWords, SentenceSelector, TokenPruner, Truncation

    if method not in METHODS:
        raise HiercompError(f"unknown context method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("tokens", "cascade") and scorer is None:
        raise HiercompError(f"the {method} method needs a scorer LM (a causal LM folder)")

    def tokens() -> Any:
        return TokenPruner(scorer, target=target, segment_tokens=segment_tokens, question_weight=question_weight)

    def extractive(kind: Any, cover: bool = False) -> Any:
        return kind(ranker=ranker, encoder=encoder, scorer=scorer, target=target, threshold=threshold, cover=cover)

    if method == "tokens":
        return tokens()
    if method == "sentences":
        return extractive(SentenceSelector)
    if method == "documents":
        return extractive(DocumentFilter)
    if method == "cascade":
        return Cascade(extractive(SentenceSelector, cover=True), tokens(),
                       coarse_factor=DEFAULT_COARSE if coarse_factor is None else coarse_factor)
    if method == "truncate":
        return Truncation(target)
    return RandomWords(target, seed=seed)
