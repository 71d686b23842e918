"""Sentence and document selection: budget never exceeded, original order, selective (nothing under a high
threshold), the cascade lands exactly."""

from __future__ import annotations

import pytest

from hiercomp.context import Cascade, DocumentFilter, SentenceSelector, TokenPruner
from hiercomp.context.units import sentences
from hiercomp.errors import HiercompError

pytestmark = pytest.mark.usefixtures("one_thread")

PASSAGE = ("The Harvard-Yale Regatta is older than The Game by 23 years. The regatta is held every June on the Thames "
           "River in Connecticut. The Harvard crew is one of the top rowing teams in the country. Harvard also "
           "won the sailing championship in 2003. The library holds many old books about ships.")


@pytest.fixture(scope="module")
def selector(stories_scorer):
    return SentenceSelector(target=stories_scorer.tokenizer)


def _count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_embedding_ranking_keeps_the_answer_sentence_in_order(selector, stories_scorer):
    result = selector(PASSAGE, question="When is the regatta held?", budget="0.3x")
    assert result.kept and list(result.kept) == sorted(result.kept)
    assert "June" in result.text
    assert 0 < result.kept_tokens <= result.budget_tokens
    assert result.kept_tokens == _count(stories_scorer.tokenizer, result.text)
    units = sentences(PASSAGE)
    assert result.text == " ".join(units.piece(i) for i in result.kept)


def test_selective_returns_nothing_under_a_high_threshold(stories_scorer):
    strict = SentenceSelector(target=stories_scorer.tokenizer, threshold=0.95)
    result = strict(PASSAGE, question="What is the boiling point of mercury?", budget="0.5x")
    assert result.text == "" and result.kept == () and result.kept_tokens == 0
    assert "nothing kept" in result.note
    loose = SentenceSelector(target=stories_scorer.tokenizer, threshold=0.2)
    assert loose(PASSAGE, question="Where is the regatta held?", budget="0.5x").kept


def test_likelihood_ranking(stories_scorer, stories):
    text = " ".join(stories[:2])
    selector = SentenceSelector(ranker="likelihood", scorer=stories_scorer)
    result = selector(text, question="Who did the farmer help?", budget=60)
    assert 0 < result.kept_tokens <= 60 and list(result.kept) == sorted(result.kept)


def test_documents_then_tokens_lands_exactly(stories_scorer, stories):
    text = "\n\n".join(stories[:4])
    docs = DocumentFilter(target=stories_scorer.tokenizer)
    coarse = docs(text, question="What did the cow want?", budget="0.5x")
    assert len(coarse.kept) < 4 and coarse.kept_tokens <= coarse.budget_tokens
    covering = DocumentFilter(target=stories_scorer.tokenizer, cover=True)
    cascade = Cascade(covering, TokenPruner(stories_scorer), coarse_factor=2.0)
    result = cascade(text, question="What did the cow want?", budget="0.15x")
    assert result.kept_tokens == result.budget_tokens == _count(stories_scorer.tokenizer, result.text)


def test_a_question_is_required(selector):
    with pytest.raises(HiercompError, match="question"):
        selector(PASSAGE, budget="0.5x")
