"""Recipes: which method goes on which layers, by name patterns (llm-compressor's targets/ignore idea).

YAML form::

    ignore: [lm_head]            # kept dense whatever the rules say (default: lm_head and poolers)
    rules:
      - method: gptq
        targets: ["*"]           # glob on full layer names, or "re:<regex>"
        ignore: ["*.down_proj"]  # optional, per rule
        bits: 4
        group_size: 32
      - method: rtn              # later rules win for the layers they match
        targets: ["*.down_proj"]
        bits: 8
    remove: [model.layers.3.mlp]  # optional: attention/MLP sub-blocks or whole blocks removed first
                                  # (hiercomp.depth); their layers are gone, the rules act on the rest

A recipe resolves, against a model's hierarchy, into a :class:`~hiercomp.plan.Plan` (exact layer names), which
the engine runs.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiercomp.errors import HiercompError
from hiercomp.hierarchy import ModelHierarchy
from hiercomp.io.yamlfile import load_yaml
from hiercomp.methods import Method, make_method
from hiercomp.plan import MethodConfig, Plan

DEFAULT_IGNORE = ("lm_head", "*pooler*")


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    # A bare name also matches as the last component(s): "lm_head", "down_proj", "mlp.down_proj".
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


@dataclass(frozen=True)
class Rule:
    method: Method
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def applies_to(self, name: str) -> bool:
        return any(matches(name, p) for p in self.targets) and not any(matches(name, p) for p in self.ignore)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method.name, "targets": list(self.targets)}
        if self.ignore:
            out["ignore"] = list(self.ignore)
        out.update(self.method.params())
        return out


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    remove: tuple[str, ...] = ()  # units removed before compressing (names as in hiercomp.depth.list_subblocks)

    @classmethod
    def single(cls, method: str, targets: tuple[str, ...] = ("*",), **params: Any) -> Recipe:
        return cls((Rule(make_method(method, **params), targets),))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        remove = _patterns(data.get("remove", []), source, -2) if isinstance(data, dict) else ()
        if not isinstance(data, dict) or not isinstance(data.get("rules", []), list) or not (data.get("rules")
                                                                                           or remove):
            raise HiercompError(f"{source}: a recipe needs a non-empty 'rules:' list (see the README's recipe format)")
        rules = []
        for i, raw in enumerate(data.get("rules", [])):
            if not isinstance(raw, dict) or "method" not in raw:
                raise HiercompError(f"{source}: rule {i + 1} needs a 'method:' key")
            params = {k: v for k, v in raw.items() if k not in ("method", "targets", "ignore")}
            targets = _patterns(raw.get("targets", ["*"]), source, i)
            ignore = _patterns(raw.get("ignore", []), source, i)
            rules.append(Rule(make_method(raw["method"], **params), targets, ignore))
        ignore = _patterns(data.get("ignore", list(DEFAULT_IGNORE)), source, -1)
        unknown = set(data) - {"rules", "ignore", "remove"}
        if unknown:
            raise HiercompError(f"{source}: unknown recipe key(s) {', '.join(sorted(unknown))}; "
                                "use 'rules', 'ignore' and 'remove'")
        return cls(tuple(rules), ignore, remove)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.from_dict(load_yaml(path, "recipe"), str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ignore": list(self.ignore), "rules": [r.to_dict() for r in self.rules]}
        if self.remove:
            out["remove"] = list(self.remove)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve(self, hierarchy: ModelHierarchy) -> Plan:
        """The plan: every linear layer a rule reaches and no ignore pattern protects, with the last matching
        rule's method config; the recipe's removals."""
        layers: dict[str, MethodConfig] = {}
        for lin in hierarchy.linears:
            if any(matches(lin.name, p) for p in self.ignore):
                continue
            for rule in self.rules:
                if rule.applies_to(lin.name):
                    layers[lin.name] = MethodConfig.of(rule.method)
        return Plan(layers, list(self.remove))


def _patterns(value: Any, source: str, rule_index: int) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        where = {-1: "top-level ignore", -2: "top-level remove"}.get(rule_index, f"rule {rule_index + 1}")
        raise HiercompError(f"{source}: {where} needs a list of name patterns")
    for pattern in value:  # a bad regex fails here, once, not at the first layer name it is matched against
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise HiercompError(f"{source}: pattern {pattern!r} is not a valid regular expression ({err}); "
                                    "fix it or use a glob such as '*.q_proj'") from None
    return tuple(value)
