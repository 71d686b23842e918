"""What a new user meets first (issue 17): a fast --help, one size convention, tables that do not cut words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hiercomp.cli import main
from tests.conftest import STORIES, needs_shared


def test_cli_import_does_not_import_torch():
    """`hiercomp --help` prints at once: importing the CLI must not import torch or transformers (seconds)."""
    code = ("import sys, hiercomp.cli; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("n, text", [(999, "999 B"), (1000, "1.00 KB"), (277_200, "277.20 KB"),
                                     (1_500_000, "1.50 MB"), (2_000_000_000, "2.00 GB")])
def test_sizes_print_in_decimal_units(n, text):
    """KB = 1000 B everywhere (CLI, report, budgets); 277,200 bytes is 277.20 KB, never 270.70 "KB"."""
    from hiercomp.budget import parse_budget
    from hiercomp.cli._common import fmt_bytes
    from hiercomp.report.plots import format_bytes

    assert fmt_bytes(n) == text
    assert format_bytes(n, digits=3) == (text if n < 1000 else f"{float(text.split()[0]):.3g} {text.split()[1]}")
    if n >= 1000:  # a printed size read back as a budget is the same number of bytes (to the printed digits)
        value, unit = text.split()
        assert abs(parse_budget(value + unit).value - n) <= 0.005 * 10 ** {"KB": 3, "MB": 6, "GB": 9}[unit]


def test_info_shows_the_whole_method_description(tmp_path, monkeypatch, capsys):
    """A long method description is printed whole, not cut mid-word at a fixed column width."""
    import hiercomp.api
    import hiercomp.info
    import hiercomp.io.saved

    method = "gptq(bits=3, group_size=128, symmetric=False, damp=0.01, act_order=True, static_groups=True)"
    layer = {"name": "model.layers.0.mlp.down_proj", "method": method, "shape": [64, 128], "bits_per_weight": 3.25,
             "rel_output_error": 0.01, "rel_weight_error": 0.02}
    meta = {"report": {"layers": [layer], "bits_per_weight": 3.25, "compressed_weights": 8192}, "source": "x"}
    monkeypatch.setattr(hiercomp.info, "is_compressed_dir", lambda ref: True)
    monkeypatch.setattr(hiercomp.io.saved, "read_meta", lambda path: meta)
    monkeypatch.setattr(hiercomp.api, "saved_size_bytes", lambda path: {"size_bytes": 4000, "header_bytes": 100})
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert method in out and "method" in out.splitlines()[0]


def test_readme_setup_commands_install_cpu_torch_first():
    """Set-up command 1 names the CPU torch itself (a bare `pip install torch` pulls a CUDA stack)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in setup.splitlines() if line.startswith("pip install")]
    assert len(commands) == 2, commands
    assert all("torch==" in c for c in commands), commands


@needs_shared
def test_load_leaves_the_global_random_seed_alone(tmp_path):
    """Loading a model must not draw from torch's global generator: a seeded script gives the same numbers with
    or without a `hiercomp.load` in between."""
    import torch

    import hiercomp
    from hiercomp.recipe import Recipe

    cm = hiercomp.compress(str(STORIES), Recipe.single("rtn", bits=4, group_size=32), None, progress=False)
    cm.save(tmp_path / "m")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    hiercomp.load(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_one_cache_root_and_one_cache_default_in_every_help(monkeypatch, tmp_path):
    """$HIERCOMP_CACHE is the root of every cache (converted built-in models, candidate layers in levels/), and
    `compress --help` and `search --help` state the same default."""
    from click.testing import CliRunner

    from hiercomp.budget.cache import default_cache_dir
    from hiercomp.cli import cli
    from hiercomp.io.builtin import cache_root

    monkeypatch.setenv("HIERCOMP_CACHE", str(tmp_path))
    assert cache_root() == tmp_path and default_cache_dir() == tmp_path / "levels"
    texts = [" ".join(CliRunner().invoke(cli, [name, "--help"]).output.split()) for name in ("compress", "search")]
    default = "default ~/.cache/hiercomp/levels; $HIERCOMP_CACHE moves the root"
    assert all(default in text for text in texts), texts
