"""Removable units of a transformer: each block's attention sub-block, its MLP sub-block, the whole block.

A unit is named by a module path, found generically from the block's children (no table per model):

* pre-norm blocks (Llama, Qwen2, Mistral: ``self_attn`` / ``mlp``; GPT-2: ``attn`` / ``mlp``): removing a
  sub-block swaps it for a stand-in returning zeros, so the block computes ``h + mlp(norm(h))`` (attention
  removed) or ``h + attn(norm(h))`` (MLP removed): an exact skip of that sub-block;
* post-norm blocks (BERT family: ``attention`` / ``intermediate`` + ``output``): the residual add and its
  LayerNorm live inside the sub-block (``LayerNorm(dense(x) + h)``). Removing the sub-block sets its
  contribution to zero and keeps that LayerNorm, ``LayerNorm(h)``: *not* an exact skip, but what the
  residual stream does with a zero update. The MLP unit is named by ``intermediate``; its ``output`` module
  (dense + LayerNorm) goes with it.
* a whole block (named by the block's path, e.g. ``model.layers.3``): both sub-blocks and the block's own
  norms go, and the block is an exact identity in every family.

Removal keeps the block objects, their classes and indices in place (only sub-modules are swapped), so
layer names, the KV cache's layer indices, recipes and saved state keys all stay valid, and generation with
a cache keeps working (see :mod:`hiercomp.depth.standins` for how removed attention keeps the cache length).
Removed units hold no weights (except a post-norm sub-block's kept LayerNorm), so they cost 0 bits when saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from hiercomp.depth.standins import (
    PostNormAttention,
    PostNormOutput,
    RemovedSubBlock,
    SkippedIntermediate,
    ZeroAttention,
    ZeroMLP,
)
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import ModelHierarchy, is_linear, set_module, walk

ATTN_CHILDREN = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILDREN = ("mlp", "feed_forward", "ffn")
KINDS = ("attn", "mlp", "block")
SUPPORTED = "Llama/Qwen2/Mistral (self_attn + mlp), GPT-2 (attn + mlp) and BERT-style (attention + intermediate/output)"


@dataclass(frozen=True)
class SubBlock:
    name: str  # module path of the removable unit, e.g. "model.layers.3.mlp", "model.layers.3.self_attn"
    block_index: int
    kind: str  # "attn" | "mlp" | "block" (the whole block)
    linear_names: tuple[str, ...]  # the linear layers inside it (names as in hiercomp.hierarchy)
    param_count: int  # parameters its removal frees


@dataclass(frozen=True)
class _Layout:
    """Where a block keeps its sub-blocks (child names)."""

    post_norm: bool
    attn: str
    mlp: str  # pre-norm: the MLP; post-norm: "intermediate" (its "output" goes with it)
    norms: tuple[str, ...] = ()  # pre-norm: the block's own parameterised children besides attn/mlp (the norms)


def _layout(block: nn.Module, block_name: str) -> _Layout:
    children = dict(block.named_children())
    if {"attention", "intermediate", "output"} <= children.keys():
        return _Layout(True, "attention", "intermediate")
    attn = next((n for n in ATTN_CHILDREN if n in children), None)
    mlp = next((n for n in MLP_CHILDREN if n in children), None)
    if attn is None or mlp is None:
        raise HiercompError(f"depth pruning does not know the sub-blocks of {block_name} "
                            f"({type(block).__name__}); supported: {SUPPORTED}")
    norms = tuple(n for n, m in children.items()
                  if n not in (attn, mlp) and any(True for _ in m.parameters()))
    return _Layout(False, attn, mlp, norms)


def _layer_idx(module: nn.Module) -> int | None:
    """The KV-cache layer index the attention uses (``layer_idx`` on it or on a child), if any."""
    for sub in module.modules():
        value = getattr(sub, "layer_idx", None)
        if isinstance(value, int):
            return value
    return None


def _kept_norm(module: nn.Module, path: str) -> nn.Module:
    """The LayerNorm of a post-norm sub-block (or of the stand-in that already replaced it)."""
    if isinstance(module, RemovedSubBlock):
        if module.norm is None:  # removed as part of the whole block: a lone sub-block cannot get it back
            raise HiercompError("this block was removed whole; its sub-blocks cannot be removed separately")
        return module.norm
    return module.get_submodule(path)


def _is_removed(module: nn.Module, whole: bool) -> bool:
    return isinstance(module, RemovedSubBlock) and (not whole or module.unit == "block")


def _edits(block: nn.Module, layout: _Layout, kind: str) -> dict[str, nn.Module]:
    """Child path inside ``block`` -> stand-in, for removing unit ``kind``; empty when already removed."""
    whole = kind == "block"
    attn, mlp = block.get_submodule(layout.attn), block.get_submodule(layout.mlp)
    edits: dict[str, nn.Module] = {}
    if kind in ("attn", "block") and not _is_removed(attn, whole):
        if layout.post_norm:
            norm = None if whole else _kept_norm(attn, "output.LayerNorm")
            edits[layout.attn] = PostNormAttention(kind, norm, _layer_idx(attn))
        else:
            edits[layout.attn] = ZeroAttention(kind, _layer_idx(attn))
    if kind in ("mlp", "block") and not _is_removed(mlp, whole):
        if layout.post_norm:
            norm = None if whole else _kept_norm(block.get_submodule("output"), "LayerNorm")
            edits[layout.mlp] = SkippedIntermediate(kind)
            edits["output"] = PostNormOutput(kind, norm)
        else:
            edits[layout.mlp] = ZeroMLP(kind)
    if whole and edits:
        for name in layout.norms:
            extra = block.get_submodule(name)
            if any(is_linear(m) for m in extra.modules()):
                raise HiercompError(f"block child '{name}' has its own linear layers (cross-attention?); "
                                    "remove the attention or MLP sub-blocks instead of the whole block")
            edits[name] = nn.Identity()
    return edits


def _freed_params(block: nn.Module, edits: dict[str, nn.Module]) -> int:
    old = {id(p): p.numel() for path in edits for p in block.get_submodule(path).parameters()}
    new = {id(p) for module in edits.values() for p in module.parameters()}
    return sum(n for pid, n in old.items() if pid not in new)


def _unit_name(block_name: str, layout: _Layout, kind: str) -> str:
    return block_name if kind == "block" else f"{block_name}.{layout.attn if kind == 'attn' else layout.mlp}"


def list_subblocks(model: nn.Module, hierarchy: ModelHierarchy | None = None) -> list[SubBlock]:
    """Every unit that can still be removed, block by block: attention, MLP, whole block."""
    hierarchy = hierarchy or walk(model)
    units: list[SubBlock] = []
    for info in hierarchy.blocks:
        layout = _layout(info.module, info.name)
        for kind in KINDS:
            edits = _edits(info.module, layout, kind)
            if not edits:
                continue
            prefixes = tuple(f"{info.name}.{path}." for path in edits)
            linears = tuple(lin.name for lin in info.linears if (lin.name + ".").startswith(prefixes))
            units.append(SubBlock(_unit_name(info.name, layout, kind), info.index, kind, linears,
                                  _freed_params(info.module, edits)))
    return units


def _resolve(hierarchy: ModelHierarchy, names: Iterable[str]) -> list[tuple[Any, _Layout, str, str]]:
    """(block info, layout, kind, name) for each requested name, whole blocks first."""
    known: dict[str, tuple[Any, _Layout, str]] = {}
    for info in hierarchy.blocks:
        layout = _layout(info.module, info.name)
        for kind in KINDS:
            known[_unit_name(info.name, layout, kind)] = (info, layout, kind)
    resolved = []
    for name in dict.fromkeys(names):
        if name not in known:
            example = ", ".join(list(known)[:3])
            raise HiercompError(f"'{name}' is not a removable sub-block or block of this model; "
                                f"use names such as {example} (see hiercomp.depth.list_subblocks)")
        resolved.append((*known[name], name))
    return sorted(resolved, key=lambda r: r[2] != "block")


def _apply(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap in the stand-ins; returns (block, path, replaced module) to undo it."""
    replaced = []
    for info, layout, kind, _name in _resolve(walk(model), names):
        for path, standin in _edits(info.module, layout, kind).items():
            replaced.append((info.module, path, info.module.get_submodule(path)))
            set_module(info.module, path, standin)
    return replaced


def remove_subblocks(model: nn.Module, names: Iterable[str]) -> None:
    """Remove the named units in place (attention / MLP sub-blocks or whole blocks). Removing twice is a no-op."""
    _apply(model, names)


@contextmanager
def temporarily_removed(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Remove the named units for the duration of a ``with`` block, then put the original modules back."""
    replaced = _apply(model, names)
    try:
        yield
    finally:
        for block, path, module in reversed(replaced):
            set_module(block, path, module)


def removed_subblocks(model: nn.Module, hierarchy: ModelHierarchy | None = None) -> list[str]:
    """Names of the units removed from ``model`` (a whole block is listed once, by its own name)."""
    hierarchy = hierarchy or walk(model)
    removed: list[str] = []
    for info in hierarchy.blocks:
        layout = _layout(info.module, info.name)
        attn, mlp = info.module.get_submodule(layout.attn), info.module.get_submodule(layout.mlp)
        if _is_removed(attn, whole=True):
            removed.append(info.name)
            continue
        for kind, module in (("attn", attn), ("mlp", mlp)):
            if isinstance(module, RemovedSubBlock):
                removed.append(_unit_name(info.name, layout, kind))
    return removed


def describe_removals(model: nn.Module, names: Iterable[str]) -> list[dict[str, Any]]:
    """For the saved metadata and `hiercomp info`: each named unit's kind, freed parameters and linear weights.

    Call on the model *before* removing; units already removed are skipped.
    """
    hierarchy = walk(model)
    units = {unit.name: unit for unit in list_subblocks(model, hierarchy)}
    resolved = sorted(_resolve(hierarchy, names), key=lambda r: (r[0].index, KINDS.index(r[2])))  # model order
    wanted = [name for _info, _layout, _kind, name in resolved]
    rows = []
    for name in wanted:
        unit = units.get(name)
        if unit is None:
            continue
        linear_weights = sum(hierarchy.linear(lin).params for lin in unit.linear_names)
        rows.append({"name": name, "kind": unit.kind, "block": unit.block_index, "params": unit.param_count,
                     "linear_weights": linear_weights, "linear_names": list(unit.linear_names)})
    return rows
