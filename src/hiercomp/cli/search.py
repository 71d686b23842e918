"""`hiercomp search`: find a per-layer plan for a budget and write it as YAML."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT, cluster_config, cluster_options


@click.command("search", context_settings=CONTEXT)
@click.argument("model")
@click.option("--budget", required=True,
              help="3.0bpw (bits per weight over the blocks' linear layers), 150KB / 2.5GB / 300MiB (saved "
                   "weights file; KB = 1000 B, KiB = 1024 B), or 0.25x (of the original file).")
@click.option("--search", "search_kind", type=click.Choice(["uniform", "greedy", "evo"]), default="evo",
              show_default=True, help="uniform: best single level; greedy: marginal KL per bit; evo: EvoPress "
                                      "search started from the uniform and greedy plans.")
@click.option("--levels", default=None,
              help="Candidate levels, 'method:param=a,b:param=c;...', plus 'remove' to allow dropping attention/MLP "
                   "sub-blocks (greedy, evo); group_size=channel is per-channel. "
                   "Default: gptq:bits=2,3,4,5,6,8:group_size=32,128.")
@click.option("--calib", type=click.Path(), required=True,
              help="Calibration text (.txt, or .jsonl with --calib-field).")
@click.option("--calib-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--calib-n", default=128, show_default=True,
              help="Number of calibration sequences (the same default as compress).")
@click.option("--calib-len", default=None, type=int, help="Tokens per sequence (default min(512, model context)).")
@click.option("--out", required=True, type=click.Path(), help="Plan YAML to write (PNG pictures go beside it).")
@click.option("--generations", type=click.IntRange(min=0), default=60, show_default=True, help="evo: generations.")
@click.option("--offspring", type=click.IntRange(min=1), default=16, show_default=True, help="evo: children (λ).")
@click.option("--max-removed", type=click.IntRange(min=0), default=2, show_default=True,
              help="With 'remove' in --levels: at most this many sub-blocks removed.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="evo: checkpoint file, written every generation; an existing one is resumed.")
@click.option("--cache", "cache_dir", type=click.Path(), default=None,
              help="Candidate-layer cache folder (default ~/.cache/hiercomp/levels; $HIERCOMP_CACHE moves the root).")
@click.option("--no-pictures", is_flag=True, help="Do not draw the allocation and quality-vs-size PNGs.")
@click.option("--seed", default=0, show_default=True, help="Seed for calibration sampling and the search.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@cluster_options("the fitness evaluations")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def search_cmd(model: str, budget: str, search_kind: str, levels: str | None, calib: str, calib_field: str,
               calib_n: int, calib_len: int | None, out: str, generations: int, offspring: int, max_removed: int,
               checkpoint: str | None, cache_dir: str | None, no_pictures: bool, seed: int, trust_remote_code: bool,
               workers: int | None, ray_address: str | None, worker_threads: int | None, quiet: bool) -> None:
    """Find where to spend a size budget: write a per-layer plan (YAML) for MODEL, without compressing it.

    Apply it with `hiercomp compress MODEL --plan PLAN --calib ... --out DIR`.
    """
    from hiercomp.api import search as run_search
    from hiercomp.budget import parse_budget, parse_levels
    from hiercomp.budget.evo import EvoConfig
    from hiercomp.budget.levels import DEFAULT_LEVELS
    from hiercomp.calibration import CalibrationConfig

    parse_budget(budget)  # bad input fails before the model loads
    parse_levels(levels or DEFAULT_LEVELS)
    cluster = cluster_config(workers, ray_address, worker_threads)
    plan = run_search(model, budget, CalibrationConfig(calib, calib_n, calib_len, seed, calib_field),
                      search=search_kind, levels=levels, evo=EvoConfig(generations=generations, offspring=offspring,
                                                                        seed=seed),
                      max_removed=max_removed, cache_dir=cache_dir, checkpoint=checkpoint, out=out,
                      pictures=not no_pictures, progress=not quiet, trust_remote_code=trust_remote_code,
                      cluster=cluster)
    removed = f", removed {', '.join(plan.removed)}" if plan.removed else ""
    click.echo(f"wrote {out}: {plan.cost['bits_per_weight']:.4f} bits per weight, {plan.cost['size_bytes']:.0f} "
               f"bytes saved size, {plan.fitness['metric']} {plan.fitness['value']:.5f} on "
               f"{plan.fitness['tokens']} tokens{removed} ({plan.fitness['evaluations']} fitness evaluations, "
               f"{plan.fitness['seconds']:.1f} s)")
