"""Write one file atomically: into a temporary name beside it, renamed over the target at the end.

A report, its pictures and its cache entries are either whole or absent (or the previous version), never
half-written, even when the run is interrupted. Folders use :func:`hiercomp.io.atomic.atomic_dir`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(out: str | Path, text: str) -> Path:
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out)
