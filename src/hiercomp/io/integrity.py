"""What a saved folder's files must be before anything in them is trusted: regular files of bounded size, and
tensor files whose content hash is the one written at save time.

The hash makes a folder's parts inseparable: weights swapped in from another folder (same names and shapes), a
``hiercomp.json`` copied from another folder, or a file damaged in place all fail at load with one line instead of
loading as a plausible model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from hiercomp.errors import HiercompError

HASH = "sha256"
CHUNK = 1 << 20


def read_regular(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file (a symlink to one is fine) of at most ``limit`` bytes.

    Opened non-blocking and checked on the open descriptor: a FIFO, a device (/dev/zero) or a file that grows
    while read is refused, never read until memory runs out.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise HiercompError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise HiercompError(f"{what} {path} is not a regular file; restore the folder")
        if info.st_size > limit:
            raise HiercompError(f"{what} {path} is {info.st_size} bytes, more than the {limit} bytes such a file "
                                "can be; the folder is damaged — restore it")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise HiercompError(f"{what} {path} grew past {limit} bytes while read; restore the folder")
        return data
    finally:
        os.close(fd)


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": n}`` of a regular file, read in 1 MiB chunks (no whole-file copy in memory)."""
    digest = hashlib.new(HASH)
    size = 0
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise HiercompError(f"{path} is not a regular file; restore the folder")
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {HASH: digest.hexdigest(), "bytes": size}


def verify_files(folder: str | Path, info: dict[str, Any]) -> None:
    """Check every file listed in ``info["files"]`` against its recorded size and hash (one-line errors).

    Folders saved before hashes were recorded have no ``files`` entry and are read as before.
    """
    folder = Path(folder)
    for name, expected in (info.get("files") or {}).items():
        path = folder / name
        if "/" in name or name.startswith(".") or not isinstance(expected, dict):
            raise HiercompError(f"{folder}/hiercomp.json lists an invalid file entry {name!r}; restore the folder")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise HiercompError(f"{folder} has no {name}; the folder is incomplete — compress the model "
                                "again") from None
        if not path.is_file():
            raise HiercompError(f"{path} is not a regular file; restore the folder")
        if size != expected.get("bytes"):
            raise HiercompError(f"{path} has {size} bytes, hiercomp.json recorded {expected.get('bytes')}: the file "
                                "is truncated or from another folder — compress the model again")
        try:
            actual = file_digest(path)[HASH]
        except OSError as err:
            raise HiercompError(f"cannot read {path}: {err.strerror or err}") from None
        if actual != expected.get(HASH):
            raise HiercompError(f"{path} does not match its hiercomp.json (content hash differs): the weights or "
                                "the metadata come from another folder or were damaged — compress the model again")



# The parts of hiercomp.json that decide how the stored tensors are read: an edit to any of them (a layer's bits,
# a BitStack block size, the dtype) changes what the same bytes mean, so it is hashed like a tensor file.
STRUCTURE_KEYS = ("model_class", "dtype", "layers", "aliases", "removed", "bitstack")


def structure_digest(info: dict[str, Any]) -> str:
    canonical = json.dumps({k: info.get(k) for k in STRUCTURE_KEYS}, sort_keys=True, default=str)
    return hashlib.new(HASH, canonical.encode()).hexdigest()


def verify_structure(folder: str | Path, info: dict[str, Any]) -> None:
    """Check the recorded structure digest (folders saved before it was recorded have none)."""
    expected = info.get("structure_" + HASH)
    if expected is not None and expected != structure_digest(info):
        raise HiercompError(f"{folder}/hiercomp.json was edited: its layer configs, dtype, ties or BitStack order "
                            "no longer match what was saved with the weights — compress the model again")
