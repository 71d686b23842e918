"""Plans: the per-layer choice a search made, as YAML a person can read, edit and re-apply.

Example (``hiercomp search`` writes this; every key but ``layers`` is optional when writing one by hand)::

    hiercomp_plan: 1
    model: ../shared/data/models/stories260K/hf
    budget: 3.0bpw
    search: evo
    cost: {bits_per_weight: 2.9961, size_bytes: 163912, ratio_of_original: 0.1569}
    fitness: {metric: kl, value: 0.0412, tokens: 4096, evaluations: 1234, seconds: 81.2}
    layers:
      model.layers.0.self_attn.q_proj: {method: gptq, bits: 4, group_size: 32}
      model.layers.0.self_attn.k_proj: {method: gptq, bits: 3, group_size: 128}
      ...
    remove: [model.layers.4.mlp]       # attention / MLP sub-blocks dropped (names as hiercomp.depth lists them)
    history: [[0, 0.061], [1, 0.058], ...]   # [generation, fitness]

:meth:`Plan.to_recipe` turns it into an ordinary recipe with one exact-name rule per group of identically
compressed layers, so ``hiercomp compress MODEL --plan plan.yaml`` runs the normal *sequential* engine (each
block sees the already-compressed blocks' outputs). The search scored candidates computed from the original
model's activations, so the re-applied model's layers are not bit-identical to the searched ones (usually a
little better); their storage, and so the budget, is identical — it depends only on shapes and levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiercomp.budget.levels import Level
from hiercomp.errors import HiercompError
from hiercomp.recipe import Recipe, Rule

PLAN_VERSION = 1
_KEYS = {"hiercomp_plan", "model", "budget", "search", "cost", "fitness", "layers", "remove", "history", "notes"}


@dataclass
class Plan:
    layers: dict[str, Level]
    removed: list[str] = field(default_factory=list)
    budget: str | None = None
    search: str | None = None
    model: str | None = None
    cost: dict[str, float] = field(default_factory=dict)
    fitness: dict[str, Any] = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # anything else a search wants to keep (not re-read)

    # -- YAML --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hiercomp_plan": PLAN_VERSION}
        for key in ("model", "budget", "search"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.cost:
            out["cost"] = {k: _plain(v) for k, v in self.cost.items()}
        if self.fitness:
            out["fitness"] = {k: _plain(v) for k, v in self.fitness.items()}
        out["layers"] = {name: level.to_dict() for name, level in self.layers.items()}
        if self.removed:
            out["remove"] = list(self.removed)
        if self.history:
            out["history"] = [[_plain(v) for v in row] for row in self.history]
        if self.notes:
            out["notes"] = self.notes
        return out

    def to_yaml(self) -> str:
        # Flow style for the leaves: one line per layer, easy to scan and edit.
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise HiercompError(f"{source}: a plan needs a 'layers:' mapping of layer name -> "
                                "{method: ..., params} (see the README's 'Budgets and search')")
        unknown = set(data) - _KEYS
        if unknown:
            raise HiercompError(f"{source}: unknown plan key(s) {', '.join(sorted(unknown))}; "
                                f"use {', '.join(sorted(_KEYS))}")
        if data.get("hiercomp_plan", PLAN_VERSION) > PLAN_VERSION:
            raise HiercompError(f"{source}: plan version {data['hiercomp_plan']} is newer than this hiercomp "
                                f"reads ({PLAN_VERSION}); upgrade hiercomp")
        layers = {}
        for name, raw in data["layers"].items():
            if not isinstance(raw, dict) or "method" not in raw:
                raise HiercompError(f"{source}: layer {name} needs {{method: ..., <params>}}")
            try:
                layers[str(name)] = Level.from_dict(raw)
            except HiercompError as err:
                raise HiercompError(f"{source}: layer {name}: {err}") from None
        removed = data.get("remove") or []
        if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed):
            raise HiercompError(f"{source}: 'remove' must be a list of sub-block names")
        return cls(layers, list(removed), _str_or_none(data.get("budget")), data.get("search"), data.get("model"),
                   dict(data.get("cost") or {}), dict(data.get("fitness") or {}),
                   [list(row) for row in data.get("history") or []], dict(data.get("notes") or {}))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise HiercompError(f"plan file {path} does not exist; write one with `hiercomp search`")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise HiercompError(f"plan file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        return cls.from_dict(data, str(path))

    # -- to the engine -----------------------------------------------------------------------------
    def check(self, model: Any, source: str = "plan") -> None:
        """One-line error when the plan names layers this model does not have (a plan for another model)."""
        from hiercomp.hierarchy import walk

        known = {lin.name for lin in walk(model).linears}
        unknown = sorted(set(self.layers) - known)
        if unknown:
            raise HiercompError(f"{source} names {len(unknown)} layer(s) this model does not have, e.g. {unknown[0]}; "
                                "was it searched on another model?")

    def to_recipe(self) -> Recipe:
        """One rule per distinct level, aimed at its layers by exact name; removed sub-blocks as ``remove``."""
        gone = tuple(f"{name}." for name in self.removed)
        by_level: dict[Level, list[str]] = {}
        for name, level in self.layers.items():
            if not (name + ".").startswith(gone):
                by_level.setdefault(level, []).append(name)
        rules = tuple(Rule(level.make(), tuple(names)) for level, names in by_level.items())
        return Recipe(rules, (), tuple(self.removed))


def _plain(value: Any) -> Any:
    """Numbers as plain Python floats/ints (numpy or torch scalars do not belong in YAML)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return value


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
