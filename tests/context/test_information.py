"""The MI estimate: cached scoring equals plain scoring; the identity compressor keeps more than truncation;
never above the log N cap."""

from __future__ import annotations

import math

import pytest
import torch

from hiercomp.context.baselines import Truncation
from hiercomp.context.information import CONTEXT_PROMPT, log_likelihoods, mutual_information

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cached_scores_equal_direct_scores(stories_scorer, stories):
    p = stories_scorer
    contexts = [s[:200] for s in stories[:2]]
    continuations = [p.encode("Shortened text:"), p.encode("Shortened text:")]
    scored = [p.encode(" Once upon a time"), p.encode(" The cat sat")]
    table = log_likelihoods(p, contexts, continuations, scored, batch_size=2)
    for r in range(2):
        for c in range(2):
            prefix = p.encode(CONTEXT_PROMPT.format(context=contexts[c])) + continuations[r]
            direct = -float(p.surprisal(prefix, scored[r]).double().sum())
            assert table[r, c].item() == pytest.approx(direct, abs=1e-3)


def test_identity_keeps_more_than_truncation(stories_scorer, stories):
    contexts = [s[:300] for s in stories[:8]]
    identity = mutual_information(contexts, [[x] for x in contexts], stories_scorer)
    head = Truncation(stories_scorer.tokenizer)
    truncated = mutual_information(contexts, [[head(x, budget=4).text] for x in contexts], stories_scorer)
    assert identity.n == 8 and identity.cap_bits == pytest.approx(3.0)
    assert identity.bits <= 3.0 + 1e-9 and truncated.bits <= 3.0 + 1e-9
    assert identity.bits > truncated.bits + 0.5
    assert identity.bits > 2.0  # a whole story identifies its source among 8
    assert math.isfinite(identity.bits_per_token) and identity.bits_per_token > 0
    assert 0 <= truncated.at_cap <= identity.at_cap <= 1


def test_questions_condition_every_score(stories_scorer, stories):
    contexts = [s[:200] for s in stories[:3]]
    outputs = [[x[:60]] for x in contexts]
    plain = mutual_information(contexts, outputs, stories_scorer)
    asked = mutual_information(contexts, outputs, stories_scorer, questions=["Who?", "What?", "Where?"])
    assert plain.bits != asked.bits
    assert torch.isfinite(torch.tensor([plain.bits, asked.bits])).all()
