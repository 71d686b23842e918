"""`hiercomp compress`: parse the options, call the API, print what was saved."""

from __future__ import annotations

from typing import Any

import click

from hiercomp.cli._common import CONTEXT, cluster_config, cluster_options, fmt_bytes, write_json
from hiercomp.errors import HiercompError


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(),
              help="Folder to write (must not exist, unless --force).")
@click.option("--method", type=str, default=None,
              help="rtn | gptq | awq | hqq | hlq | hlq_gptq (quantizers), magnitude | wanda | sparsegpt (pruners), "
                   "svd (low rank), bitstack (any-size, see `eval --budget`); `hiercomp methods` lists every method "
                   "with its parameters. Or use --recipe.")
@click.option("--recipe", type=click.Path(), default=None, help="YAML recipe aiming methods at layers by name.")
@click.option("--bits", type=int, default=None, help="Quantizer bit width, 2..8 (default 4).")
@click.option("--group-size", type=int, default=None,
              help="Weights per scale along the input dimension (default 128; 0 = one scale per output channel).")
@click.option("--symmetric", is_flag=True, help="Symmetric grid (no zero points stored).")
@click.option("--act-order", is_flag=True, help="GPTQ: process columns by decreasing activation energy.")
@click.option("--damp", type=float, default=None, help="GPTQ/SparseGPT Hessian damping, fraction of mean diagonal.")
@click.option("--sparsity", type=float, default=None, help="Pruners: fraction of weights removed (default 0.5).")
@click.option("--pattern", type=str, default=None, help="Pruners: N:M pattern such as 2:4 (keep N of every M).")
@click.option("--rank", type=int, default=None, help="svd: rank kept per layer.")
@click.option("--rotate", is_flag=True, help="Incoherence processing: quantize randomly Hadamard-rotated weights "
              "(rtn, gptq, hqq, hlq, hlq_gptq, trellis; e8 becomes quip); seed: --param rotation_seed=N.")
@click.option("--tune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="After quantizing, tune the stored scales/zeros and norm weights by distillation from the "
                   "original for this many steps (needs --calib; see hiercomp.tune).")
@click.option("--tune-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="With --tune-steps: Adam's step relative to each tuned tensor's size.")
@click.option("--tune-codes", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --tune-steps: every N steps also re-choose the codes a gradient step moves most "
                   "(PV-Tuning's V step; grids, E8, trellis); 0 keeps the codes.")
@click.option("--tune-uncompressed", is_flag=True,
              help="With --tune-steps: also tune every parameter left dense (embeddings, output head), as "
                   "PV-Tuning does; the size does not change.")
@click.option("--tune-generated", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --tune-steps: also distil on this many windows the original model samples itself "
                   "(for short calibration text; causal LMs).")
@click.option("--param", "extra_params", multiple=True, metavar="KEY=VALUE",
              help="Any other method parameter, e.g. --param n_grid=40 (repeatable; see `hiercomp methods`).")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text: .txt, or .jsonl with --calib-field.")
@click.option("--calib-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--calib-n", default=None, type=int, help="Number of calibration sequences (default 128).")
@click.option("--calib-len", default=None, type=int, help="Tokens per sequence (default min(512, model context)).")
@click.option("--propagate", type=click.Choice(["compressed", "original"]), default="compressed", show_default=True,
              help="Feed each block the outputs of the compressed (default) or original earlier blocks.")
@click.option("--no-sequential", is_flag=True, help="Gather a block's statistics once, not stage by stage.")
@click.option("--seed", default=0, show_default=True, help="Seed for calibration sampling.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run (same arguments) from its last finished block, kept beside --out; "
                   "the output is byte-identical to an uninterrupted run's.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--json", "json_out", default=None, help="Also write the compression report as JSON ('-' = stdout).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--stream", is_flag=True,
              help="Larger than memory: read one block at a time from MODEL's safetensors shards and write it to "
                   "--out as it finishes (peak memory ~ one block + calibration activations); same output bytes.")
@click.option("--drop", type=click.IntRange(min=0), default=0,
              help="Depth pruning: remove this many units (see --drop-unit) before compressing the rest; "
                   "--method is then optional.")
@click.option("--drop-unit", type=click.Choice(["block", "attn", "mlp", "any"]), default="block", show_default=True,
              help="What --drop removes: whole blocks, attention or MLP sub-blocks, or any of them.")
@click.option("--drop-rule", type=click.Choice(["position", "score", "random"]), default="position",
              show_default=True, help="position: low KL damage and late blocks first, early blocks protected "
                                      "(HierarchicalPrune); score: lowest single-removal KL; random: seeded.")
@click.option("--recover-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="After removing, distill the later blocks against the original for this many steps "
                   "(needs --calib), before quantizing.")
@click.option("--plan", "plan_file", type=click.Path(), default=None,
              help="Apply a plan YAML written by `hiercomp search` (per-layer levels, removed sub-blocks).")
@click.option("--budget", default=None,
              help="Search a plan for this budget first (3.0bpw, 150KB, 300MiB, 0.25x), then compress with it.")
@click.option("--search", "search_kind", type=click.Choice(["uniform", "greedy", "evo"]), default="evo",
              show_default=True, help="With --budget: the allocator.")
@click.option("--levels", default=None, help="With --budget: candidate levels (see `hiercomp search --help`).")
@click.option("--generations", type=click.IntRange(min=0), default=None, help="With --search evo: generations.")
@click.option("--cache", "cache_dir", type=click.Path(), default=None,
              help="With --budget: candidate-layer cache folder (default ~/.cache/hiercomp/levels; "
                   "$HIERCOMP_CACHE moves the root).")
@cluster_options("the --budget search's fitness evaluations")
def compress(model: str, out: str, method: str | None, recipe: str | None, bits: int | None,
             group_size: int | None, symmetric: bool, act_order: bool, damp: float | None, sparsity: float | None,
             pattern: str | None, rank: int | None, extra_params: tuple[str, ...],
             calib: str | None, calib_field: str, calib_n: int | None, calib_len: int | None,
             propagate: str, no_sequential: bool, seed: int, force: bool, trust_remote_code: bool,
             json_out: str | None, quiet: bool, drop: int = 0, drop_unit: str = "block", drop_rule: str = "position",
             recover_steps: int = 0, plan_file: str | None = None, budget: str | None = None,
             search_kind: str = "evo", levels: str | None = None, generations: int | None = None,
             cache_dir: str | None = None, resume: bool = False, rotate: bool = False, tune_steps: int = 0,
             tune_lr: float = 1e-3, tune_codes: int = 0, tune_uncompressed: bool = False, tune_generated: int = 0,
             stream: bool = False, workers: int | None = None, ray_address: str | None = None,
             worker_threads: int | None = None) -> None:
    """Compress MODEL (a Hugging Face folder or hub id) and save it, packed, to --out.

    Say what to do with --method, --recipe, --plan FILE (from `hiercomp search`), or --budget (search, then compress).
    """
    from hiercomp.api import compress as run_compress
    from hiercomp.calibration import DEFAULT_NUM_SEQUENCES, CalibrationConfig
    from hiercomp.io.atomic import check_output_dir

    check_output_dir(out, force, protect=(model,))  # before any work; --force never replaces the input model

    recipe_obj = _recipe_from_options(method, recipe, bits, group_size, symmetric, act_order, damp, sparsity,
                                      pattern, rank, extra_params, rotate)
    if (plan_file or budget) and (recipe_obj is not None or drop):
        raise HiercompError("give one of --plan, --budget, --method/--recipe/--drop, not several")
    cluster = cluster_config(workers, ray_address, worker_threads)
    if cluster is not None and budget is None:
        raise HiercompError("--workers / --ray-address spread a --budget search's evaluations: add --budget, "
                            "or drop them")
    recovery = None
    if recover_steps:
        from hiercomp.depth import RecoveryConfig

        recovery = RecoveryConfig(steps=recover_steps, seed=seed)
    if tune_steps:
        from hiercomp.tune import TuneConfig

        tuning = TuneConfig(steps=tune_steps, lr=tune_lr, seed=seed, code_every=tune_codes,
                            uncompressed=tune_uncompressed, generated=tune_generated)
        recovery = [r for r in (recovery, tuning) if r is not None]
    elif tune_codes:
        raise HiercompError("--tune-codes re-chooses codes during recovery tuning: add --tune-steps N")
    elif tune_uncompressed or tune_generated:
        raise HiercompError("--tune-uncompressed and --tune-generated widen recovery tuning: add --tune-steps N")
    evo = None
    if budget is not None:
        from hiercomp.budget.evo import EvoConfig

        evo = EvoConfig(seed=seed) if generations is None else EvoConfig(generations=generations, seed=seed)
    calibration = None if calib is None else CalibrationConfig(calib, calib_n or DEFAULT_NUM_SEQUENCES, calib_len,
                                                                seed, calib_field)
    cm = run_compress(model, plan_file or recipe_obj, calibration, budget=budget, search=search_kind, levels=levels,
                      evo=evo, cache_dir=cache_dir, drop=drop, drop_unit=drop_unit, drop_rule=drop_rule,
                      recovery=recovery, seed=seed, out=out, force=force, propagate=propagate,
                      sequential=not no_sequential, progress=not quiet, trust_remote_code=trust_remote_code,
                      resume=resume, stream=stream, cluster=cluster)
    if budget is not None and cm.plan is not None:
        click.echo(f"plan ({search_kind}, {budget}): {cm.plan.cost['bits_per_weight']:.4f} bits per weight, "
                   f"{cm.plan.cost['size_bytes']:.0f} bytes, {cm.plan.fitness['metric']} "
                   f"{cm.plan.fitness['value']:.5f}")
    _print_summary(cm, out)
    if cm.extra.get("removed"):
        click.echo("removed: " + ", ".join(r["name"] for r in cm.extra["removed"]))
    write_json(cm.report.to_dict(), json_out)


def _recipe_from_options(method: str | None, recipe: str | None, bits: int | None, group_size: int | None,
                         symmetric: bool, act_order: bool, damp: float | None, sparsity: float | None,
                         pattern: str | None, rank: int | None = None, extra_params: tuple[str, ...] = (),
                         rotate: bool = False) -> Any:
    from hiercomp.methods import METHODS
    from hiercomp.recipe import Recipe

    if recipe is not None:
        if method is not None:
            raise HiercompError("give either --method or --recipe, not both")
        if rotate:
            raise HiercompError("--rotate goes with --method; in a recipe, write 'rotate: true' in a rule")
        return Recipe.load(recipe)
    if method is None:
        if rotate:
            raise HiercompError("--rotate needs --method (or 'rotate: true' in a recipe rule)")
        return None
    if rotate and method in METHODS:
        from hiercomp.methods.rotate import rotated_method_name

        method = rotated_method_name(method)  # gptq -> rot_gptq: the rotated variant takes the same options
    if method not in METHODS:
        raise HiercompError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    from dataclasses import fields

    accepted = {f.name for f in fields(METHODS[method])}
    given = {"bits": bits, "group_size": group_size, "symmetric": symmetric or None,
             "act_order": act_order or None, "damp": damp, "sparsity": sparsity, "pattern": pattern, "rank": rank}
    params = {k: v for k, v in given.items() if v is not None}
    params.update(_parse_params(extra_params))
    wrong = sorted(set(params) - accepted)
    if wrong:
        raise HiercompError(f"--{wrong[0].replace('_', '-')} does not apply to {method}; it takes: "
                            f"{', '.join('--' + a.replace('_', '-') for a in sorted(accepted))}")
    if params.get("group_size") == 0:
        params["group_size"] = None
    # (a value of the wrong type is left to make_method, which says what type it must be)
    if isinstance(params.get("bits"), (int, float)) and not 2 <= params["bits"] <= 8:
        raise HiercompError(f"--bits must be between 2 and 8, got {params['bits']}")
    if isinstance(params.get("group_size"), (int, float)) and params["group_size"] < 1:
        raise HiercompError("--group-size must be a positive integer (or 0 for per-channel), "
                            f"got {params['group_size']}")
    return Recipe.single(method, **params)


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """--param KEY=VALUE pairs; values are read as YAML scalars, so 40 is an int, 0.5 a float, true a bool."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HiercompError(f"--param takes KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return params


def _print_summary(cm: Any, out: str) -> None:
    from hiercomp.api import saved_size_bytes

    sizes = saved_size_bytes(out)
    click.echo(f"saved {out}: {len(cm.report.layers)} layers compressed, {cm.bits_per_weight:.3f} bits per weight "
               f"over them, weights file {fmt_bytes(sizes['size_bytes'])}, {cm.report.seconds:.1f} s")
