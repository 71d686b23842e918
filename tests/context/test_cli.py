"""`hiercomp context compress|score`: output and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json

import pytest

from hiercomp.cli import main
from tests.conftest import STORIES, needs_shared

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_shared]

TEXT = ("Once upon a time, there was a kind farmer. He had a big cow. The cow was sad. The farmer did not know "
        "why. One day, a little boy came to the farm. He saw the sad cow and asked why it was sad.")


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(TEXT)
    return str(path)


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def test_compress_prints_the_text_at_the_exact_budget(story, capsys):
    from transformers import AutoTokenizer

    code = main(["context", "compress", story, "--method", "tokens", "--budget", "0.4x", "--scorer", str(STORIES),
                 "--question", "Why was the cow sad?"])
    out, err = capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    n = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert code == 0
    assert len(tok(out.rstrip("\n"), add_special_tokens=False)["input_ids"]) == round(0.4 * n)
    assert f"of {n} target tokens" in err


def test_empty_text(tmp_path, capsys):
    (tmp_path / "e.txt").write_text(" \n")
    assert "empty" in _one_line_error(capsys, main(["context", "compress", str(tmp_path / "e.txt"),
                                                     "--budget", "0.5x", "--scorer", str(STORIES)]))


def test_non_utf8(tmp_path, capsys):
    (tmp_path / "l.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(capsys, main(["context", "compress", str(tmp_path / "l.txt"),
                                                        "--budget", "0.5x"]))


@pytest.mark.parametrize("budget", ["0", "0x", "2x"])
def test_bad_budget(story, capsys, budget):
    _one_line_error(capsys, main(["context", "compress", story, "--budget", budget, "--scorer", str(STORIES)]))


def test_budget_larger_than_the_text_returns_it_unchanged(story, capsys):
    code = main(["context", "compress", story, "--method", "truncate", "--budget", "5000", "--scorer",
                 str(STORIES)])
    out, err = capsys.readouterr()
    assert code == 0 and out.rstrip("\n") == TEXT and "returned unchanged" in err


def test_question_ignored_is_said_once(story, capsys):
    code = main(["context", "compress", story, "--method", "truncate", "--budget", "10", "--scorer", str(STORIES),
                 "--question", "Why?"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("ignores --question") == 1


def test_sentences_need_a_question(story, capsys):
    err = _one_line_error(capsys, main(["context", "compress", story, "--method", "sentences", "--budget", "0.5x",
                                        "--target", str(STORIES)]))
    assert "question" in err


def test_score_json(tmp_path, stories, capsys):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(s[:250] for s in stories[:4]))
    code = main(["context", "score", str(path), "--method", "truncate", "--budget", "0.3x", "--scorer",
                 str(STORIES), "--n", "4", "--json", "-"])
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{"):])
    assert code == 0 and data["n"] == 4 and data["cap_bits"] == 2.0 and data["bits"] <= 2.0 + 1e-9
