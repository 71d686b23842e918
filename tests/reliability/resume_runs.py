"""Kill -9 a real ``hiercomp compress`` process at a chosen point, rerun it with ``--resume``, compare the files.

Shared by ``tests/reliability/test_resume.py`` and ``benchmarks/reliability.py``. The kill is deterministic: the
process SIGKILLs itself where ``$HIERCOMP_TEST_KILL_AT`` says (:func:`hiercomp.io.resume.kill_point`), so no
sleep decides what was finished. Killed runs are real subprocesses; the uninterrupted reference and the resumed
run may run in this process (``hiercomp.cli.main``) on the same one torch thread, which saves two interpreter
starts per point and writes the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KILL_POINTS = {"calibration": "during calibration", "block:2": "mid-blocks (block 2 of 5)",
               "save": "during save"}


def compress_argv(model: Path, out: Path, method: str, text: Path, *extra: str) -> list[str]:
    return ["compress", str(model), "--out", str(out), "--method", method, "--calib", str(text), "--calib-n", "8",
            "--calib-len", "64", "--quiet", *extra]


def run_process(argv: list[str], kill_at: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m hiercomp.cli ARGV`` in its own process on one thread, which SIGKILLs itself at ``kill_at``."""
    env = {**os.environ, "HIERCOMP_TEST_KILL_AT": kill_at, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "hiercomp.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_here(argv: list[str]) -> tuple[int, str]:
    """``hiercomp.cli.main(argv)`` in this process on one torch thread: (exit code, stderr)."""
    import torch

    from hiercomp.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, stderr.getvalue()


def without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file; for hiercomp.json also of its content without the wall times it records."""
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
    if (folder / "hiercomp.json").is_file():
        meta = without_times(json.loads((folder / "hiercomp.json").read_text()))
        sums["hiercomp.json (without times)"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return sums


def differing(a: Path, b: Path) -> list[str]:
    """Files whose bytes differ, hiercomp.json excepted (its wall times differ between any two runs: its content
    without them is compared instead)."""
    sa, sb = checksums(a), checksums(b)
    names = sorted(set(sa) | set(sb))
    return [n for n in names if n != "hiercomp.json" and sa.get(n) != sb.get(n)]


@dataclass
class KillResume:
    point: str
    killed_code: int  # -9 when the process was SIGKILLed
    left: list[str]  # what the killed run left beside the output
    resumed_code: int
    note: str  # what the resumed run said about the resume
    differing: list[str]
    files: int
    after: list[str]  # what is beside the output once resumed (the output only)

    @property
    def identical(self) -> bool:
        return self.killed_code == -9 and self.resumed_code == 0 and not self.differing and self.after == ["out"]


def kill_then_resume(model: Path, text: Path, method: str, point: str, root: Path, reference: Path) -> KillResume:
    """Kill a run at ``point``, resume it, compare its output with ``reference`` (an uninterrupted run's)."""
    root.mkdir(parents=True, exist_ok=True)
    argv = compress_argv(model, root / "out", method, text)
    killed = run_process(argv, point)
    left = sorted(p.name for p in root.iterdir())
    code, stderr = run_here([*argv, "--resume"])
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    out = root / "out"
    return KillResume(point, killed.returncode, left, code, notes[-1] if notes else "",
                      differing(reference, out) if out.is_dir() else ["(no output)"],
                      len(list(reference.iterdir())), sorted(p.name for p in root.iterdir()))
