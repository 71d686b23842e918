"""Run lm-evaluation-harness on a model already in memory (packed compressed layers included, no dense copy).

The loaded model object is wrapped with lm_eval's ``HFLM(pretrained=model, tokenizer=tokenizer)``, so the
harness calls the compressed layers' own forward. ``include_path`` adds a folder of custom task YAMLs (a local
JSONL task works offline: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``); the harness's
own tasks download their data from the Hugging Face hub, which needs a network.

Results come back as ``{task: {metric: value, "n": questions}}`` like :func:`hiercomp.tasks.run_tasks`
(lm-eval's ``"acc,none"`` keys lose the filter suffix; standard errors are kept as ``acc_stderr``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from hiercomp.errors import HiercompError
from hiercomp.eval.perplexity import model_context

INSTALL_HINT = "pip install 'hiercomp[lm-eval]' (or pip install lm_eval)"


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is installed (not whether it imports: a broken install must fail loudly)."""
    return importlib.util.find_spec("lm_eval") is not None


def check_lm_eval(tasks: list[str] | str, include_path: str | Path | None = None) -> list[str]:
    """The task names, after checking what can be checked in a second: the harness and its Hugging Face
    backend import, there are names, the task folder exists. (Unknown names need the harness's task index.)"""
    if not lm_eval_available():
        raise HiercompError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:  # installed without what its Hugging Face backend needs (e.g. accelerate)
        raise HiercompError(f"lm-evaluation-harness is installed but cannot load its Hugging Face backend ({err}); "
                            f"{INSTALL_HINT}") from err
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if not names:
        raise HiercompError("--lm-eval needs task names, e.g. --lm-eval arc_easy,piqa")
    if include_path is not None and not Path(include_path).exists():
        raise HiercompError(f"lm-eval task folder {include_path} does not exist; pass a folder of task YAMLs")
    return names


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str] | str,
    include_path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    include_defaults: bool = True,
) -> dict[str, dict[str, float | int]]:
    """lm-eval results for ``tasks`` (names, or a comma-separated string) on the in-memory ``model``.

    ``include_defaults=False`` (with ``include_path``) indexes only the given folder, not the harness's
    thousands of built-in task YAMLs, which takes most of a small run's time.
    """
    names = check_lm_eval(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=None if include_path is None else str(include_path),
                          include_defaults=include_defaults or include_path is None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise HiercompError(f"lm-eval does not know the task {unknown[0]!r}; see `lm_eval --tasks list`, or give "
                            "a folder of task YAMLs with --lm-eval-include")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=model_context(model))
    output = lm_eval.simple_evaluate(model=wrapped, tasks=names, task_manager=manager, limit=limit,
                                     random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                     fewshot_random_seed=seed, log_samples=False, bootstrap_iters=0)
    if output is None:
        raise HiercompError("lm-eval returned no results (is this a distributed run's worker?)")
    return convert_results(output)


def convert_results(output: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """``{task: {metric: value, "n": count}}`` from lm-eval's ``simple_evaluate`` output."""
    counts = output.get("n-samples", {})
    out: dict[str, dict[str, float | int]] = {}
    for task, scores in output.get("results", {}).items():
        entry: dict[str, float | int] = {}
        for key, value in scores.items():
            metric = key.split(",")[0]
            if metric != "sample_len" and isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[metric] = float(value)
        n = counts.get(task, {})
        if isinstance(n, dict) and "effective" in n:
            entry["n"] = int(n["effective"])
        out[task] = entry
    return out
