"""Read a YAML file a user wrote (a recipe, a plan) with one-line errors and nothing executed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hiercomp.errors import HiercompError

MAX_YAML_BYTES = 16 * 1024 * 1024  # a recipe or plan is a few KB; never read a device or a huge file whole


def load_yaml(path: str | Path, what: str) -> Any:
    """The file's data, with one-line errors: missing, not a regular file, too large, not YAML, or carrying Python
    tags (which ``safe_load`` refuses: nothing from a file is ever executed)."""
    path = Path(path)
    if not path.exists():
        raise HiercompError(f"{what} file {path} does not exist")
    if not path.is_file() or path.stat().st_size > MAX_YAML_BYTES:
        raise HiercompError(f"{what} file {path} is not a regular file under {MAX_YAML_BYTES // 2**20} MiB")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HiercompError(f"{what} file {path} is not valid YAML ({first}); fix it or write it again") from None
