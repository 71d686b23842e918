"""`hiercomp methods`: every registered method with its parameters and defaults."""

from __future__ import annotations

import sys

import click

from hiercomp.cli._common import CONTEXT


@click.command("methods", context_settings=CONTEXT)
def methods_cmd() -> None:
    """List every compression method with its parameters and their defaults."""
    from dataclasses import MISSING, fields

    from hiercomp.methods import METHODS

    for name in sorted(METHODS):
        cls = METHODS[name]
        # Dataclasses without a docstring get a generated signature as __doc__: use the module's first line.
        doc = sys.modules[cls.__module__].__doc__ or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        params = ", ".join(f"{f.name}={'(required)' if f.default is MISSING else f.default!r}" for f in fields(cls))
        click.echo(f"{name:<10} {summary}")
        click.echo(f"{'':<10} {params}")
