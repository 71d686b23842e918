"""TokenPruner: exact budget in target tokens (also with a different target tokenizer), whole words, determinism."""

from __future__ import annotations

import pytest
import torch

from hiercomp.context import TokenPruner, parse_token_budget
from hiercomp.context.baselines import RandomWords, Truncation
from hiercomp.context.units import words
from hiercomp.errors import HiercompError

pytestmark = pytest.mark.usefixtures("one_thread")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("budget", ["0.5x", "0.25x", "0.1x", 17])
def test_exact_budget_in_scorer_tokens(stories_scorer, stories, budget):
    pruner = TokenPruner(stories_scorer, segment_tokens=48)
    for text in stories[:3]:
        result = pruner(text, budget=budget)
        n = _count(stories_scorer.tokenizer, text)
        want = budget if isinstance(budget, int) else round(float(budget[:-1]) * n)
        assert result.original_tokens == n
        assert result.budget_tokens == want
        assert _count(stories_scorer.tokenizer, result.text) == want == result.kept_tokens
        assert result.exact and not result.note
        assert result.ratio == pytest.approx(want / n)


def test_exact_budget_in_a_different_target_tokenizer(stories_scorer, stories, minilm_tokenizer):
    """Scored by stories260K (SentencePiece, 512 tokens), counted in MiniLM's WordPiece tokens."""
    pruner = TokenPruner(stories_scorer, target=minilm_tokenizer, segment_tokens=48)
    for text in stories[:4]:
        for fraction in (0.5, 0.2):
            result = pruner(text, question="Who is the story about?", budget=f"{fraction}x")
            n = _count(minilm_tokenizer, text)
            assert result.original_tokens == n
            assert _count(minilm_tokenizer, result.text) == round(fraction * n) == result.kept_tokens


def test_keeps_whole_words_in_order(stories_scorer, stories):
    pruner = TokenPruner(stories_scorer)
    text = stories[0]
    result = pruner(text, budget="0.3x")
    units = words(text)
    originals = [units.piece(i) for i in range(len(units))]
    kept_pieces = [units.piece(i) for i in result.kept]
    assert list(result.kept) == sorted(result.kept)
    # The output is exactly the kept words in order, each a whole word of the original.
    assert [words(result.text).piece(i) for i in range(len(words(result.text)))] == kept_pieces
    assert set(kept_pieces) <= set(originals)
    assert 0 < len(result.kept) < len(units)


def test_deterministic(stories_scorer, stories):
    pruner = TokenPruner(stories_scorer)
    first = pruner(stories[1], question="What did they find?", budget="0.25x")
    again = TokenPruner(stories_scorer)(stories[1], question="What did they find?", budget="0.25x")
    assert first == again
    assert RandomWords(stories_scorer.tokenizer, seed=3)(stories[1], budget=40) == \
        RandomWords(stories_scorer.tokenizer, seed=3)(stories[1], budget=40)


def test_question_changes_what_is_kept(stories_scorer, stories):
    pruner = TokenPruner(stories_scorer, question_weight=2.0)
    plain = pruner(stories[2], budget="0.3x")
    asked = pruner(stories[2], question="What was the name of the dog?", budget="0.3x")
    assert plain.kept_tokens == asked.kept_tokens
    assert plain.kept != asked.kept


def test_self_information_beats_random_on_kept_information(stories_scorer, stories):
    """Words kept by self-information carry more of the text's surprisal (under the same LM, full context)
    than random words at the same budget."""
    pruner = TokenPruner(stories_scorer)
    rand = RandomWords(stories_scorer.tokenizer, seed=0)
    ours, theirs = 0.0, 0.0
    for text in stories[:4]:
        ids = stories_scorer.encode(text)
        surprisal = stories_scorer.surprisal([], ids)
        units = words(text)
        from hiercomp.context.tokens import _token_owners

        owners = _token_owners(units, stories_scorer.tokenizer(text, add_special_tokens=False,
                                                               return_offsets_mapping=True)["offset_mapping"])
        per_word = torch.zeros(len(units)).index_add_(0, torch.tensor(owners), surprisal)
        ours += float(per_word[list(pruner(text, budget="0.3x").kept)].sum())
        theirs += float(per_word[list(rand(text, budget="0.3x").kept)].sum())
    assert ours > 1.2 * theirs


def test_baselines_hit_the_budget(stories_scorer, stories):
    tok = stories_scorer.tokenizer
    text = stories[3]
    head = Truncation(tok)(text, budget=30)
    assert _count(tok, head.text) == 30
    # the first words, save at most two small later words that fill the last tokens exactly
    assert sum(k == i for i, k in enumerate(head.kept)) >= len(head.kept) - 2
    assert _count(tok, RandomWords(tok)(text, budget=30).text) == 30


def test_budget_covering_the_text_returns_it_unchanged(stories_scorer, stories):
    result = TokenPruner(stories_scorer)(stories[0], budget=100000)
    assert result.text == stories[0] and "unchanged" in result.note and result.ratio == 1.0


@pytest.mark.parametrize("bad", ["0x", "0", 0, "-3", "1.5x", "abc", "0.2"])
def test_bad_budgets_are_one_line_errors(bad):
    with pytest.raises(HiercompError) as err:
        parse_token_budget(bad)
    assert "\n" not in str(err.value)


def test_empty_text_is_an_error(stories_scorer):
    with pytest.raises(HiercompError, match="empty"):
        TokenPruner(stories_scorer)("  \n ", budget="0.5x")
