"""Fixtures for the context level: stories260K as scorer (loaded once), TinyStories stories as texts."""

from __future__ import annotations

import pytest

from tests.conftest import STORIES, TINYSTORIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def stories_scorer():
    if not STORIES.is_dir():
        pytest.skip("../shared/data is absent (a user's clone): stories260K lives there")
    from hiercomp.context import as_scorer

    return as_scorer(str(STORIES))


@pytest.fixture(scope="session")
def stories() -> list[str]:
    if not TINYSTORIES.is_file():
        pytest.skip("../shared/data is absent")
    docs = [d.strip() for d in TINYSTORIES.read_text().split("<|endoftext|>")]
    return [d for d in docs[1:] if 400 < len(d) < 1200][:12]  # the first story is a fragment; ~100-300 tokens


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())
