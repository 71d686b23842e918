"""The command line: the main path on the real stories260K, and one-line errors for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hiercomp.cli import main
from tests.conftest import STORIES, TINYSTORIES, needs_shared


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def no_leftovers(folder: Path) -> bool:
    return not any(p.name.startswith(".") and ".tmp-" in p.name for p in folder.iterdir())


@needs_shared
def test_compress_eval_info_on_stories260k(tmp_path, capsys):
    out = tmp_path / "s4"
    code, stdout, err = run(["compress", STORIES, "--method", "gptq", "--bits", 4, "--group-size", 32,
                             "--calib", TINYSTORIES, "--calib-n", 16, "--calib-len", 128, "--out", out, "--quiet"],
                            capsys)
    assert code == 0, err
    assert "bits per weight" in stdout
    code, stdout, err = run(["eval", out, "--text", TINYSTORIES, "--kl-against", STORIES, "--max-windows", 20,
                             "--seq-len", 256, "--json", tmp_path / "e.json", "--quiet"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    for key in ("perplexity", "kl", "top1_agreement", "bits_per_weight", "size_bytes"):
        assert key in result
    assert 0 < result["kl"] < 0.5 and 0.5 < result["top1_agreement"] <= 1
    # 4-bit codes + per-32 fp16 scales + 4-bit zeros, with stories260K's 172-wide down_proj's short group
    assert 4.6 < result["bits_per_weight"] < 4.7
    code, stdout, err = run(["info", out, "--json", tmp_path / "i.json"], capsys)
    assert code == 0 and "model.layers.4.mlp.down_proj" in stdout
    info = json.loads((tmp_path / "i.json").read_text())
    assert len(info["layers"]) == 35 and all(r["rel_output_error"] < 0.1 for r in info["layers"])


@needs_shared
def test_info_on_an_original_model_lists_the_hierarchy(capsys):
    code, stdout, _ = run(["info", STORIES], capsys)
    assert code == 0 and "5 blocks under 'model.layers'" in stdout and "260,032 parameters" in stdout


def test_missing_model_folder(tmp_path, capsys):
    code, _, err = run(["compress", tmp_path / "nope", "--method", "rtn", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code, _, err = run(["compress", tmp_path / "m", "--method", "rtn", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "no config.json")


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch"}))
    code, _, err = run(["compress", tmp_path / "m", "--method", "rtn", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "unsupported architecture", "llama")


@needs_shared
def test_corrupt_weights(tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(STORIES, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run(["compress", model, "--method", "rtn", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "damaged")


@needs_shared
def test_nan_weights_are_refused(tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(STORIES, model)
    state = load_file(str(model / "model.safetensors"))
    state["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(["compress", model, "--method", "rtn", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "NaN", "model.layers.2.mlp.up_proj")
    assert not (tmp_path / "o").exists()


@needs_shared
@pytest.mark.parametrize("args,fragment", [
    (["--bits", 9], "between 2 and 8"),
    (["--bits", 1], "between 2 and 8"),
    (["--group-size", -4], "positive integer"),
    (["--sparsity", 0.5], "does not apply to rtn"),
])
def test_out_of_range_parameters(tmp_path, capsys, args, fragment):
    code, _, err = run(["compress", STORIES, "--method", "rtn", *args, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, fragment)


@needs_shared
def test_unknown_method(tmp_path, capsys):
    code, _, err = run(["compress", STORIES, "--method", "magic", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "unknown method", "gptq")


@needs_shared
def test_empty_and_too_short_calibration(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(["compress", STORIES, "--method", "gptq", "--calib", empty, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, str(empty))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    code, _, err = run(["compress", STORIES, "--method", "gptq", "--calib", short, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "--calib-len")
    assert not (tmp_path / "o").exists()


@needs_shared
def test_method_needing_data_without_calibration(tmp_path, capsys):
    code, _, err = run(["compress", STORIES, "--method", "gptq", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "--calib")


@needs_shared
def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["compress", STORIES, "--method", "rtn", "--bits", 8, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(["compress", STORIES, "--method", "rtn", "--bits", 8, "--out", out, "--force", "--quiet"],
                       capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "hiercomp.json").is_file()
    assert no_leftovers(tmp_path)


@needs_shared
def test_ctrl_c_during_compression_leaves_nothing(tmp_path, capsys, monkeypatch):
    from hiercomp.methods.rtn import RTN

    calls = {"n": 0}
    original = RTN.compress

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RTN, "compress", interrupted)
    code, _, err = run(["compress", STORIES, "--method", "rtn", "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


@needs_shared
def test_interrupt_while_writing_removes_the_temporary_folder(tmp_path, monkeypatch):
    import hiercomp
    from hiercomp.io import saved

    cm = hiercomp.compress(str(STORIES), hiercomp.Recipe.single("rtn", bits=8), progress=False)

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saved, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        cm.save(tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


@needs_shared
def test_damaged_compressed_folder_is_reported(tmp_path, capsys):
    import hiercomp

    cm = hiercomp.compress(str(STORIES), hiercomp.Recipe.single("rtn", bits=8), progress=False)
    cm.save(tmp_path / "o")
    (tmp_path / "o" / "hiercomp.json").write_text("{broken")
    code, _, err = run(["info", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "damaged")


def test_help_is_there_for_newcomers(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "compress" in out and "eval" in out and "info" in out
    code, out, _ = run(["compress", "--help"], capsys)
    assert code == 0 and "--group-size" in out and "--calib" in out




def test_methods_lists_every_method_with_its_parameters(capsys):
    from hiercomp.methods import METHODS

    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for name in METHODS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "n_grid=20" in out  # AWQ's grid, a parameter with no dedicated flag


@needs_shared
def test_param_passes_any_method_parameter(tmp_path, capsys):
    out = tmp_path / "hqq"
    code, _, err = run(["compress", STORIES, "--method", "hqq", "--bits", 3, "--group-size", 32,
                        "--param", "iters=3", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    recipe = (out / "recipe.yaml").read_text()
    assert "iters: 3" in recipe and "bits: 3" in recipe
    code, _, err = run(["compress", STORIES, "--method", "hqq", "--param", "rank=4", "--out", tmp_path / "x",
                        "--quiet"], capsys)
    assert_one_line_error(code, err, "--rank does not apply to hqq")
    code, _, err = run(["compress", STORIES, "--method", "hqq", "--param", "iters", "--out", tmp_path / "y"], capsys)
    assert_one_line_error(code, err, "KEY=VALUE")
