"""The Plan: what happens to every node of the model — layer name -> method config, plus removed sub-blocks.

One type for one idea. A recipe (patterns, see :mod:`hiercomp.recipe`) *resolves* to a Plan against a model;
the budget search *produces* a Plan; the engine *executes* a Plan; a saved folder keeps the Plan it was made
with as ``plan.yaml``. YAML round-trips (``hiercomp search`` writes it; every key but ``layers`` is optional when
writing one by hand)::

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
    kv: snapkv:ratio=0.5+kivi:bits=2   # the KV-cache spec to run with (hiercomp.kv), when there is one
    memory: {memory_bytes: 1000000000, context: 8192, batch: 4, weights_bytes: ..., kv_bytes: ..., ...}
                                       # the split `hiercomp plan-memory` chose (hiercomp.budget.memory)
    history: [[0, 0.061], [1, 0.058], ...]   # [generation, fitness]

A searched plan scored candidates computed from the original model's activations; executing it runs the normal
*sequential* engine (each block sees the already-compressed blocks' outputs), so the applied layers are not
bit-identical to the searched ones (usually a little better); their storage, and so the budget, is identical —
it depends only on shapes and configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiercomp.errors import HiercompError
from hiercomp.hierarchy import walk
from hiercomp.io.yamlfile import load_yaml
from hiercomp.methods import Method, make_method

PLAN_VERSION = 1
_KEYS = {"hiercomp_plan", "model", "budget", "search", "cost", "fitness", "layers", "remove", "kv", "memory",
         "history", "notes"}


@dataclass(frozen=True)
class MethodConfig:
    """One way to compress a layer: a registered method's name and its parameters (the rest at its defaults).

    Hashable, so identical configs compare equal (the search's candidate levels are MethodConfigs too)."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return ":".join([self.method] + [f"{k}={'channel' if v is None and k == 'group_size' else v}"
                                         for k, v in self.params])

    def make(self) -> Method:
        return make_method(self.method, **dict(self.params))

    def full_params(self) -> dict[str, Any]:
        """Every parameter, defaults included, and the method's algorithm version: what a cache key must hold,
        so a changed default or algorithm never reuses stale results."""
        method = self.make()
        return {"method": self.method, "version": type(method).version, **method.params()}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], validate: bool = True) -> MethodConfig:
        params = {k: v for k, v in data.items() if k != "method"}
        config = cls(str(data["method"]), tuple(sorted(params.items())))
        if validate:
            config.make()  # validates the method and its parameters (one-line errors)
        return config

    @classmethod
    def of(cls, method: Method) -> MethodConfig:
        return cls(method.name, tuple(sorted(method.params().items())))


@dataclass
class Plan:
    layers: dict[str, MethodConfig]
    removed: list[str] = field(default_factory=list)
    budget: str | None = None
    search: str | None = None
    model: str | None = None
    cost: dict[str, float] = field(default_factory=dict)
    fitness: dict[str, Any] = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # anything else a search wants to keep (not re-read)
    kv: str | None = None  # the KV-cache spec to run with (hiercomp.kv.parse), when the plan spans the cache
    memory: dict[str, Any] = field(default_factory=dict)  # plan-memory's split of one memory budget (informative)

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
        if self.kv:
            out["kv"] = self.kv
        if self.memory:
            out["memory"] = self.memory
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
    def from_dict(cls, data: Any, source: str = "plan", validate: bool = True) -> Plan:
        """``validate=False`` (reading a saved folder's plan) does not ask the method registry, so a folder stays
        readable whatever methods this hiercomp has."""
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
                layers[str(name)] = MethodConfig.from_dict(raw, validate)
            except HiercompError as err:
                raise HiercompError(f"{source}: layer {name}: {err}") from None
        removed = data.get("remove") or []
        if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed):
            raise HiercompError(f"{source}: 'remove' must be a list of sub-block names")
        if validate and data.get("kv"):
            from hiercomp.kv.spec import parse as parse_kv  # a bad spec fails here, in one line, not at generate

            try:
                parse_kv(str(data["kv"]))
            except HiercompError as err:
                raise HiercompError(f"{source}: kv: {err}") from None
        if not isinstance(data.get("memory") or {}, dict):
            raise HiercompError(f"{source}: 'memory' must be a mapping (as `hiercomp plan-memory` writes it)")
        return cls(layers, list(removed), _str_or_none(data.get("budget")), data.get("search"), data.get("model"),
                   dict(data.get("cost") or {}), dict(data.get("fitness") or {}),
                   [list(row) for row in data.get("history") or []], dict(data.get("notes") or {}),
                   _str_or_none(data.get("kv")), dict(data.get("memory") or {}))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(load_yaml(path, "plan"), str(path))

    # -- to the engine -----------------------------------------------------------------------------
    def check(self, model: Any, source: str = "plan") -> None:
        """One-line error when the plan names layers this model does not have (a plan for another model)."""
        known = {lin.name for lin in walk(model).linears}
        unknown = sorted(set(self.layers) - known)
        if unknown:
            raise HiercompError(f"{source} names {len(unknown)} layer(s) this model does not have, e.g. {unknown[0]}; "
                                "was it searched on another model?")

    def kept_layers(self) -> dict[str, MethodConfig]:
        """The layers to compress: those not inside a removed sub-block."""
        gone = tuple(f"{name}." for name in self.removed)
        return {name: config for name, config in self.layers.items() if not (name + ".").startswith(gone)}

    def methods(self) -> dict[str, Method]:
        """Layer name -> method instance, one instance per distinct config (what the engine runs)."""
        made: dict[MethodConfig, Method] = {}
        out: dict[str, Method] = {}
        for name, config in self.kept_layers().items():
            if config not in made:
                made[config] = config.make()
            out[name] = made[config]
        return out

    @classmethod
    def uniform(cls, layers: list[str], method: Method | MethodConfig, removed: list[str] | None = None) -> Plan:
        config = method if isinstance(method, MethodConfig) else MethodConfig.of(method)
        return cls(dict.fromkeys(layers, config), list(removed or []))

    def summary(self) -> str:
        """One line a person reads: each method config with its layer count, and the removals."""
        counts: dict[str, int] = {}
        for config in self.kept_layers().values():
            counts[config.label] = counts.get(config.label, 0) + 1
        parts = [f"{label} x{n}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1])]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        return ", ".join(parts) or "nothing"


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
