"""A task's data: find its JSONL file, check every row against the spec, render prompts (with few-shot examples).

Where the data file is looked for, first hit wins:

1. ``data`` is an absolute path;
2. the data directory: the ``data_dir`` argument (``--data-dir``), else the ``HIERCOMP_DATA_DIR`` environment
   variable;
3. the folder of the spec file itself (a user's spec can sit beside its data).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hiercomp.tasks.spec import TaskSpec, TaskSpecError

DATA_DIR_ENV = "HIERCOMP_DATA_DIR"
PASSAGE_FIELD = "context"  # the template field holding an open-book task's passage (squad's, --context's default)


@dataclass(frozen=True)
class Example:
    """One rendered question: the prompt (few-shot examples included), and its gold answer(s)."""

    index: int  # row number in the data file, 0-based
    context: str
    choices: tuple[str, ...] = ()  # multiple choice: the continuations' texts (without the delimiter)
    gold: int = -1  # multiple choice: index into choices
    answers: tuple[str, ...] = ()  # generation: every accepted answer
    # Zero-shot prompts with a passage ({context} in the template): where the text after the passage (the
    # question) starts, so a compressed KV cache can hold the passage before the question is read (kvpress's
    # question-agnostic protocol). None when the template has no passage.
    question_at: int | None = None


def default_data_dir(data_dir: str | Path | None = None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


def data_path(spec: TaskSpec, data_dir: str | Path | None = None) -> Path:
    candidates = []
    if Path(spec.data).is_absolute():
        candidates.append(Path(spec.data))
    else:
        base = default_data_dir(data_dir)
        if base is not None:
            candidates.append(base / spec.data)
        if spec.source != "<spec>":
            candidates.append(Path(spec.source).parent / spec.data)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere (no data directory given)"
    raise spec.error("data", f"data file {spec.data} of task {spec.name} not found (looked in {looked}); pass "
                     f"--data-dir DIR or set {DATA_DIR_ENV}")


def read_rows(spec: TaskSpec, path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise spec.error("data", f"{path} row {number} is not JSON ({e.msg}); the data file is JSONL, one "
                                 "object per line") from None
            if not isinstance(row, dict):
                raise spec.error("data", f"{path} row {number} is not a JSON object")
            rows.append(row)
    if not rows:
        raise spec.error("data", f"data file {path} holds no rows")
    return rows


def lookup(row: dict[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; KeyError names the missing part."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


class RowRenderer:
    """Turns rows into prompts and answers for one spec; every failure names the spec line and the data row."""

    def __init__(self, spec: TaskSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self.maps = spec.map_lookup()

    def fail(self, key: str, number: int, message: str) -> TaskSpecError:
        return self.spec.error(key, f"row {number} of {self.path}: {message}")

    def fields(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        values = dict(row)
        for new, (source, table) in self.maps.items():
            if source not in row:
                raise self.fail("maps", number, f"has no field '{source}' that maps.{new} reads")
            key = str(row[source])
            if key not in table:
                raise self.fail("maps", number, f"value {key!r} of '{source}' is not in maps.{new}.values")
            values[new] = table[key]
        return values

    def prompt(self, row: dict[str, Any], number: int) -> str:
        values = self.fields(row, number)
        for name in self.spec.template_fields():
            if name not in values:
                known = ", ".join(sorted(values))
                raise self.fail("template", number, f"template names field '{name}', which the row lacks "
                                f"(fields: {known})")
        try:
            return self.spec.template.format(**values)
        except (KeyError, IndexError, AttributeError, ValueError) as e:
            raise self.fail("template", number, f"the template cannot be filled ({type(e).__name__}: {e})") from None

    def choices(self, row: dict[str, Any], number: int) -> tuple[str, ...]:
        how, what = self.spec.choices  # type: ignore[misc]
        if how == "values":
            return tuple(what)
        names = [what] if how == "field" else list(what)
        try:
            found = [lookup(row, n) for n in names]
        except KeyError as e:
            raise self.fail("choices", number, f"has no field '{e.args[0]}' named by choices") from None
        texts = found[0] if how == "field" else found
        if not isinstance(texts, list) or len(texts) < 2 or not all(isinstance(t, str) for t in texts):
            raise self.fail("choices", number, "choices must be at least two strings")
        return tuple(texts)

    def gold(self, row: dict[str, Any], number: int, choices: tuple[str, ...]) -> int:
        spec = self.spec
        try:
            value = lookup(row, spec.gold)  # type: ignore[arg-type]
        except KeyError:
            raise self.fail("gold", number, f"has no gold field '{spec.gold}'") from None
        if spec.gold_labels is not None:
            try:
                labels = lookup(row, spec.gold_labels)
            except KeyError:
                raise self.fail("gold_labels", number, f"has no field '{spec.gold_labels}'") from None
            if not isinstance(labels, list) or value not in labels:
                raise self.fail("gold", number, f"gold answer {value!r} is not among the labels {labels!r}")
            value = labels.index(value)
        if isinstance(value, bool):  # a yes/no answer indexes choices like [no, yes]
            value = int(value)
        if isinstance(value, int):
            if not 0 <= value < len(choices):
                raise self.fail("gold", number, f"gold answer {value} is not among its {len(choices)} choices "
                                "(0-based index)")
            return value
        if isinstance(value, str) and value in choices:
            return choices.index(value)
        raise self.fail("gold", number, f"gold answer {value!r} is not among its choices {list(choices)!r}")

    def answers(self, row: dict[str, Any], number: int) -> tuple[str, ...]:
        try:
            value = lookup(row, self.spec.answers)  # type: ignore[arg-type]
        except KeyError:
            raise self.fail("answers", number, f"has no answers field '{self.spec.answers}'") from None
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise self.fail("answers", number, "answers must be a string or a non-empty list of strings")
        return tuple(values)

    def solved(self, row: dict[str, Any], number: int) -> tuple[str, Example]:
        """The row's prompt and its example (no few-shot)."""
        prompt = self.prompt(row, number)
        if self.spec.kind == "multiple_choice":
            choices = self.choices(row, number)
            return prompt, Example(number - 1, prompt, choices=choices, gold=self.gold(row, number, choices))
        return prompt, Example(number - 1, prompt, answers=self.answers(row, number),
                               question_at=self.passage_end(row, number, prompt))

    def passage_end(self, row: dict[str, Any], number: int, prompt: str) -> int | None:
        """Character offset in ``prompt`` just after the rendered ``{context}`` field (the passage), or None."""
        head, marker, _ = self.spec.template.partition("{" + PASSAGE_FIELD + "}")
        if not marker:
            return None
        values = self.fields(row, number)
        try:
            prefix = head.format(**values) + str(values[PASSAGE_FIELD])
        except (KeyError, IndexError, AttributeError, ValueError):
            return None
        return len(prefix) if prompt.startswith(prefix) and len(prefix) < len(prompt) else None


def load_examples(spec: TaskSpec, data_dir: str | Path | None = None, limit: int | None = None,
                  seed: int | None = None) -> list[Example]:
    """Every row checked against the spec, then the first ``limit`` rendered (few-shot drawn with the seed).

    Few-shot examples are drawn for each question from the *other* rows of the same file (the files here are
    evaluation splits; there is no train split), with ``random.Random(f"{seed}:{row}")`` so a question's
    examples do not depend on ``limit``. ``seed`` overrides the spec's ``fewshot_seed``.
    """
    if limit is not None and limit < 1:
        raise spec.error("name", f"limit must be at least 1 (got {limit})")
    path = data_path(spec, data_dir)
    rows = read_rows(spec, path)
    renderer = RowRenderer(spec, path)
    solved = [renderer.solved(row, number) for number, row in enumerate(rows, start=1)]
    chosen = solved if limit is None else solved[:limit]
    if spec.fewshot == 0:
        return [example for _, example in chosen]
    if spec.fewshot >= len(rows):
        raise spec.error("fewshot", f"fewshot {spec.fewshot} needs more rows than the {len(rows)} in {path}")
    base_seed = spec.fewshot_seed if seed is None else seed
    out = []
    for _, example in chosen:
        rng = random.Random(f"{base_seed}:{example.index}")
        others = rng.sample([i for i in range(len(rows)) if i != example.index], spec.fewshot)
        shots = [solved[i][0] + spec.target_delimiter + _answer_text(solved[i][1]) for i in others]
        context = spec.fewshot_separator.join([*shots, example.context])
        out.append(Example(example.index, context, example.choices, example.gold, example.answers))
    return out


def _answer_text(example: Example) -> str:
    return example.choices[example.gold] if example.choices else example.answers[0]
