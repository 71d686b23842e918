"""Evaluation sweeps over many variants: `hiercomp eval A B C` and `hiercomp report DIRS`, spread over workers.

Each variant's evaluation is independent of the others, so an :class:`~hiercomp.distributed.Executor` runs one per
worker and the results come back in the given order. Workers compute with this process's torch thread count by
default, so the numbers are those of the one-by-one run. Files are read by each worker from the paths given
(a shared path on a multi-node cluster); what is written (the report's evaluation cache) is written here.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

from hiercomp.distributed import Executor


def _evaluate_one(kwargs: dict[str, Any], budget: str | None, model: str) -> dict[str, Any]:
    from hiercomp.evaluation import evaluate

    target: Any = model
    if budget is not None:
        from hiercomp.api import load

        target = load(model, budget=budget)  # size_bytes is then the loaded size
    result = evaluate(target, **kwargs)
    if budget is not None:
        result.update(model=model, budget=budget, loaded=target.extra["loaded"])
    return result


def evaluate_models(models: list[str], executor: Executor, *, budget: str | None = None,
                    **kwargs: Any) -> list[dict[str, Any]]:
    """``evaluate(model, **kwargs)`` for every model (``load(model, budget=...)`` first with ``budget``), in order."""
    if type(executor) is not Executor:
        kwargs["progress"] = False  # workers' bars would interleave (and Ray does not forward them)
    return executor.map(functools.partial(_evaluate_one, kwargs, budget), models)


def _report_eval(options: Any, with_reference: bool, reference_scores: dict[str, Any] | None,
                 model: str) -> dict[str, Any]:
    from hiercomp.report.collect import evaluate_cached

    return evaluate_cached(model, options, with_reference=with_reference, cache_dir=None, progress=False,
                           reference_scores=reference_scores)


def measure_report_variants(dirs: list[str], options: Any, executor: Executor, *, cache_dir: Path,
                            from_json: list[str] = (), refresh: bool = False, progress: bool = True) -> int:
    """Fill the report's evaluation cache for every folder it would measure, the folders spread over the executor
    (the original first, here: each variant's verdicts read its numbers). The report then only reads the cache.
    Returns how many variants were measured."""
    from hiercomp.report.collect import _same_path, cache_key, evaluate_cached, load_eval_json
    from hiercomp.report.files import write_text_atomic

    if not options.wanted:
        return 0
    given = [load_eval_json(p).get("model") for p in from_json]
    with_reference = options.reference is not None
    todo = []
    for path in dirs:
        entry = cache_dir / f"eval-{cache_key(path, options, with_reference)}.json"
        if not any(_same_path(model, path) for model in given) and (refresh or not entry.is_file()) \
                and path not in [p for p, _ in todo]:
            todo.append((path, entry))
    if not todo:
        return 0
    original = None
    if with_reference:
        if progress:
            print(f"report: measuring the original {options.reference}", file=sys.stderr)
        original = evaluate_cached(options.reference, options, with_reference=False, cache_dir=cache_dir,
                                   refresh=refresh, progress=progress)
    if progress:
        print(f"report: measuring {len(todo)} variants on {executor.describe()}", file=sys.stderr)
    results = executor.map(functools.partial(_report_eval, options, with_reference, original),
                           [path for path, _ in todo])
    kwargs = options.evaluate_kwargs(with_reference)  # what evaluate_cached records beside the result
    for (path, entry), result in zip(todo, results):
        write_text_atomic(entry, json.dumps({"model": str(path), "options": kwargs, "result": result},
                                            indent=1, default=float))
    return len(todo)
