"""`hiercomp generate` and hiercomp.generate.generate on stories260K (a few tokens each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hiercomp.cli import main
from hiercomp.generate import generate
from tests.conftest import STORIES, needs_shared

pytestmark = [needs_shared, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import hiercomp

    cm = hiercomp.compress(str(STORIES), {"rules": [{"method": "rtn", "bits": 8, "group_size": None}]},
                           progress=False)
    out = tmp_path_factory.mktemp("gen") / "m8"
    cm.save(out)
    return out


def test_greedy_generation_equals_argmax_decoding_and_streams() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pieces: list[str] = []
    result = generate(str(STORIES), "Once upon a time", max_new_tokens=8, stream=pieces.append)
    assert result.new_tokens == 8 and result.peak_rss_mb > 0 and result.decode_s > 0
    assert "".join(pieces).strip() == result.text.strip()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert result.text == tok.decode(ids[0, -8:], skip_special_tokens=True)


def test_kv_cache_factory_and_sampling_seed(compressed: Path) -> None:
    from transformers import DynamicCache

    plain = generate(compressed, "Tom had a", max_new_tokens=6)
    cached = generate(compressed, "Tom had a", max_new_tokens=6,
                      past_key_values=lambda m: DynamicCache(config=m.config))
    assert cached.text == plain.text
    a = generate(compressed, "Tom had a", max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    b = generate(compressed, "Tom had a", max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    assert a.text == b.text


def test_cli_on_compressed_folder_prints_speed_and_memory(compressed: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(compressed), "--prompt", "Lily saw a", "--max-new-tokens", "5", "--chat"]) == 0
    out, err = capsys.readouterr()
    assert "tokens/s decode" in out and "peak memory" in out
    assert "no chat template" in err  # stories260K has none: said once, plain prompt used
    fast = out
    assert main(["generate", str(compressed), "--prompt", "Lily saw a", "--max-new-tokens", "5",
                 "--runtime", "reference"]) == 0
    # 8-bit per channel: bfloat16 activations in the fast path; the greedy words agree on this short run
    assert capsys.readouterr()[0].split("--")[0] == fast.split("--")[0]


def test_cli_bad_input_is_one_line_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(STORIES), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr()[1].startswith("error: --max-new-tokens")


def test_own_decode_loop_equals_transformers_generate(compressed: Path) -> None:
    """decode_loop (what `hiercomp generate` runs with the full cache) gives transformers' greedy tokens, stops at
    an end token, and samples reproducibly inside the nucleus."""
    import hiercomp
    from hiercomp.generate import decode_loop, pick_token

    model = hiercomp.load(compressed).model
    ids = torch.tensor([[1, 365, 450, 260, 316]])
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        ours, cache = decode_loop(model, ids, 12)
        assert torch.equal(ours, theirs)
        assert cache.get_seq_length() == ids.shape[1] + 11  # the last token is not fed back
        stop = int(ours[3])
        early, _ = decode_loop(model, ids, 12, eos_ids=(stop,))
        assert torch.equal(early, ours[: int((ours == stop).nonzero()[0]) + 1])
        forced, _ = decode_loop(model, ids, 12, eos_ids=(stop,), min_new_tokens=12)
        assert torch.equal(forced, ours)
        a, _ = decode_loop(model, ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
        b, _ = decode_loop(model, ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
    # top-p keeps the smallest set that reaches p: here the two most probable tokens (0.5 + 0.3 >= 0.7)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(pick_token(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}
    assert int(pick_token(logits)) == 0


def test_growing_cache_holds_what_dynamic_cache_holds() -> None:
    """GrowingCache appends in place: the same keys and values as transformers' DynamicCache, bit for bit, through
    a prefill, decode steps, a crop and a buffer that has to grow."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from hiercomp.kv.adapter import cache_kwargs
    from hiercomp.kv.growing import MIN_SPARE, GrowingCache

    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    ours, theirs = GrowingCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        for cache in (ours, theirs):
            model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
        steps = MIN_SPARE + 30  # past the first buffer's room
        tokens = torch.randint(3, 500, (steps,), generator=torch.Generator().manual_seed(1))
        for i, token in enumerate(tokens):
            if i == 5:
                ours.crop(-2), theirs.crop(-2)
            a = model(input_ids=token.view(1, 1), use_cache=True, **cache_kwargs(ours)).logits
            b = model(input_ids=token.view(1, 1), use_cache=True, **cache_kwargs(theirs)).logits
            assert torch.equal(a, b)
    assert ours.get_seq_length() == theirs.get_seq_length() == 40 + steps - 2
    for mine, reference in zip(ours.layers, theirs.layers):
        assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
    held = ours.held_bytes()
    full = sum(layer.keys.numel() * 4 * 2 for layer in theirs.layers)
    assert full <= held <= 2 * full + len(ours.layers) * 2 * MIN_SPARE * 4 * 64


def test_a_generation_config_that_processes_logits_goes_through_transformers(compressed: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose generation config sets e.g. a repetition penalty generates through transformers' generate,
    which applies it (hiercomp's loop implements greedy and nucleus sampling only)."""
    import hiercomp
    from hiercomp import generate as gen

    cm = hiercomp.load(compressed)
    cm.model.generation_config.repetition_penalty = 5.0
    assert gen._config_processes_logits(cm.model)
    calls: list[int] = []
    original = gen.decode_loop
    monkeypatch.setattr(gen, "decode_loop", lambda *a, **k: calls.append(1) or original(*a, **k))
    gen.generate(cm, "Tom had a", max_new_tokens=4)
    assert calls == []
    cm.model.generation_config.repetition_penalty = 1.0
    assert not gen._config_processes_logits(cm.model)
    gen.generate(cm, "Tom had a", max_new_tokens=4)
    assert calls == [1]
