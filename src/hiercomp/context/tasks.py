"""Compress each example's context before a task runs: ``hiercomp eval MODEL --tasks squad --context SPEC``.

``SPEC`` is ``METHOD:key=value,...``, e.g. ``tokens:budget=0.25x`` or
``sentences:budget=0.25x,threshold=0.3``. Keys: ``budget`` (required: ``0.25x`` or a token count), ``scorer``
(a causal LM folder; default: the evaluated model itself), ``question_weight``, ``threshold``, ``ranker``
(embedding | likelihood), ``segment_tokens``, ``seed``, ``coarse`` (cascade: how many times the budget the
sentences cover before token pruning), ``field`` (the row field compressed, default
``context``) and ``question`` (the row field holding the question, default ``question``; ``none`` for none).
The budget counts the evaluated model's tokens of the field alone; the template is filled after compression,
so titles, questions and instructions are never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hiercomp.context.build import METHODS, build_compressor
from hiercomp.context.result import parse_token_budget
from hiercomp.errors import HiercompError
from hiercomp.tasks.data import Example, RowRenderer, data_path, read_rows
from hiercomp.tasks.spec import TaskSpec, resolve_spec

KEYS = ("budget", "scorer", "question_weight", "threshold", "ranker", "segment_tokens", "seed", "coarse", "field",
        "question")

# Keys read as numbers, with their smallest sensible value: checked when the option is parsed, before any model work.
NUMERIC_KEYS: dict[str, tuple[type, float]] = {"question_weight": (float, 0.0), "segment_tokens": (int, 1),
                                               "seed": (int, 0), "coarse": (float, 1.0)}


@dataclass(frozen=True)
class ContextOption:
    method: str
    budget: str
    options: tuple[tuple[str, str], ...] = field(default=())

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def parse_context_option(text: str) -> ContextOption:
    """``"tokens:budget=0.25x,scorer=PATH"`` -> ContextOption (one-line errors)."""
    method, _, rest = text.partition(":")
    method = method.strip()
    if method not in METHODS:
        raise HiercompError(f"--context {text!r}: unknown method {method!r}; write METHOD:budget=0.25x with METHOD "
                            f"one of {', '.join(METHODS)}")
    pairs = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in KEYS:
            raise HiercompError(f"--context {text!r}: cannot read {item!r}; keys are {', '.join(KEYS)} "
                                "(key=value, comma-separated)")
        pairs.append((key.strip(), value.strip()))
    options = dict(pairs)
    for key, (kind, least) in NUMERIC_KEYS.items():
        if key in options:
            try:
                number = kind(options[key])
            except ValueError:
                number = None
            if number is None or number < least:
                raise HiercompError(f"--context {text!r}: {key} must be a number of at least {least} "
                                    f"(got {options[key]!r})")
    if "budget" not in options:
        raise HiercompError(f"--context {text!r} needs a budget, e.g. {method}:budget=0.25x")
    parse_token_budget(options["budget"])  # fail before any model work
    return ContextOption(method, options.pop("budget"), tuple(sorted(options.items())))


def compressor_for(option: ContextOption, model: Any, tokenizer: Any) -> Any:
    """The compressor an option names; the evaluated model scores and its tokenizer counts by default."""
    from hiercomp.context.scorer import as_scorer

    scorer_ref = option.get("scorer")
    scorer = as_scorer(scorer_ref) if scorer_ref else as_scorer(model, tokenizer)
    threshold, coarse = option.get("threshold"), option.get("coarse")
    return build_compressor(option.method, target=tokenizer, scorer=scorer,
                            question_weight=float(option.get("question_weight", 1.0)),
                            threshold=None if threshold is None else float(threshold),
                            ranker=option.get("ranker", "embedding"),
                            segment_tokens=int(option.get("segment_tokens", 64)), seed=int(option.get("seed", 0)),
                            coarse_factor=None if coarse is None else float(coarse))


def check_context_task(spec: TaskSpec, option: ContextOption) -> None:
    """One-line error unless ``spec`` is a zero-shot generation task whose template has the option's passage field
    (checked before any model work)."""
    if spec.kind != "generation" or spec.fewshot:
        raise HiercompError(f"--context compresses the passage of zero-shot generation tasks; {spec.name} is "
                            f"{spec.kind} with {spec.fewshot} shots")
    context_field = option.get("field", "context")
    if context_field not in spec.template_fields():
        raise HiercompError(f"task {spec.name} has no {{{context_field}}} in its template (no passage to compress); "
                            "name the passage field with --context METHOD:budget=...,field=NAME")


def compressed_examples(spec: TaskSpec | str | Path, option: ContextOption | str, model: Any, tokenizer: Any,
                        data_dir: str | Path | None = None, limit: int | None = None, progress: bool = True,
                        compressor: Any = None) -> tuple[list[Example], dict[str, Any]]:
    """The task's examples with each row's context field compressed, and what it cost.

    Returns ``(examples, stats)``: ``stats`` holds n, the mean requested and achieved ratio (in the model's
    tokens of the field), how many met the budget exactly, how many came back empty (selective methods), and the
    compression seconds. Zero-shot tasks only (a few-shot prompt would mix compressed and full passages).
    """
    spec = resolve_spec(spec)
    option = parse_context_option(option) if isinstance(option, str) else option
    check_context_task(spec, option)
    context_field, question_field = option.get("field", "context"), option.get("question", "question")
    path = data_path(spec, data_dir)
    rows = read_rows(spec, path)
    rows = rows if limit is None else rows[:limit]
    renderer = RowRenderer(spec, path)
    compressor = compressor if compressor is not None else compressor_for(option, model, tokenizer)
    examples, ratios, exact, empty, seconds = [], [], 0, 0, 0.0
    for number, row in enumerate(tqdm(rows, desc=f"compress {spec.name}", disable=not progress, unit="q"),
                                 start=1):
        text = row.get(context_field)
        if not isinstance(text, str):
            raise renderer.fail("template", number, f"field '{context_field}' is not a string")
        question = None if question_field == "none" else row.get(question_field)
        start = time.perf_counter()
        result = compressor(text, question=question, budget=option.budget)
        seconds += time.perf_counter() - start
        ratios.append(result.ratio)
        exact += result.kept_tokens == result.budget_tokens
        empty += not result.text
        examples.append(renderer.solved({**row, context_field: result.text}, number)[1])
    stats = {"n": len(rows), "method": option.method, "budget": option.budget,
             "achieved_ratio": sum(ratios) / len(ratios), "exact": exact, "empty": empty,
             "compress_seconds": seconds}
    return examples, stats
