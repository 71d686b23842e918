"""Candidate levels: what a layer may become — a :class:`~hiercomp.plan.MethodConfig`, the type a plan holds.

Written on the command line as ``method:param=v1,v2:param=v1`` (the product of the listed values), several
joined by ``;``. ``remove`` lets the search also drop whole attention / MLP sub-blocks. Example::

    gptq:bits=2,3,4,5,6,8:group_size=32,128,channel;sparsegpt:sparsity=0.9;hqq:bits=3:group_size=64;remove

``group_size=channel`` (or ``0``, as on the command line) is one scale per output row.

Each candidate layer is computed once from the ORIGINAL model's activations (engine ``propagate="original"``,
``sequential=False``): every block reads the uncompressed blocks' outputs and every layer the uncompressed
block's inputs, so one layer's candidate does not depend on what its neighbours become, and any mix of levels
can be assembled from the database (EvoPress's sparsity database does the same).
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from hiercomp.budget.budget import tensors_bytes
from hiercomp.budget.cache import LevelCache, level_key, tokens_fingerprint
from hiercomp.engine import compress_model
from hiercomp.errors import HiercompError
from hiercomp.layers import CompressedLinear
from hiercomp.methods import METHODS
from hiercomp.plan import MethodConfig, Plan

DEFAULT_LEVELS = "gptq:bits=2,3,4,5,6,8:group_size=32,128"
REMOVE = "remove"


PER_CHANNEL = ("channel", "0")  # how a level spec writes group_size=None (one scale per output row), as the CLI's 0


def _scalar(key: str, text: str) -> Any:
    if key == "group_size" and text in PER_CHANNEL:
        return None
    value = yaml.safe_load(text)
    return text if isinstance(value, (dict, list)) else value


def parse_levels(spec: str) -> tuple[list[MethodConfig], bool]:
    """Levels from ``method:param=a,b:param=c;...`` (see the module docstring) and whether ``remove`` was asked for."""
    levels: list[MethodConfig] = []
    allow_remove = False
    for item in (part.strip() for part in spec.replace("\n", ";").split(";")):
        if not item:
            continue
        if item == REMOVE:
            allow_remove = True
            continue
        method, *assignments = item.split(":")
        if method not in METHODS:
            raise HiercompError(f"unknown method {method!r} in --levels; choose from {', '.join(sorted(METHODS))}")
        if METHODS[method].transforms_groups:
            raise HiercompError(f"{method} rewrites the layers around each one (it folds scales into the norm "
                                "before them), so its layers cannot be mixed one by one; leave it out of --levels")
        names, choices = [], []
        for assignment in assignments:
            key, eq, values = assignment.partition("=")
            if not eq or not values:
                raise HiercompError(f"cannot read {assignment!r} in level {item!r}; write param=value[,value...]")
            names.append(key.strip())
            choices.append([_scalar(key.strip(), v.strip()) for v in values.split(",")])
        for combo in itertools.product(*choices):
            level = MethodConfig(method, tuple(sorted(zip(names, combo))))
            level.make()  # one-line error for a bad parameter, before any work
            if level not in levels:
                levels.append(level)
    if not levels and not allow_remove:
        raise HiercompError(f"--levels {spec!r} names no level; e.g. {DEFAULT_LEVELS}")
    if not levels:
        raise HiercompError("--levels needs at least one compression level besides 'remove'")
    return levels, allow_remove


@dataclass
class Candidate:
    """One layer at one level: the packed module and what it costs."""

    layer: CompressedLinear
    bits: int  # storage_bits() summed (codes, scales, zeros, masks, bias)
    nbytes: int  # its tensors in the saved file, header entries included (see budget.py)
    rel_output_error: float | None


def candidate_of(name: str, layer: CompressedLinear, rel_output_error: float | None) -> Candidate:
    tensors = {f"{name}.{k}": v for k, v in layer.state_dict().items()}
    return Candidate(layer, layer.total_bits(), tensors_bytes(tensors), rel_output_error)


def build_candidates(
    model: nn.Module,
    layers: list[str],
    levels: list[MethodConfig],
    calibration: torch.Tensor,
    *,
    encoder: bool,
    cache: LevelCache | None,
    model_fingerprint: str,
    progress: bool = True,
) -> tuple[list[dict[str, Candidate]], dict[str, Any]]:
    """For every level, every layer's candidate (from the cache, or compressed once and cached).

    Returns ``candidates[level_index][layer_name]`` and a summary (seconds, cache hits, disk bytes per level).
    """
    tokens_fp = tokens_fingerprint(calibration)
    out: list[dict[str, Candidate]] = []
    summary: dict[str, Any] = {"levels": [], "seconds": 0.0}
    start = time.perf_counter()
    for level in tqdm(levels, desc="candidate levels", unit="level", disable=not progress):
        key = level_key(model_fingerprint, tokens_fp, level.full_params(), layers)
        cached = cache.load(key) if cache is not None else None
        if cached is None:
            work = copy.deepcopy(model)
            try:
                report = compress_model(work, Plan.uniform(layers, level), calibration, encoder=encoder,
                                        propagate="original", sequential=False, progress=False)
            except HiercompError as err:
                raise HiercompError(f"level {level.label}: {err}") from None
            errors = {r.name: r.rel_output_error for r in report.layers}
            modules = {name: work.get_submodule(name) for name in layers}
            if cache is not None:
                cache.store(key, modules, {"level": level.to_dict(), "rel_output_error": errors})
            hit = False
        else:
            modules, info = cached
            errors = info.get("rel_output_error", {})
            hit = True
        out.append({name: candidate_of(name, modules[name], errors.get(name)) for name in layers})
        entry = {"level": level.label, "cache_hit": hit,
                 "layer_bytes": sum(c.nbytes for c in out[-1].values())}
        if cache is not None:
            entry["disk_bytes"] = cache.disk_bytes(key)
        summary["levels"].append(entry)
    summary["seconds"] = time.perf_counter() - start
    return out, summary
