"""Run task specs on a causal LM: ``{task: {metric: value, "n": questions, "truncated": prompts cut}}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hiercomp.errors import HiercompError
from hiercomp.eval.perplexity import model_context
from hiercomp.tasks import generation
from hiercomp.tasks.data import Example, load_examples
from hiercomp.tasks.multiple_choice import predictions, score_question
from hiercomp.tasks.spec import TaskSpec, resolve_spec

# Keys of a task's result that are counts, not metrics (verdicts skip them).
COUNT_KEYS = ("n", "truncated")
# The tasks the knowledge probes read (see hiercomp.tasks.probes.PROBES); ``--tasks probes`` runs them.
PROBE_TASKS = ("squad_closed_book", "nq_open", "squad")


def _multiple_choice(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, examples: list[Example],
                     max_length: int | None, progress: bool) -> dict[str, float | int]:
    hits = {"acc": 0, "acc_norm": 0}
    truncated = 0
    for example in tqdm(examples, desc=spec.name, disable=not progress, unit="q"):
        scores = score_question(model, tokenizer, example.context, example.choices, spec.target_delimiter,
                                max_length)
        pred, pred_norm = predictions(scores.loglikelihoods, example.choices)
        hits["acc"] += pred == example.gold
        hits["acc_norm"] += pred_norm == example.gold
        truncated += scores.truncated
    result: dict[str, float | int] = {m: hits[m] / len(examples) for m in spec.metrics}
    result.update(n=len(examples), truncated=truncated)
    return result


def _generation(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, examples: list[Example],
                max_length: int | None, progress: bool) -> dict[str, float | int]:
    sums = dict.fromkeys(spec.metrics, 0.0)
    truncated = 0
    for example in tqdm(examples, desc=spec.name, disable=not progress, unit="q"):
        completion, cut = generation.greedy_generate(model, tokenizer, example.context, spec.max_new_tokens,
                                                     spec.stop, max_length)
        truncated += cut
        for metric in spec.metrics:
            sums[metric] += generation.METRICS[metric](completion, example.answers, spec.normalise)
    result: dict[str, float | int] = {m: s / len(examples) for m, s in sums.items()}
    result.update(n=len(examples), truncated=truncated)
    return result


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    specs: list[TaskSpec | str | Path],
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float | int]]:
    """Score ``model`` on each task (a TaskSpec, a shipped name such as ``arc_easy``, or a spec YAML path;
    ``"probes"`` stands for the knowledge-probe tasks).

    ``limit`` keeps the first N questions of each task; ``seed`` overrides the specs' few-shot seeds. Every spec
    and its data are checked before any model work, so a bad spec fails fast. Deterministic: greedy decoding,
    no sampling, fixed order.
    """
    if tokenizer is None:
        raise HiercompError("tasks need the model's tokenizer; save the tokenizer files next to the model")
    # "probes" stands for the knowledge-probe tasks (closed-book, open-book, in-context retrieval).
    expanded = [t for s in specs for t in (PROBE_TASKS if isinstance(s, str) and s == "probes" else [s])]
    resolved = [resolve_spec(s) for s in expanded]
    names = [s.name for s in resolved]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise HiercompError(f"two tasks are named {duplicate!r}; give each spec its own name")
    prepared = [(spec, load_examples(spec, data_dir, limit, seed)) for spec in resolved]
    max_length = model_context(model)
    results: dict[str, dict[str, float | int]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for spec, examples in prepared:
                run = _multiple_choice if spec.kind == "multiple_choice" else _generation
                results[spec.name] = run(model, tokenizer, spec, examples, max_length, progress)
    finally:
        model.train(was_training)
    return results
