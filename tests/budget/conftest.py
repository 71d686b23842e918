"""Fixtures shared by the search tests (in one process and on Ray workers)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import STORIES, TINYSTORIES


@pytest.fixture(scope="module")
def calib_8x128() -> torch.Tensor:
    """8 calibration windows of 128 tokens of TinyStories for stories260K (the search tests' common data)."""
    if not STORIES.is_dir():
        pytest.skip("../shared/data is absent (a user's clone): the stories260K search tests need it")
    from transformers import AutoTokenizer

    from hiercomp.calibration import CalibrationConfig, load_calibration

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    return load_calibration(tok, CalibrationConfig(str(TINYSTORIES), 8, 128, 0))
