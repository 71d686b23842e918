"""What every command shares: click settings, JSON output, sizes printed in one unit convention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def write_json(data: dict[str, Any], target: str | None) -> None:
    if target is None:
        return
    text = json.dumps(data, indent=1, default=float)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n")
        click.echo(f"wrote {target}", err=True)


def fmt_bytes(n: float) -> str:
    """Decimal units everywhere (KB = 1000 B, MB = 10^6 B), as budgets and the report read them."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
