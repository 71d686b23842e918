"""Write a folder atomically: build it under a temporary name beside the target, rename at the end.

An interrupted or failed write leaves the target as it was (absent, or the old folder with --force)
and removes the temporary folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hiercomp.errors import HiercompError


def check_output_dir(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise HiercompError(f"output folder {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise HiercompError(f"{out} exists and is not a folder; choose another --out")
    return out


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
