"""The KV spec language: ``method:param=value,...`` terms joined by ``+`` (eviction first, then an encoder).

    snapkv:ratio=0.5+kivi:bits=2     streaming:budget=512,sinks=4     h2o:budget=0.25x     mustafar:sparsity=0.7
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hiercomp.errors import HiercompError
from hiercomp.kv.base import Budget, Encoder, Evictor
from hiercomp.kv.methods.cskv import CSKV
from hiercomp.kv.methods.ems import EMS
from hiercomp.kv.methods.h2o import H2O
from hiercomp.kv.methods.kivi import KIVI
from hiercomp.kv.methods.mustafar import Mustafar
from hiercomp.kv.methods.snapkv import SnapKV
from hiercomp.kv.methods.streaming import StreamingLLM

EVICTORS: dict[str, type[Evictor]] = {cls.name: cls for cls in (StreamingLLM, SnapKV, H2O, EMS)}
ENCODERS: dict[str, type[Encoder]] = {cls.name: cls for cls in (KIVI, Mustafar, CSKV)}


def register_encoder(cls: type[Encoder]) -> None:
    ENCODERS[cls.name] = cls


@dataclass(frozen=True)
class KVSpec:
    """A parsed spec: at most one evictor and one encoder (either may be None: then the cache is exact)."""

    evictor: Evictor | None = None
    encoder: Encoder | None = None
    text: str = ""

    @property
    def is_exact(self) -> bool:
        return self.evictor is None and self.encoder is None


def _convert(method: str, name: str, raw: str, field: dataclasses.Field) -> object:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise HiercompError(f"{method}: {name}={raw!r} is not a {kind}") from None
    return raw


def _term(text: str) -> Evictor | Encoder:
    method, _, params = text.partition(":")
    method = method.strip().lower()
    cls = EVICTORS.get(method) or ENCODERS.get(method)
    if cls is None:
        known = ", ".join(sorted({*EVICTORS, *ENCODERS}))
        raise HiercompError(f"unknown KV method {method!r}; known: {known}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        name, eq, raw = item.partition("=")
        name = name.strip()
        if not eq:
            raise HiercompError(f"{method}: {item!r} is not name=value")
        if name == "ratio" and issubclass(cls, Evictor):
            value = _convert(method, name, raw, dataclasses.field(default=0.0))
            value = float(raw) if isinstance(value, str) else value
            if not 0 < value < 1:
                raise HiercompError(f"{method}: ratio={raw} must lie in (0, 1) (the fraction of tokens removed)")
            kwargs["budget"] = Budget("ratio", value)
        elif name == "budget" and issubclass(cls, Evictor):
            kwargs["budget"] = Budget.parse(raw)
        elif name in fields and name != "budget":
            kwargs[name] = _convert(method, name, raw.strip(), fields[name])
        else:
            allowed = ", ".join(sorted({*(n for n in fields if n != "budget"),
                                        *(("ratio", "budget") if issubclass(cls, Evictor) else ())}))
            raise HiercompError(f"{method}: unknown parameter {name!r}; known: {allowed}")
    obj = cls(**kwargs)
    if isinstance(obj, Evictor) and obj.budget.kind == "tokens" and obj.budget.value < obj.protected():
        raise HiercompError(f"{method}: budget={int(obj.budget.value)} tokens is below the {obj.protected()} sink + "
                            "window tokens it always keeps; raise the budget or shrink the window")
    return obj


def parse(spec: str) -> KVSpec:
    """Parse ``"snapkv:ratio=0.5+kivi:bits=2"``; ``""``/``"none"`` is the exact cache. Errors are one line."""
    text = (spec or "").strip()
    if text.lower() in ("", "none", "full"):
        return KVSpec(text=text)
    evictor = encoder = None
    for part in text.split("+"):
        term = _term(part)
        if isinstance(term, Evictor):
            if evictor is not None or encoder is not None:
                raise HiercompError(f"{spec!r}: one eviction method, written first, then at most one encoder "
                                    "(e.g. snapkv:ratio=0.5+kivi:bits=2)")
            evictor = term
        else:
            if encoder is not None:
                raise HiercompError(f"{spec!r}: at most one encoder (kivi, mustafar, cskv) per cache")
            encoder = term
    return KVSpec(evictor, encoder, text)
