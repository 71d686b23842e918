"""`hiercomp eval MODEL --tasks squad --context tokens:budget=0.5x`: passages compressed before the model reads them,
the achieved ratio reported, the reference reading full passages; bad options are one line, exit 2."""

from __future__ import annotations

import pytest

from hiercomp.cli import main
from hiercomp.evaluation import evaluate
from tests.conftest import SQUAD, STORIES, needs_shared

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_shared]


@pytest.fixture(scope="module")
def data_dir():
    if not SQUAD.is_file():
        pytest.skip("../shared/data is absent")
    return SQUAD.parent


def test_squad_with_compressed_passages_and_a_full_reference(data_dir) -> None:
    result = evaluate(str(STORIES), tasks=["squad"], context="tokens:budget=0.5x", reference=str(STORIES),
                      data_dir=data_dir, limit=2, progress=False)
    stats = result["context"]["squad"]
    assert stats["n"] == 2 and stats["exact"] == 2 and stats["empty"] == 0 and stats["method"] == "tokens"
    assert 0.45 < stats["achieved_ratio"] < 0.55
    assert set(result["tasks"]["squad"]) >= {"exact_match", "f1", "n"}
    full = evaluate(str(STORIES), tasks=["squad"], data_dir=data_dir, limit=2, progress=False)
    assert result["reference_tasks"]["squad"]["f1"] == full["tasks"]["squad"]["f1"]  # the original, full passages
    assert "context" not in full


def test_cli_prints_the_achieved_ratio(data_dir, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(STORIES), "--tasks", "squad", "--limit", "1", "--data-dir", str(data_dir),
                 "--context", "truncate:budget=0.25x", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "context          squad: truncate budget 0.25x, achieved ratio 0.2" in out
    assert "(1/1 exactly on budget, 0 empty" in out and "squad f1" in out


@pytest.mark.parametrize("args, words", [
    (["--tasks", "arc_easy", "--context", "tokens:budget=0.5x"], "zero-shot generation tasks"),
    (["--tasks", "squad_closed_book", "--context", "tokens:budget=0.5x"], "no {context} in its template"),
    (["--text", "x.txt", "--context", "tokens:budget=0.5x"], "name a task with one"),
    (["--tasks", "squad", "--context", "words:budget=0.5x"], "unknown method 'words'"),
    (["--tasks", "squad", "--context", "tokens:budget=0.5x,colour=red"], "cannot read 'colour=red'"),
    (["--tasks", "squad", "--context", "tokens:budget=0"], "keeps nothing"),
    (["--tasks", "squad", "--context", "tokens:budget=1.5x"], "at most 1x"),
    (["--tasks", "squad", "--context", "tokens"], "needs a budget"),
])
def test_bad_context_options_fail_before_the_model_loads(data_dir, args, words, capsys, tmp_path) -> None:
    args = [str(tmp_path / "x.txt") if a == "x.txt" else a for a in args]
    (tmp_path / "x.txt").write_text("Once upon a time there was a cat.")
    assert main(["eval", str(STORIES), "--data-dir", str(data_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and words in err
