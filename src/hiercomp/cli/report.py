"""`hiercomp report`: compare compressed variants in one HTML/Markdown file."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT, cluster_config, cluster_options


@click.command(context_settings=CONTEXT)
@click.argument("dirs", nargs=-1)
@click.option("--out", required=True, type=click.Path(),
              help="Report file: .html (one self-contained file) or .md (pictures in <name>_files/ beside it).")
@click.option("--text", type=click.Path(), default=None, help="Text for perplexity and KL (causal LMs).")
@click.option("--kl-against", "--reference", "reference", default=None,
              help="Original model folder: the baseline row, KL / top-1 (LMs) or cosine (encoders), verdicts.")
@click.option("--tasks", multiple=True, help="Task spec or name (arc_easy, piqa, ...); repeat for several.")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder holding the tasks' data files.")
@click.option("--squad", type=click.Path(), default=None, help="SQuAD JSONL for retrieval recall@1 (encoders).")
@click.option("--limit", type=int, default=None, help="At most this many examples per task (or SQuAD pairs).")
@click.option("--seed", type=int, default=None, help="Seed for few-shot sampling in the tasks.")
@click.option("--seq-len", type=int, default=None, help="Perplexity window (default min(2048, model context)).")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many perplexity windows.")
@click.option("--from-json", "from_json", multiple=True, type=click.Path(),
              help="A `hiercomp eval --json` result to use instead of evaluating (repeatable).")
@click.option("--title", default="", help="Report title.")
@click.option("--refresh", is_flag=True, help="Evaluate again instead of reusing the cached results beside --out.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@cluster_options("the variants' evaluations (one variant per worker)")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report(dirs: tuple[str, ...], out: str, text: str | None, reference: str | None, tasks: tuple[str, ...],
           data_dir: str | None, squad: str | None, limit: int | None, seed: int | None, seq_len: int | None,
           max_windows: int | None, from_json: tuple[str, ...], title: str, refresh: bool, force: bool,
           workers: int | None, ray_address: str | None, worker_threads: int | None, quiet: bool) -> None:
    """Compare compressed variants DIRS of one model: table, quality-vs-size and per-layer plots.

    \b
    Example:
      hiercomp report out/rtn8 out/gptq4 out/gptq3 --text held_out.txt --kl-against MODEL_DIR \\
          --tasks arc_easy --tasks piqa --limit 200 --out report.html
    Evaluations are cached in .hiercomp_report_cache/ beside --out, so a rerun only redraws. With --workers N
    (or --ray-address) the variants are measured on Ray workers, then the report is drawn from that cache.
    """
    from pathlib import Path

    from hiercomp.report import EvalOptions, make_report

    options = EvalOptions(text=text, reference=reference, tasks=tasks, data_dir=data_dir, squad=squad, limit=limit,
                          seed=seed, seq_len=seq_len, max_windows=max_windows)
    cluster = cluster_config(workers, ray_address, worker_threads)
    if cluster is not None:
        from hiercomp.distributed import executor_for
        from hiercomp.report.collect import CACHE_DIR_NAME
        from hiercomp.report.render import check_report_path
        from hiercomp.sweep import measure_report_variants

        check_report_path(Path(out), force)  # refuse an existing --out before the cluster starts
        with executor_for(cluster) as executor:
            measure_report_variants(list(dirs), options, executor, cache_dir=Path(out).parent / CACHE_DIR_NAME,
                                    from_json=list(from_json), refresh=refresh, progress=not quiet)
        refresh = False  # just measured: the report reads those entries
    path = make_report(list(dirs), out, options, from_json=list(from_json), force=force, refresh=refresh,
                       title=title, progress=not quiet)
    click.echo(f"wrote {path}")
