"""Task specs: a small YAML file says where a task's data is and how to turn a row into a prompt and an answer.

Format (see the README, "Tasks and knowledge probes", for a worked example)::

    name: piqa                         # required: the task's name in results
    kind: multiple_choice              # required: multiple_choice | generation
    data: piqa_validation.jsonl        # required: JSONL file, relative to the data directory (or absolute)
    template: "Question: {goal}\\nAnswer:"   # required: Python str.format template over the row's fields
    choices: {fields: [sol1, sol2]}    # multiple_choice: {fields: [...]}, {field: NAME}, or {values: [...]}
    gold: label                        # multiple_choice: field holding the gold choice (index, bool or text)
    gold_labels: choices.label         # optional: field with labels; gold is then looked up among them
    answers: answers                   # generation: field holding the gold answer (string or list of strings)
    metrics: [acc, acc_norm]           # optional; defaults by kind
    fewshot: 0                         # optional: number of solved examples put before each prompt
    fewshot_seed: 1234                 # optional: seed for drawing them (other rows of the same file)
    fewshot_separator: "\\n\\n"        # optional
    target_delimiter: " "              # optional: put between the prompt and each choice / few-shot answer
    max_new_tokens: 32                 # generation: greedy decoding stops after this many tokens
    stop: ["\\n"]                      # generation: the completion is cut at the first of these strings
    normalise: squad                   # generation: squad | lower | none (how answers are compared)
    maps:                              # optional derived fields, looked up from another field's value
      connector: {field: question, values: {cause: "because", effect: "so"}}

Templates are Python ``str.format`` strings: ``{field}``, ``{field[key]}`` or ``{field.attr}`` for nested values,
``{{`` and ``}}`` for literal braces. Dotted names in ``choices.field``, ``gold``, ``gold_labels`` and ``answers``
(``choices.text``) walk into nested objects.

Every mistake is reported as one line ``SPEC_FILE:LINE: what is wrong; what to do``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiercomp.errors import HiercompError

KINDS = ("multiple_choice", "generation")
MC_METRICS = ("acc", "acc_norm")
GEN_METRICS = ("exact_match", "f1", "contains")
NORMALISERS = ("squad", "lower", "none")
REQUIRED = ("name", "kind", "data", "template")
KNOWN_KEYS = {"name", "kind", "data", "template", "choices", "gold", "gold_labels", "answers", "metrics", "fewshot",
              "fewshot_seed", "fewshot_separator", "target_delimiter", "max_new_tokens", "stop", "normalise",
              "maps", "description"}
SPECS_DIR = Path(__file__).resolve().parent / "specs"


class TaskSpecError(HiercompError):
    """A task spec (or the data it names) is wrong; the message names the spec file and line."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    data: str
    template: str
    choices: tuple[str, Any] | None = None  # ("fields", [names]) | ("field", name) | ("values", [strings])
    gold: str | None = None
    gold_labels: str | None = None
    answers: str | None = None
    metrics: tuple[str, ...] = ()
    fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_separator: str = "\n\n"
    target_delimiter: str = " "
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    normalise: str = "squad"
    maps: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()  # (new field, source field, value pairs)
    description: str = ""
    # Where the spec came from, for error messages: file and the line of each key (not part of equality).
    source: str = field(default="<spec>", compare=False)
    lines: tuple[tuple[str, int], ...] = field(default=(), compare=False, repr=False)

    def line_of(self, key: str) -> int:
        """1-based line of ``key`` (dotted for nested keys) in the spec file; 1 when unknown."""
        table = dict(self.lines)
        return table.get(key, table.get(key.split(".")[0], 1))

    def error(self, key: str, message: str) -> TaskSpecError:
        return TaskSpecError(f"{self.source}:{self.line_of(key)}: {message}")

    def template_fields(self) -> list[str]:
        """Top-level row fields the template names (``{a[b]}`` and ``{a.b}`` name ``a``)."""
        return template_fields(self.template)

    def map_lookup(self) -> dict[str, tuple[str, dict[str, str]]]:
        return {new: (src, dict(pairs)) for new, src, pairs in self.maps}


def template_fields(template: str) -> list[str]:
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        root = name.split(".")[0].split("[")[0]
        if not root or root.isdigit():
            raise ValueError("positional fields ({} or {0}) are not allowed; name a row field such as {question}")
        names.append(root)
    return names


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def load_spec(path: str | Path) -> TaskSpec:
    """Read and check a spec file (structure only; :func:`hiercomp.tasks.data.load_examples` checks the data)."""
    path = Path(path)
    if not path.is_file():
        raise TaskSpecError(f"task spec {path} does not exist; pass a YAML file or a shipped task name "
                            f"({', '.join(shipped_names())})")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TaskSpecError(f"{path}:{line}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{path}:1: a task spec is a YAML mapping (name:, kind:, data:, template:, ...)")
    return spec_from_dict(raw, str(path), _key_lines(node))


def spec_from_dict(raw: dict[str, Any], source: str = "<spec>", lines: dict[str, int] | None = None) -> TaskSpec:
    lines = lines or {}

    def fail(key: str, message: str) -> TaskSpecError:
        return TaskSpecError(f"{source}:{lines.get(key, 1)}: {message}")

    for key in REQUIRED:
        if key not in raw or raw[key] in (None, ""):
            raise fail(key, f"missing field '{key}'; every spec needs {', '.join(REQUIRED)}")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown field '{unknown[0]}'; known fields: {', '.join(sorted(KNOWN_KEYS))}")
    kind = raw["kind"]
    if kind not in KINDS:
        raise fail("kind", f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    for key in ("name", "data", "template"):
        if not isinstance(raw[key], str):
            raise fail(key, f"'{key}' must be a string (got {type(raw[key]).__name__})")
    try:
        template_fields(raw["template"])
    except ValueError as e:
        raise fail("template", f"bad template: {e}") from None

    choices = None
    if kind == "multiple_choice":
        for key in ("choices", "gold"):
            if raw.get(key) is None:
                raise fail(key, f"missing field '{key}'; a multiple_choice spec needs choices: and gold:")
        choices = _parse_choices(raw["choices"], lambda m: fail("choices", m))
        if not isinstance(raw["gold"], str):
            raise fail("gold", "'gold' names the row field holding the gold choice (a string)")
    else:
        if not isinstance(raw.get("answers"), str):
            raise fail("answers", "missing field 'answers'; a generation spec names the row field with the "
                       "gold answer(s)")

    allowed = MC_METRICS if kind == "multiple_choice" else GEN_METRICS
    metrics = raw.get("metrics", list(allowed))
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics:
        raise fail("metrics", f"'metrics' is a list drawn from {', '.join(allowed)}")
    for metric in metrics:
        if metric not in allowed:
            raise fail("metrics", f"metric {metric!r} does not apply to {kind}; choose from {', '.join(allowed)}")

    ints = {}
    for key, default, low in (("fewshot", 0, 0), ("fewshot_seed", 1234, None), ("max_new_tokens", 32, 1)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            raise fail(key, f"'{key}' must be an integer{'' if low is None else f' >= {low}'} (got {value!r})")
        ints[key] = value
    strings = {}
    for key, default in (("fewshot_separator", "\n\n"), ("target_delimiter", " "), ("description", "")):
        value = raw.get(key, default)
        if not isinstance(value, str):
            raise fail(key, f"'{key}' must be a string (got {value!r})")
        strings[key] = value
    stop = raw.get("stop", ["\n"])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise fail("stop", "'stop' is a list of non-empty strings (the completion is cut at the first one)")
    normalise = raw.get("normalise", "squad")
    if normalise not in NORMALISERS:
        raise fail("normalise", f"'normalise' must be one of {', '.join(NORMALISERS)} (got {normalise!r})")
    for key in ("gold_labels",):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise fail(key, f"'{key}' names a row field (a string)")

    return TaskSpec(
        name=raw["name"], kind=kind, data=raw["data"], template=raw["template"], choices=choices,
        gold=raw.get("gold"), gold_labels=raw.get("gold_labels"), answers=raw.get("answers"),
        metrics=tuple(metrics), fewshot=ints["fewshot"], fewshot_seed=ints["fewshot_seed"],
        fewshot_separator=strings["fewshot_separator"], target_delimiter=strings["target_delimiter"],
        max_new_tokens=ints["max_new_tokens"], stop=tuple(stop), normalise=normalise,
        maps=_parse_maps(raw.get("maps"), lambda m: fail("maps", m)), description=strings["description"],
        source=source, lines=tuple(sorted(lines.items())),
    )


def _parse_choices(value: Any, fail: Any) -> tuple[str, Any]:
    hint = "choices is one of {fields: [a, b]}, {field: name} or {values: [\"no\", \"yes\"]}"
    if not isinstance(value, dict) or len(value) != 1:
        raise fail(hint)
    (how, what), = value.items()
    if how == "field" and isinstance(what, str):
        return ("field", what)
    if how in ("fields", "values") and isinstance(what, list) and len(what) >= 2 and all(
            isinstance(w, str) for w in what):
        return (how, tuple(what))
    raise fail(hint + " (lists need at least two strings)")


def _parse_maps(value: Any, fail: Any) -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
    if value is None:
        return ()
    hint = "maps is {new_field: {field: source_field, values: {source_value: text, ...}}, ...}"
    if not isinstance(value, dict):
        raise fail(hint)
    out = []
    for new, entry in value.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("field"), str)
                and isinstance(entry.get("values"), dict)):
            raise fail(hint)
        pairs = tuple((str(k), str(v)) for k, v in entry["values"].items())
        out.append((str(new), entry["field"], pairs))
    return tuple(out)


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def resolve_spec(spec_or_name: TaskSpec | str | Path) -> TaskSpec:
    """A TaskSpec as is, a shipped task name (``arc_easy``), or a path to a spec YAML."""
    if isinstance(spec_or_name, TaskSpec):
        return spec_or_name
    text = str(spec_or_name)
    shipped = SPECS_DIR / f"{text}.yaml"
    if "/" not in text and not text.endswith((".yaml", ".yml")) and shipped.is_file():
        return load_spec(shipped)
    if Path(text).is_file():
        return load_spec(text)
    raise TaskSpecError(f"unknown task {text!r}: not a spec file, nor a shipped task ({', '.join(shipped_names())})")
