"""The method protocol: a frozen dataclass of parameters with one ``compress`` call.

A method takes one linear layer's weight (out, in) in float32, its bias and the statistics of its
calibration inputs, and returns a :class:`~hiercomp.layers.CompressedLinear`. It declares which
statistics it needs so that the engine gathers only those (a Hessian is in x in floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_args, get_type_hints

import torch
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.layers import CompressedLinear

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


@dataclass
class LayerStats:
    """Statistics of a linear layer's inputs X (tokens x in) over the calibration set.

    ``hessian`` is the mean of x xᵀ over tokens (XᵀX / T), so tr(ΔW H ΔWᵀ) is the mean squared output
    error per token; ``channel_sq_mean`` is its diagonal, E[x_j²], kept separately because it is cheap.
    """

    channel_sq_mean: torch.Tensor
    n_tokens: int
    hessian: torch.Tensor | None = None

    def require_hessian(self, method: str, layer: str) -> torch.Tensor:
        if self.hessian is None:
            raise HiercompError(f"{method} needs calibration data for layer {layer}: pass --calib FILE")
        return self.hessian


@dataclass(frozen=True)
class Method:
    """Base of every method. Subclasses are frozen dataclasses whose fields are the parameters."""

    name: ClassVar[str] = ""
    needs_hessian: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    # Bumped when the algorithm changes what it produces: the search's candidate cache keys on it, so a changed
    # method never reuses stale candidates.
    version: ClassVar[int] = 1
    # The engine feeds each block the ORIGINAL model's activations when every method of a plan asks for it (AWQ).
    propagate_original: ClassVar[bool] = False
    # Methods with a block-level step (AWQ's scale folding) set this and implement ``prepare_group``; such layers
    # cannot be mixed one by one by the search (the fold reaches into the layer before them).
    transforms_groups: ClassVar[bool] = False

    def prepare_group(
        self, block: nn.Module, positions: list[str], inputs: Callable[[], torch.Tensor],
        run_module: Callable[[str], torch.Tensor],
    ) -> str | None:
        """Rewrite a stage group of the still-float ``block`` before its layers are compressed (see
        :func:`hiercomp.engine.compress_model`). Returns a note on what was done, or None."""
        return None

    def group_tokens(self) -> int:
        """Calibration tokens (whole sequences) that ``prepare_group`` is given."""
        return 4096

    def compress(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None, layer: str, origin: str
    ) -> CompressedLinear:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({inner})"


def make_method(name: str, **params: Any) -> Method:
    """Build a method from its CLI/recipe name and parameters, with one-line errors for bad input.

    ``rotate=True`` (``--rotate``, ``rotate: true`` in a recipe rule) is a modifier, not a parameter: it names the
    method's rotated variant (:func:`hiercomp.methods.rotate.rotated_method_name`), e.g. gptq -> rot_gptq."""
    if "rotate" in params:
        rotate = params.pop("rotate")
        if not isinstance(rotate, bool):
            raise HiercompError(f"method {name!r}: rotate must be true or false, got {rotate!r}")
        if rotate and name in METHODS:
            from hiercomp.methods.rotate import rotated_method_name

            name = rotated_method_name(name)
    cls = METHODS.get(name)
    if cls is None:
        raise HiercompError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    known = {f.name for f in fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise HiercompError(
            f"method {name!r} has no parameter(s) {', '.join(sorted(unknown))}; it takes: {', '.join(sorted(known))}"
        )
    _check_types(cls, params)
    try:
        return cls(**params)
    except (TypeError, ValueError, OverflowError) as err:
        raise HiercompError(f"method {name!r}: {err}") from None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_types(cls: type[Method], params: dict[str, Any]) -> None:
    """Each parameter of the type its dataclass field declares (``int``, ``float``, ``bool``, ``str``, or one of
    them ``| None``), so ``bits: 4.5``, ``group_size: "32"`` or ``symmetric: "yes"`` fail here in one line instead
    of deep inside a kernel. A ``float`` field takes an integer; ``bool`` is never taken for a number."""
    hints = get_type_hints(cls)
    for key, value in params.items():
        hint = hints.get(key)
        allowed = [t for t in get_args(hint) if t is not type(None)] if get_args(hint) else [hint]
        optional = type(None) in get_args(hint)
        if value is None and optional:
            continue
        ok = any(_is_instance(value, t) for t in allowed)
        if not ok and all(t in _TYPE_WORDS for t in allowed):
            wanted = " or ".join(_TYPE_WORDS[t] for t in allowed) + (" or null" if optional else "")
            hint_text = " (quote N:M patterns in YAML: pattern: \"2:4\")" if key == "pattern" else ""
            raise HiercompError(f"method {cls.name!r}: {key} must be {wanted}, got {value!r}{hint_text}")


def _is_instance(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return not isinstance(kind, type) or isinstance(value, kind)


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep 2 of every 4 consecutive weights in a row."""
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m
