"""Every bad input and fault of the reliability matrix (tests/reliability/cases.py): one line, its exit code,
nothing left behind — and never a silent exit 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import needs_shared
from tests.reliability.cases import CASES, prepare_env, run_case

pytestmark = [needs_shared, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepare_env(tmp_path_factory.mktemp("reliability_env"))


def test_the_matrix_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, env: dict[str, Path], tmp_path: Path) -> None:
    outcome = run_case(case, env, tmp_path / "case")
    assert outcome.traceback is None, outcome.traceback
    assert not outcome.silent, f"exit 0 on a bad input: {outcome.message}"
    assert outcome.code == case.code, outcome.message
    assert case.fragment.lower() in outcome.message.lower(), outcome.message
    if case.code != 0:
        assert outcome.lines == 1 and outcome.message.startswith(("error:", "interrupted:")), outcome.message
    assert not outcome.left_behind, outcome.left_behind
