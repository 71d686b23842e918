"""`hiercomp export`: write a compressed folder in a format other tools load."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="Folder for the dense Hugging Face export.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export(model: str, out: str, force: bool) -> None:
    """Write a compressed MODEL as a plain Hugging Face folder (dequantized weights) for from_pretrained."""
    from hiercomp.api import export_dense

    export_dense(model, out, force=force)
    click.echo(f"exported {model} -> {out} (dense, loads with from_pretrained)")
