"""Run task specs on a causal LM: ``{task: {metric: value, "n": questions, "truncated": prompts cut}}``."""

from __future__ import annotations

from dataclasses import dataclass
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

# Keys of a task's result that are not metrics (verdicts skip them): counts, and ``items`` = each question's
# score per metric ({metric: [score of question 0, ...]}), which the verdicts pair between two models.
COUNT_KEYS = ("n", "truncated", "items")
# The tasks the knowledge probes read (see hiercomp.tasks.probes.PROBES); ``--tasks probes`` runs them.
PROBE_TASKS = ("squad_closed_book", "nq_open", "squad")


def _multiple_choice(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, examples: list[Example],
                     max_length: int | None, progress: bool, desc: str) -> dict[str, Any]:
    items: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    truncated = 0
    for example in tqdm(examples, desc=desc, disable=not progress, unit="q"):
        scores = score_question(model, tokenizer, example.context, example.choices, spec.target_delimiter,
                                max_length)
        pred, pred_norm = predictions(scores.loglikelihoods, example.choices)
        items["acc"].append(float(pred == example.gold))
        items["acc_norm"].append(float(pred_norm == example.gold))
        truncated += scores.truncated
    return _summary(spec, items, truncated)


def _summary(spec: TaskSpec, items: dict[str, list[float]], truncated: int) -> dict[str, Any]:
    """Mean of each metric over the questions, the counts, and the per-question scores (for paired verdicts)."""
    result: dict[str, Any] = {m: sum(items[m]) / len(items[m]) for m in spec.metrics}
    result.update(n=len(items[spec.metrics[0]]), truncated=truncated, items={m: items[m] for m in spec.metrics})
    return result


def _generation(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, examples: list[Example],
                max_length: int | None, progress: bool, desc: str, question_after: bool = False) -> dict[str, Any]:
    items: dict[str, list[float]] = {m: [] for m in spec.metrics}
    truncated = 0
    for example in tqdm(examples, desc=desc, disable=not progress, unit="q"):
        completion, cut = generation.greedy_generate(model, tokenizer, example.context, spec.max_new_tokens,
                                                     spec.stop, max_length,
                                                     split_at=example.question_at if question_after else None)
        truncated += cut
        for metric in spec.metrics:
            items[metric].append(float(generation.METRICS[metric](completion, example.answers, spec.normalise)))
    return _summary(spec, items, truncated)


@dataclass(frozen=True)
class PreparedTask:
    """A resolved spec with its examples read and checked: what a run needs, obtained before any model work."""

    spec: TaskSpec
    examples: list[Example]


def prepare_tasks(
    specs: list[TaskSpec | str | Path | PreparedTask],
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | Path | None = None,
) -> list[PreparedTask]:
    """Resolve every spec and read its data (``"probes"`` stands for the knowledge-probe tasks).

    Every spec and data mistake (unknown task, missing data file, a row that does not fit) is raised here, so a
    caller can check all its tasks before minutes of other work. Already prepared tasks pass through unchanged.
    """
    expanded = [t for s in specs for t in (PROBE_TASKS if isinstance(s, str) and s == "probes" else [s])]
    resolved = [s if isinstance(s, PreparedTask) else resolve_spec(s) for s in expanded]
    names = [s.spec.name if isinstance(s, PreparedTask) else s.name for s in resolved]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise HiercompError(f"two tasks are named {duplicate!r}; give each spec its own name")
    return [s if isinstance(s, PreparedTask) else PreparedTask(s, load_examples(s, data_dir, limit, seed))
            for s in resolved]


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    specs: list[TaskSpec | str | Path | PreparedTask],
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    label: str | None = None,
    question_after_passage: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on each task (a TaskSpec, a shipped name such as ``arc_easy``, a spec YAML path, or a
    :class:`PreparedTask`; ``"probes"`` stands for the knowledge-probe tasks).

    ``limit`` keeps the first N questions of each task; ``seed`` overrides the specs' few-shot seeds. Every spec
    and its data are checked before any model work, so a bad spec fails fast. Deterministic: greedy decoding,
    no sampling, fixed order. ``label`` names the model on the progress bars ("original: piqa").
    ``question_after_passage``: generation tasks with a passage read it in a forward of its own, then the question
    through the cache it left (see :func:`hiercomp.tasks.generation.greedy_generate`); for a compressed KV cache.
    """
    if tokenizer is None:
        raise HiercompError("tasks need the model's tokenizer; save the tokenizer files next to the model")
    prepared = prepare_tasks(specs, limit, seed, data_dir)
    max_length = model_context(model)
    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for task in prepared:
                desc = task.spec.name if label is None else f"{label}: {task.spec.name}"
                if task.spec.kind == "multiple_choice":
                    results[task.spec.name] = _multiple_choice(model, tokenizer, task.spec, task.examples,
                                                               max_length, progress, desc)
                else:
                    results[task.spec.name] = _generation(model, tokenizer, task.spec, task.examples, max_length,
                                                          progress, desc, question_after_passage)
    finally:
        model.train(was_training)
    return results
