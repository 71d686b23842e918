"""Write a folder atomically: build it under a temporary name beside the target, rename at the end.

An interrupted or failed write leaves the target as it was (absent, or the old folder with --force)
and removes the temporary folder. A run killed outright (SIGKILL, power loss) cannot clean up: its temporary
folder carries the writer's process id in its name (``.NAME.tmp-<pid>-<random>``), and the next write to the
same target removes those whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hiercomp.errors import HiercompError


def check_output_dir(out: str | Path, force: bool, protect: Iterable[str | Path] = ()) -> Path:
    """``out`` can be written: absent, or a folder with ``force``; never a folder in ``protect`` (the input
    model) nor one that holds it, which ``force`` would replace before its files were read back."""
    out = Path(out)
    remove_stale(out)  # a killed run's leftovers go first (and a set-aside old output comes back)
    if out.exists() and not force:
        raise HiercompError(f"output folder {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise HiercompError(f"{out} exists and is not a folder; choose another --out")
    target = out.resolve()
    for source in protect:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue
        resolved = source_path.resolve()
        if resolved == target or target in resolved.parents:
            raise HiercompError(f"--out {out} is (or holds) the input {source}; --force would replace the model "
                                "being read — choose another --out")
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temporary folder's name (``.X.tmp-<pid>-<random>``) still runs."""
    pid_text = name.rsplit(".tmp-", 1)[-1].split("-", 1)[0] if ".tmp-" in name else ""
    if not pid_text.isdigit():
        return False  # written before names carried a pid: a leftover
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale(out: str | Path) -> list[Path]:
    """Remove the temporary folders (``.NAME.tmp-*``, ``.NAME.old-*``) that killed writes to ``out`` left beside
    it; those of a writer still running are kept. An old folder set aside by a ``--force`` write killed between
    its two renames is put back when ``out`` is absent (it is the user's previous output). Returns what was
    removed or restored."""
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for prefix in (f".{out.name}.old-", f".{out.name}.tmp-"):
        for leftover in sorted(out.parent.glob(f"{prefix}*")):
            if not leftover.is_dir() or leftover.is_symlink() or _writer_alive(leftover.name.replace(".old-", ".tmp-")):
                continue
            if prefix.endswith(".old-") and not out.exists():
                leftover.rename(out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and some writers make files 0600: give everything the modes a plain
    mkdir/open would have under the user's umask."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('.tmp-', 1)[-1]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
