"""`hiercomp info`: the per-layer table of a model."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT, write_json


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--json", "json_out", default=None, help="Write the table as JSON ('-' = stdout).")
def info(model: str, json_out: str | None) -> None:
    """Per-layer table of MODEL: method, bits per weight, relative output error (or shapes if uncompressed)."""
    from hiercomp.info import describe

    table, data = describe(model)
    click.echo(table)
    write_json(data, json_out)
