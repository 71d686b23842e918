"""Helpers shared by the benchmark scripts: paths to the shared data, timing, peak memory, Markdown."""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K" / "hf"
TINYSTORIES = SHARED / "text" / "tinystories" / "valid_sample.txt"
SQUAD = SHARED / "tasks" / "squad_validation_olmes1000.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_shared() -> None:
    if not STORIES.is_dir():
        raise SystemExit(f"benchmarks need the shared data at {SHARED} (models and text); it is absent here")


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} when written "
            "(above the thread count means other work shared the cores and inflated wall times)")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - start


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str] | None]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else (fmt(value) if fmt else str(value)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def stories_split(tokenizer: Any, calib_n: int, calib_len: int = 256) -> tuple[str, torch.Tensor]:
    """The TinyStories sample cut in two: the first half of its stories as evaluation text, and ``calib_n``
    seeded windows of ``calib_len`` tokens from the second half as calibration (never evaluated)."""
    import tempfile

    from hiercomp import eval as ev
    from hiercomp.calibration import CalibrationConfig, load_calibration

    docs = ev.load_eval_text(TINYSTORIES).split("\n\n")
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.txt"
        calib_file.write_text("\n\n".join(docs[len(docs) // 2:]))
        calibration = load_calibration(tokenizer, CalibrationConfig(str(calib_file), calib_n, calib_len, seed=0))
    return "\n\n".join(docs[: len(docs) // 2]), calibration
