"""``compress --resume``: after kill -9 at any point, the rerun continues from the last finished block and writes the
bytes of an uninterrupted run; other arguments are refused in one line; leftovers never outlive the next run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hiercomp
import hiercomp.engine as engine
import hiercomp.io.resume as resume
from hiercomp.errors import HiercompError
from hiercomp.io.hf import LoadedModel
from hiercomp.recipe import Recipe
from tests.conftest import STORIES, TINYSTORIES, needs_shared
from tests.contract.test_method_contract import CALIBRATION, SMALL, tiny_llama
from tests.reliability.resume_runs import KILL_POINTS, compress_argv, differing, kill_then_resume, run_here

pytestmark = pytest.mark.usefixtures("one_thread")


class HardKill(BaseException):
    """Stands for SIGKILL in process: nothing unwinds the resume folder (its removal is switched off)."""


def compress_tiny(method: str, out: Path, *, resume_run: bool = False, **params: object) -> hiercomp.CompressedModel:
    recipe = Recipe.single(method, **{**SMALL.get(method, {}), **params})
    return hiercomp.compress(LoadedModel(tiny_llama(), None, False, "tiny"), recipe, CALIBRATION, out=out,
                             progress=False, resume=resume_run)


def hard_kill_at(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    def kill(point: str) -> None:
        if point == where:
            raise HardKill

    monkeypatch.setattr(engine, "kill_point", kill)
    monkeypatch.setattr(resume.BlockCheckpoints, "remove", lambda self: None)


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@needs_shared
def test_kill_9_at_three_points_then_resume_gives_the_same_bytes(tmp_path: Path) -> None:
    """A real `hiercomp compress` process (GPTQ on stories260K) killed during calibration, mid-blocks and during
    save; `--resume` then writes every file with the reference's sha256 (hiercomp.json: apart from wall times)."""
    text = tmp_path / "text.txt"
    text.write_text(TINYSTORIES.read_text()[:20000])
    reference = tmp_path / "reference" / "out"
    reference.parent.mkdir()
    assert run_here(compress_argv(STORIES, reference, "gptq", text))[0] == 0
    for point in KILL_POINTS:
        result = kill_then_resume(STORIES, text, "gptq", point, tmp_path / point.replace(":", "_"), reference)
        assert result.killed_code == -9, point
        assert any(name.startswith(".out.resume-") for name in result.left), (point, result.left)
        if point == "save":
            assert any(name.startswith(".out.tmp-") for name in result.left), result.left  # the killed write's
        assert result.resumed_code == 0, (point, result.note)
        restored = {"calibration": "no block had finished", "block:2": "2 finished block(s)",
                    "save": "5 finished block(s)"}[point]
        assert restored in result.note, (point, result.note)
        assert result.differing == [], (point, result.differing)
        assert result.after == ["out"], (point, result.after)  # resume folder and stale .tmp gone


@pytest.mark.parametrize("method", ["gptq", "awq", "bitstack", "sparsegpt", "svd"])
def test_resume_after_a_kill_mid_block_is_byte_identical(method: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, per method family: sequential propagation (gptq, sparsegpt), the original model's activations
    and folded scales (awq), the BitStack order, low rank; block 0 restored, block 1 compressed again."""
    compress_tiny(method, tmp_path / "a")
    with monkeypatch.context() as patch:
        hard_kill_at(patch, "block:1")
        with pytest.raises(HardKill):
            compress_tiny(method, tmp_path / "b")
    assert [n for n in beside(tmp_path) if n.startswith(".b.resume-")], beside(tmp_path)
    compress_tiny(method, tmp_path / "b", resume_run=True)
    assert differing(tmp_path / "a", tmp_path / "b") == []
    assert beside(tmp_path) == ["a", "b"]
    a, b = (json.loads((tmp_path / d / "hiercomp.json").read_text())["report"]["layers"] for d in "ab")
    assert [row["rel_output_error"] for row in a] == [row["rel_output_error"] for row in b]


def test_other_arguments_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        hard_kill_at(patch, "block:1")
        with pytest.raises(HardKill):
            compress_tiny("gptq", tmp_path / "out", bits=4)
    left = beside(tmp_path)
    with pytest.raises(HiercompError) as err:
        compress_tiny("gptq", tmp_path / "out", resume_run=True, bits=3)
    message = str(err.value)
    assert "\n" not in message and "other arguments" in message and "the method, recipe or plan" in message
    assert "model's weights" not in message  # only what differs is named
    assert beside(tmp_path) == left  # the killed run's checkpoints are kept for a rerun with the right arguments


def test_without_resume_a_leftover_is_removed_and_named_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    with monkeypatch.context() as patch:
        hard_kill_at(patch, "block:1")
        with pytest.raises(HardKill):
            compress_tiny("rtn", tmp_path / "out")
    capsys.readouterr()
    compress_tiny("rtn", tmp_path / "out", group_size=32)  # other arguments, no --resume: a fresh run
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "removed" in notes[0] and "--resume" in notes[0], notes
    assert beside(tmp_path) == ["out"]


def test_nothing_to_resume_starts_from_the_first_block(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    compress_tiny("rtn", tmp_path / "out", resume_run=True)
    assert "nothing to resume" in capsys.readouterr().err
    assert beside(tmp_path) == ["out"]
    with pytest.raises(HiercompError, match="pass out="):
        hiercomp.compress(LoadedModel(tiny_llama(), None, False, "tiny"), Recipe.single("rtn"), resume=True,
                          progress=False)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_an_error_leaves_nothing(fault: type[BaseException], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(point: str) -> None:
        if point == "block:1":
            raise fault()

    monkeypatch.setattr(engine, "kill_point", stop)
    with pytest.raises(fault):
        compress_tiny("gptq", tmp_path / "out")
    assert beside(tmp_path) == []


def test_a_damaged_checkpoint_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        hard_kill_at(patch, "block:1")
        with pytest.raises(HardKill):
            compress_tiny("gptq", tmp_path / "out")
    state = next(tmp_path.glob(".out.resume-*/block-0000/state.safetensors"))
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(HiercompError) as err:
        compress_tiny("gptq", tmp_path / "out", resume_run=True)
    assert "\n" not in str(err.value) and "damaged" in str(err.value) and "without --resume" in str(err.value)


def test_the_saved_inputs_are_those_of_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint holds block 1's inputs as computed from compressed block 0 (GPTQ propagation), and the
    random state: a resume never recomputes them from anything else."""
    with monkeypatch.context() as patch:
        hard_kill_at(patch, "block:1")
        with pytest.raises(HardKill):
            compress_tiny("gptq", tmp_path / "out")
    from safetensors.torch import load_file

    saved = load_file(next(tmp_path.glob(".out.resume-*/block-0000/inputs.safetensors")))
    hidden = [saved[f"hidden.{i}"] for i in range(len(saved) - 1)]
    assert len(hidden) == 1 and hidden[0].shape == (4, 32, 64)  # 4 sequences of 32 tokens in one batch of 8
    assert saved["rng.torch_cpu"].dtype == torch.uint8
    dense = tiny_llama()
    with torch.no_grad():
        original = dense(input_ids=CALIBRATION, output_hidden_states=True).hidden_states[1]
    assert not torch.equal(hidden[0], original)  # the compressed block's outputs, not the original's
    assert (hidden[0] - original).norm() / original.norm() < 0.2
