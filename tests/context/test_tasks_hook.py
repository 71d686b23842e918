"""The task-runner hook behind `hiercomp eval MODEL --tasks squad --context tokens:budget=0.25x`."""

from __future__ import annotations

import pytest

from hiercomp.context.tasks import compressed_examples, parse_context_option
from hiercomp.errors import HiercompError
from tests.conftest import SQUAD

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_context_option():
    option = parse_context_option("tokens:budget=0.25x,question_weight=2")
    assert option.method == "tokens" and option.budget == "0.25x" and option.get("question_weight") == "2"
    for bad in ("words:budget=0.5x", "tokens", "tokens:budget=0", "tokens:budget=0.5x,colour=red",
                "cascade:budget=0.5x,coarse=0.9", "tokens:budget=0.5x,segment_tokens=0",
                "tokens:budget=0.5x,question_weight=-1", "tokens:budget=0.5x,seed=x"):
        with pytest.raises(HiercompError):
            parse_context_option(bad)


def test_cascade_coarse_factor_from_the_option(stories_scorer):
    from hiercomp.context.build import DEFAULT_COARSE
    from hiercomp.context.tasks import compressor_for

    model, tok = stories_scorer.model, stories_scorer.tokenizer
    assert compressor_for(parse_context_option("cascade:budget=0.25x"), model, tok).coarse_factor == DEFAULT_COARSE
    option = parse_context_option("cascade:budget=0.25x,coarse=3")
    assert compressor_for(option, model, tok).coarse_factor == 3.0


def test_squad_passages_compressed_in_the_prompt(stories_scorer):
    if not SQUAD.is_file():
        pytest.skip("../shared/data is absent")
    model, tok = stories_scorer.model, stories_scorer.tokenizer
    examples, stats = compressed_examples("squad", "tokens:budget=0.25x", model, tok, data_dir=SQUAD.parent,
                                          limit=2, progress=False)
    assert len(examples) == 2 and stats["n"] == 2 and stats["exact"] == 2
    assert 0.2 < stats["achieved_ratio"] < 0.3
    for example in examples:
        assert example.context.startswith("Title: ") and "\nQuestion: " in example.context
        assert example.answers
    with pytest.raises(HiercompError, match="zero-shot generation"):
        compressed_examples("arc_easy", "tokens:budget=0.25x", model, tok, data_dir=SQUAD.parent, limit=1)
