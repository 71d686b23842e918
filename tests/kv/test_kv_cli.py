"""`hiercomp kv eval` / `kv passkey` on stories260K; bad specs are one-line errors with exit 2."""

from __future__ import annotations

import json

import pytest

from hiercomp.cli import main
from tests.conftest import SHARED_DATA, STORIES, TINYSTORIES, needs_shared

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_shared]


def test_kv_eval_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["kv", "eval", str(STORIES), "--spec", "", "--spec", "snapkv:ratio=0.5+kivi:bits=4",
                 "--text", str(TINYSTORIES), "--prefix", "96", "--continuation", "8", "--sequences", "1",
                 "--json", str(out)])
    assert code in (0, None)
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["kl"] < 1e-6 and rows[1]["kl"] > 0 and rows[1]["factor"] >= 1.99
    # (48 kept tokens, all inside the fp16 window)


def test_kv_passkey_cli(capsys):
    code = main(["kv", "passkey", str(STORIES), "--spec", "streaming:budget=64", "--haystack",
                 str(SHARED_DATA / "text" / "wikitext-2-raw" / "wiki.valid.raw"), "--lengths", "200",
                 "--depths", "0.5"])
    assert code in (0, None)
    assert "accuracy" in capsys.readouterr().out


def test_kv_bad_spec_is_one_line(capsys):
    code = main(["kv", "eval", str(STORIES), "--spec", "snapkv:ratio=2", "--text", str(TINYSTORIES)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "(0, 1)" in err
