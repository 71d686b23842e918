"""What every command shares: click settings, JSON output, sizes printed in one unit convention."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def write_json(data: dict[str, Any] | list[Any], target: str | None) -> None:
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


def cluster_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--workers / --ray-address / --worker-threads: spread ``what`` over Ray workers (hiercomp.distributed)."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--worker-threads", type=int, default=None,
                          help="Torch threads per Ray worker (default: this process's count, which keeps the "
                               "floats identical to a run without workers).")(fn)
        fn = click.option("--ray-address", default=None,
                          help=f"Join a running Ray cluster ('auto', HOST:PORT or ray://HOST:PORT) for {what}; "
                               "with --workers, use that many of its workers.")(fn)
        return click.option("--workers", type=int, default=None,
                            help=f"Start a local Ray cluster with N workers for {what} (pip install "
                                 "'hiercomp[ray]'); results are those of a run without it.")(fn)
    return decorate


def cluster_config(workers: int | None, ray_address: str | None, worker_threads: int | None) -> Any:
    """A :class:`hiercomp.distributed.ClusterConfig` (checked: bad values fail here, before any model loads), or
    None for a run in this process."""
    if workers is None and ray_address is None:
        if worker_threads is not None:
            from hiercomp.errors import HiercompError

            raise HiercompError("--worker-threads needs --workers N or --ray-address ADDRESS")
        return None
    from hiercomp.distributed import ClusterConfig

    config = ClusterConfig(workers=workers, address=ray_address, threads=worker_threads)
    config.preflight()
    return config
