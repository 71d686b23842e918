"""The public Python API: compress(), load(), evaluate() and the CompressedModel they pass around."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercomp.engine import CompressionReport, compress_model
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import walk
from hiercomp.io.hf import LoadedModel, is_compressed_dir, load_hf_model
from hiercomp.io.saved import WEIGHTS_FILE, load_compressed, read_meta, safetensors_header_bytes, save_compressed
from hiercomp.recipe import Recipe


@dataclass
class CompressedModel:
    """A compressed model in memory, with what is needed to save, evaluate and describe it."""

    model: nn.Module
    tokenizer: Any
    is_encoder: bool
    recipe: Recipe | None
    report: CompressionReport
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def bits_per_weight(self) -> float:
        return self.report.bits_per_weight

    def accounted_bytes(self) -> float:
        """Exact storage: compressed layers' bits / 8 plus every other tensor's bytes (tied ones once)."""
        from hiercomp.io.saved import _unique_state

        tensors, _ = _unique_state(self.model)
        compressed_names = {f"{r.name}." for r in self.report.layers}
        dense = sum(t.numel() * t.element_size() for k, t in tensors.items()
                    if not any(k.startswith(p) for p in compressed_names))
        return dense + self.report.compressed_bits / 8

    def save(self, out: str | Path, force: bool = False) -> Path:
        meta = {"source": self.source, "is_encoder": self.is_encoder, "report": self.report.to_dict(),
                "recipe": None if self.recipe is None else self.recipe.to_dict(),
                "accounted_bytes": self.accounted_bytes(), **self.extra}
        from hiercomp.anysize import stack_meta

        meta.update(stack_meta(self.model))  # BitStack: the global block order, for loading at a budget
        return save_compressed(self.model, out, tokenizer=self.tokenizer,
                               recipe_yaml=None if self.recipe is None else self.recipe.to_yaml(),
                               meta=meta, force=force)


def _as_loaded(model_or_path: Any, tokenizer: Any = None, trust_remote_code: bool = False) -> LoadedModel:
    if isinstance(model_or_path, LoadedModel):
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        from hiercomp.io.hf import is_encoder_config

        return LoadedModel(model_or_path, tokenizer, is_encoder_config(model_or_path.config),
                           getattr(model_or_path.config, "_name_or_path", "") or "<in memory>")
    return load_hf_model(model_or_path, trust_remote_code=trust_remote_code)


def compress(
    model_or_path: Any,
    recipe: Recipe | str | Path | dict,
    calibration: torch.Tensor | Any = None,
    *,
    tokenizer: Any = None,
    propagate: str = "compressed",
    sequential: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    trust_remote_code: bool = False,
    recovery: Any = None,
) -> CompressedModel:
    """Compress a model (a Hugging Face folder, hub id, or an already loaded model) following ``recipe``.

    ``calibration`` is a (N, L) tensor of token ids, or a :class:`hiercomp.calibration.CalibrationConfig`
    (loaded with the model's tokenizer). A model passed as a module is compressed in place.
    The recipe's ``remove`` units go first; with ``recovery`` (a :class:`hiercomp.depth.RecoveryConfig`) the
    blocks after the first removed one are distilled against the original before the rest is compressed.
    """
    loaded = _as_loaded(model_or_path, tokenizer, trust_remote_code)
    if isinstance(recipe, (str, Path)):
        recipe = Recipe.load(recipe)
    elif isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if calibration is not None and not isinstance(calibration, torch.Tensor):
        from hiercomp.calibration import load_calibration

        max_len = getattr(loaded.model.config, "max_position_embeddings", None)
        calibration = load_calibration(loaded.tokenizer, calibration, max_len=max_len)
    depth_facts: dict[str, Any] = {}
    if recipe.remove:  # depth pruning first, so the engine compresses only (recovered) remaining layers
        from hiercomp.depth import apply_removals

        depth_facts = apply_removals(loaded.model, recipe.remove, calibration, recovery,
                                     encoder=loaded.is_encoder, progress=progress)
    hierarchy = walk(loaded.model)
    plan = recipe.resolve(hierarchy)
    if not plan and not recipe.remove:
        raise HiercompError("the recipe matches no layer of this model; "
                            "check its targets against `hiercomp info MODEL`")
    report = CompressionReport()
    if plan:
        report = compress_model(loaded.model, plan, calibration, encoder=loaded.is_encoder, propagate=propagate,
                                sequential=sequential, batch_size=batch_size, progress=progress,
                                hierarchy=hierarchy)
    return CompressedModel(loaded.model, loaded.tokenizer, loaded.is_encoder, recipe, report, loaded.source,
                           extra=depth_facts)


def load(path: str | Path, budget: str | int | float | None = None) -> CompressedModel:
    """Load a folder written by :meth:`CompressedModel.save`.

    ``budget`` (a BitStack model only): ``"120KB"`` (KB = 1000 bytes, KiB = 1024), bytes as a number, or
    ``"3.0bpw"``; loads the longest prefix of the global block stack whose saved size fits (see
    :mod:`hiercomp.anysize`), reading only those blocks from the file.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise HiercompError(f"{path} does not exist; pass a folder written by `hiercomp compress`")
    info = read_meta(path)
    if budget is None:
        model = load_compressed(path)
    else:
        from hiercomp.anysize import load_budget

        model, info = load_budget(path, info, budget)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a model saved without tokenizer files
        tokenizer = None
    recipe = Recipe.from_dict(info["recipe"]) if info.get("recipe") else None
    report = CompressionReport.from_dict(info.get("report", {}))
    cm = CompressedModel(model, tokenizer, info.get("is_encoder", False), recipe, report,
                         info.get("source", str(path)))
    if budget is not None:
        cm.extra["loaded"] = info["loaded"]
    cm.extra.update({k: info[k] for k in ("removed", "recovery") if k in info})  # depth pruning, kept on re-save
    return cm


def search(model_or_path: Any, budget: str, calibration: Any, **options: Any) -> Any:
    """Find a per-layer plan that fits ``budget`` ("3.0bpw", "150KB", "0.25x"); compress nothing. Returns a Plan.

    Options: ``search`` ("uniform" | "greedy" | "evo"), ``levels``, ``evo`` (EvoConfig), ``cache_dir``,
    ``checkpoint``, ``out`` (plan YAML + PNGs) — see :func:`hiercomp.budget.search.search`. Apply the plan with
    ``compress(model, plan.to_recipe(), calibration)``.
    """
    from hiercomp.budget.search import search as run_search

    return run_search(model_or_path, budget, calibration=calibration, **options)


def load_any(ref: str | Path, trust_remote_code: bool = False) -> CompressedModel:
    """A compressed folder, or an original model wrapped as an uncompressed CompressedModel."""
    if is_compressed_dir(ref):
        return load(ref)
    loaded = load_hf_model(ref, trust_remote_code=trust_remote_code)
    return CompressedModel(loaded.model, loaded.tokenizer, loaded.is_encoder, None, CompressionReport(), str(ref))


def saved_size_bytes(path: str | Path) -> dict[str, int]:
    path = Path(path)
    weights = path / WEIGHTS_FILE
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"size_bytes": weights.stat().st_size, "folder_bytes": total,
            "header_bytes": safetensors_header_bytes(weights)}


def export_dense(path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write a plain Hugging Face folder with dequantized weights that ``from_pretrained`` loads."""
    from hiercomp.hierarchy import compressed_layers, set_module
    from hiercomp.io.atomic import atomic_dir

    cm = load(path)
    for name, layer in compressed_layers(cm.model).items():
        set_module(cm.model, name, layer.to_linear())
    with atomic_dir(out, force) as tmp:
        cm.model.save_pretrained(tmp)
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(tmp)
        (tmp / "hiercomp_export.json").write_text(json.dumps({"exported_from": str(path)}))
    return Path(out)
