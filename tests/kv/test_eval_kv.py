"""`hiercomp eval --kv` and `hiercomp generate --kv` on stories260K: metrics and tasks through the compressed cache,
the bytes it held, a compressed folder's default spec, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hiercomp.cli import main
from hiercomp.evaluation import evaluate
from hiercomp.generate import generate
from tests.conftest import SQUAD, STORIES, TINYSTORIES, needs_shared

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_shared]

WINDOW = {"seq_len": 160, "max_windows": 2, "kv_continuation": 16, "progress": False}


@pytest.fixture(scope="module")
def rtn8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import hiercomp

    cm = hiercomp.compress(str(STORIES), {"rules": [{"method": "rtn", "bits": 8, "group_size": None}]},
                           progress=False)
    out = tmp_path_factory.mktemp("evalkv") / "m8"
    cm.save(out)
    return out


def test_text_metrics_through_the_cache() -> None:
    # a 2-bit cache whose full-precision window covers the whole prefix holds every token in 16 bits: no loss
    exact = evaluate(str(STORIES), text=TINYSTORIES, kv="kivi:bits=2,residual=512", **WINDOW)
    assert exact["n_tokens"] == 32 and exact["kv_prefix"] == 143 and exact["kl_against"] == "full cache"
    assert exact["kv_bytes"] == exact["kv_full_bytes"] == 2 * 5 * 4 * 8 * 143 * 2
    assert exact["kl"] < 1e-4 and exact["top1_agreement"] == 1.0
    assert exact["perplexity"] == pytest.approx(exact["perplexity_full_cache"], rel=1e-3)
    lossy = evaluate(str(STORIES), text=TINYSTORIES, kv="snapkv:ratio=0.5+kivi:bits=2,residual=32", **WINDOW)
    assert lossy["kv_factor"] > 2.5 and lossy["kl"] > 100 * exact["kl"] and lossy["top1_agreement"] < 1
    assert lossy["perplexity_full_cache"] == pytest.approx(exact["perplexity_full_cache"])


def test_compressed_folder_against_the_original_weights_and_kv_together(rtn8: Path) -> None:
    kv_only = evaluate(str(rtn8), text=TINYSTORIES, kv="snapkv:ratio=0.5", **WINDOW)
    both = evaluate(str(rtn8), text=TINYSTORIES, kv="snapkv:ratio=0.5", reference=str(STORIES), **WINDOW)
    assert both["kl_against"] == "original" and both["kl"] > 0
    assert both["kv_bytes"] == kv_only["kv_bytes"] and both["kv_factor"] == pytest.approx(143 / 71, rel=0.02)
    original = evaluate(str(STORIES), text=TINYSTORIES, kv="kivi:bits=2,residual=512", **WINDOW)
    # the reference's perplexity is the original weights' with their full cache, on the same positions
    assert both["reference_perplexity"] == pytest.approx(original["perplexity_full_cache"], rel=1e-3)
    assert "verdicts" in both


def test_tasks_decode_through_a_fresh_cache_per_question() -> None:
    if not SQUAD.is_file():
        pytest.skip("../shared/data is absent")
    common = {"data_dir": SQUAD.parent, "limit": 2, "progress": False}
    full = evaluate(str(STORIES), tasks=["squad", "arc_easy"], **common)
    exact = evaluate(str(STORIES), tasks=["squad", "arc_easy"], kv="kivi:bits=2,residual=1024", **common)
    for task in ("squad", "arc_easy"):
        for metric, value in full["tasks"][task].items():
            if metric != "items":
                assert exact["tasks"][task][metric] == pytest.approx(value)
    assert exact["kv_tasks"]["kv_sequences"] == 4 and exact["kv_tasks"]["kv_factor"] == 1.0
    evicted = evaluate(str(STORIES), tasks=["squad"], kv="snapkv:ratio=0.5", **common)
    # question-agnostic (kvpress's protocol): the passage is halved before the question is read, and the question
    # and answer tokens are then held in full, so the cache at the end is less than 2x smaller
    assert evicted["kv_tasks"]["kv_sequences"] == 2 and 1.5 < evicted["kv_tasks"]["kv_factor"] < 1.98


def test_eval_cli_prints_the_cache_and_rejects_bad_specs(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(STORIES), "--text", str(TINYSTORIES), "--kv", "streaming:budget=64", "--seq-len", "128",
                 "--max-windows", "1", "--kv-continuation", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ("KV cache         streaming:budget=64: held 40.96 KB after a 119-token prefix (full 16-bit cache "
            "76.16 KB, 1.86x smaller)") in out
    assert "KL(full‖KV)" in out and "full cache" in out
    for spec, words in (("snapkv:ratio=1.5", "(0, 1)"), ("kivi:colour=2", "unknown parameter"),
                        ("zip:bits=2", "unknown KV method")):
        assert main(["eval", str(STORIES), "--text", str(TINYSTORIES), "--kv", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and words in err


PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
          "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. It was soft "
          "and bouncy. Lily wanted to play with it all day. Her mom called her home for lunch, so she took the ball "
          "with her and put it on the table.")


def test_generate_through_the_cache_and_the_folders_default(rtn8: Path, capsys: pytest.CaptureFixture) -> None:
    import hiercomp

    full = generate(str(STORIES), PROMPT, max_new_tokens=4)
    assert full.kv_spec is None and full.kv_bytes > 0  # transformers' cache, float32
    evicted = generate(str(STORIES), PROMPT, max_new_tokens=4, kv="snapkv:ratio=0.5")
    tokens = evicted.prompt_tokens + 3  # the last new token is never fed back
    assert evicted.kv_spec == "snapkv:ratio=0.5" and evicted.kv_full_bytes == 2 * 5 * 4 * 8 * tokens * 2
    assert evicted.kv_bytes == 2 * 5 * 4 * 8 * (evicted.prompt_tokens // 2 + 3) * 2
    assert "KV cache" in evicted.summary() and "x smaller" in evicted.summary()
    # a loaded folder whose plan names a KV spec generates through it by default, and says so; none overrides
    cm = hiercomp.load(rtn8)
    planned = SimpleNamespace(model=cm.model, tokenizer=cm.tokenizer, kv_spec="snapkv:ratio=0.5")
    by_default = generate(planned, PROMPT, max_new_tokens=4)
    assert by_default.kv_spec == "snapkv:ratio=0.5" and any("default" in n for n in by_default.notes)
    assert generate(planned, PROMPT, max_new_tokens=4, kv="none").kv_spec is None
    assert main(["generate", str(rtn8), "--prompt", PROMPT, "--max-new-tokens", "3", "--kv", "kivi:bits=4"]) == 0
    assert "(kivi:bits=4; full 16-bit cache" in capsys.readouterr().out
    assert main(["generate", str(STORIES), "--prompt", "x", "--kv", "h2o:ratio=0"]) == 2
    assert capsys.readouterr().err.startswith("error: h2o: ratio=0 must lie in (0, 1)")
