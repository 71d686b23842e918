"""The evaluation protocols: an exact cache scores KL 0, compression scores > 0; the passkey grid is well formed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hiercomp.kv import adapter, make_cache
from hiercomp.kv import evaluate as ev
from tests.conftest import SHARED_DATA, STORIES, needs_shared

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_shared]


@pytest.fixture(scope="module")
def stories():
    return LlamaForCausalLM.from_pretrained(str(STORIES)).eval(), AutoTokenizer.from_pretrained(str(STORIES))


def test_continuation_quality_exact_and_compressed(stories, stories_tokens):
    model, _ = stories
    seqs = torch.stack([torch.cat([torch.tensor([1]), stories_tokens[i * 300:i * 300 + 159]]) for i in range(2)])
    prefills = [ev.capture_prefill(model, s[None, :128]) for s in seqs]
    exact = ev.continuation_quality(model, lambda: make_cache(model, ""), seqs, 128, prefills)
    assert exact.kl < 1e-6 and exact.top1_agreement == 1.0 and exact.n_positions == 2 * 31
    assert exact.perplexity == pytest.approx(exact.perplexity_full, rel=1e-4)
    assert exact.bytes_after_prefix == exact.bytes_full_prefix
    small = ev.continuation_quality(model, lambda: make_cache(model, "streaming:budget=40"), seqs, 128, prefills)
    assert small.kl > exact.kl and small.bytes_after_prefix == pytest.approx(exact.bytes_full_prefix * 40 / 128)
    # replaying a captured prefill is the same as prefilling through the cache
    direct = make_cache(model, "snapkv:ratio=0.5")
    with torch.no_grad():
        model(seqs[:1, :128], **adapter.cache_kwargs(direct))
    replayed = ev.replay_prefill(make_cache(model, "snapkv:ratio=0.5"), prefills[0])
    for a, b in zip(direct.layers, replayed.layers):
        assert torch.equal(a.keys, b.keys)


def test_passkey_grid(stories):
    model, tok = stories
    hay = ev.load_haystack(SHARED_DATA / "text" / "wikitext-2-raw" / "wiki.valid.raw")
    cases = ev.passkey_cases(tok, hay, [200, 400], [0.0, 0.5, 1.0])
    assert len(cases) == 6 and len({c.key for c in cases}) > 1
    for case in cases:
        assert case.context_ids.shape[1] <= case.length
        assert case.key in tok.decode(case.context_ids[0])
    answer = ev.passkey_answer(model, ev.replay_prefill(make_cache(model, "kivi:bits=4"),
                                                        ev.capture_prefill(model, cases[0].context_ids)),
                               cases[0], tok, max_new_tokens=4)
    assert isinstance(answer, str)
    assert ev.passkey_correct("  74509. yes", "74509") and not ev.passkey_correct("7450", "74509")
