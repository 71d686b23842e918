"""The public Python API: compress(), load(), evaluate() and the CompressedModel they pass around."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercomp.anysize import load_budget, stack_meta
from hiercomp.budget import parse_budget
from hiercomp.budget.evo import EvoConfig
from hiercomp.budget.levels import DEFAULT_LEVELS
from hiercomp.budget.search import search as run_search
from hiercomp.calibration import CalibrationConfig, calibration_tokens
from hiercomp.compression_report import CompressionReport
from hiercomp.depth import apply_removals
from hiercomp.depth.plan import choose_drops
from hiercomp.engine import compress_model
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers, dequantize_layers, walk
from hiercomp.io.atomic import atomic_dir, check_output_dir
from hiercomp.io.hf import LoadedModel, as_loaded, is_compressed_dir, load_hf_model
from hiercomp.io.resume import resume_folder
from hiercomp.io.saved import (
    WEIGHTS_FILE,
    _unique_state,
    load_compressed,
    read_meta,
    safetensors_header_bytes,
    save_compressed,
)
from hiercomp.io.yamlfile import load_yaml
from hiercomp.plan import Plan
from hiercomp.recipe import Recipe
from hiercomp.tune import check_tuning, split_recovery, tune


@dataclass
class CompressedModel:
    """A compressed model in memory, with what is needed to save, evaluate and describe it."""

    model: nn.Module
    tokenizer: Any
    is_encoder: bool
    recipe: Recipe | None  # the patterns the user wrote, when compressed from a recipe (saved as recipe.yaml)
    report: CompressionReport
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None  # what was done to every layer (saved as plan.yaml)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def bits_per_weight(self) -> float:
        return self.report.bits_per_weight

    @property
    def kv_spec(self) -> str | None:
        """The KV-cache spec the plan names (``plan.kv``, from `hiercomp plan-memory`; saved as hiercomp.json's
        "kv"), for ``generate`` to run with by default; None when the plan names none."""
        return self.plan.kv if self.plan is not None else None

    def accounted_bytes(self) -> float:
        """Exact storage: compressed layers' bits / 8 plus every other tensor's bytes (tied ones once)."""
        tensors, _ = _unique_state(self.model)
        compressed_names = {f"{r.name}." for r in self.report.layers}
        dense = sum(t.numel() * t.element_size() for k, t in tensors.items()
                    if not any(k.startswith(p) for p in compressed_names))
        return dense + self.report.compressed_bits / 8

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write the folder atomically: weights, config, tokenizer, hiercomp.json, plan.yaml (+ recipe.yaml)."""
        meta, files = self.folder_contents()
        return save_compressed(self.model, out, tokenizer=self.tokenizer, files=files, meta=meta, force=force)

    def folder_contents(self) -> tuple[dict[str, Any], dict[str, str]]:
        """What a saved folder holds besides the weights: hiercomp.json's entries and the YAML files by name."""
        meta = {"source": self.source, "is_encoder": self.is_encoder, "report": self.report.to_dict(),
                "recipe": None if self.recipe is None else self.recipe.to_dict(),
                "plan": None if self.plan is None else self.plan.to_dict(),
                "accounted_bytes": self.accounted_bytes(), **self.extra}
        if self.kv_spec:
            meta["kv"] = self.kv_spec
        if any(layer.kind == "bitstack" for layer in compressed_layers(self.model).values()):
            meta.update(stack_meta(self.model))  # BitStack: the global block order, for loading at a budget
        files = {}
        if self.plan is not None:
            files["plan.yaml"] = self.plan.to_yaml()
        if self.recipe is not None:
            files["recipe.yaml"] = self.recipe.to_yaml()
        return meta, files


def _plan_from(what: Any, model: nn.Module) -> tuple[Plan, Recipe | None]:
    """A Plan (and the recipe it came from, if any) from a Recipe, a Plan, a dict or a YAML file of either."""
    if isinstance(what, (str, Path)):
        path = Path(what)
        data = load_yaml(path, "recipe or plan")
        what, source = data, str(path)
    else:
        source = "recipe"
    if isinstance(what, dict):
        what = Plan.from_dict(what, source) if "layers" in what else Recipe.from_dict(what, source)
    if isinstance(what, Plan):
        what.check(model, source)
        return what, None
    if isinstance(what, Recipe):
        return what.resolve(walk(model)), what
    raise HiercompError(f"cannot compress by a {type(what).__name__}; pass a Recipe, a Plan or a YAML file")


def compress(
    model_or_path: Any,
    recipe: Recipe | Plan | str | Path | dict | None = None,
    calibration: torch.Tensor | CalibrationConfig | str | Path | None = None,
    *,
    budget: str | None = None,
    search: str = "evo",
    levels: str | None = None,
    evo: Any = None,
    cache_dir: str | Path | None = None,
    drop: int = 0,
    drop_unit: str = "block",
    drop_rule: str = "position",
    recovery: Any = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    tokenizer: Any = None,
    propagate: str = "compressed",
    sequential: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    trust_remote_code: bool = False,
    resume: bool = False,
    stream: bool = False,
    cluster: Any = None,
) -> CompressedModel:
    """Compress a model (a Hugging Face folder, hub id, or an already loaded model) and, with ``out``, save it.

    Say what to do with one of: ``recipe`` (a :class:`Recipe`, a :class:`Plan`, a dict or a YAML file of either),
    ``budget`` ("3.0bpw", "150KB", "0.25x": a plan is searched first with ``search`` over ``levels``), and/or
    ``drop`` (depth pruning: remove that many ``drop_unit`` units chosen by ``drop_rule`` first; ``recovery``, a
    :class:`hiercomp.depth.RecoveryConfig`, distils the later blocks afterwards; a :class:`hiercomp.tune.TuneConfig`,
    or a list of both, tunes the quantized layers' scales and the norms, or with ``uncompressed=True`` every dense
    parameter too, against the original after quantizing).
    ``calibration``: a text file, a :class:`CalibrationConfig` or an ``(N, L)`` token tensor; every route uses
    the same default windows (:data:`hiercomp.calibration.DEFAULT_NUM_SEQUENCES` of min(512, context) tokens).
    ``out`` is checked before any work and written atomically at the end (``force`` replaces it).
    A model passed as a module is compressed in place.
    With ``out``, each finished block is checkpointed beside it (:mod:`hiercomp.io.resume`); after a hard kill,
    ``resume=True`` with the same arguments continues from the last finished block, to the same bytes.
    ``stream=True``: a model larger than memory, read block by block from its folder's safetensors shards and
    written block by block into ``out`` (:mod:`hiercomp.stream`); the returned model is a skeleton on ``meta``
    (load the folder with :func:`load`).
    ``cluster`` (with ``budget``): a :class:`hiercomp.distributed.ClusterConfig` scores the search on Ray workers;
    same seed, same plan as without it.
    """
    if out is not None:
        check_output_dir(out, force)  # fail before the work
    if cluster is not None and budget is None:
        raise HiercompError("--workers / --ray-address spread a budget search: add --budget, or drop them")
    if budget is not None and recipe is not None:
        raise HiercompError("give a recipe/plan or a budget, not both")
    if budget is None and recipe is None and not drop:
        raise HiercompError("say what to do: a method (--method NAME; `hiercomp methods` lists them), a recipe, "
                            "a plan, a budget or --drop N")
    if stream:  # larger than memory: one block at a time, from the shards to the output folder
        from hiercomp.stream import compress_streaming

        whole_model = budget is not None or drop or recovery is not None
        if out is None or whole_model or not isinstance(model_or_path, (str, Path)):
            raise HiercompError("--stream (stream=True) compresses a model folder by a method, recipe or plan into "
                                "--out; a budget search, --drop and recovery need the whole model — drop --stream")
        if resume:
            raise HiercompError("--resume does not combine with --stream (its checkpoints hash the whole model); "
                                "drop one of them")
        return compress_streaming(model_or_path, recipe, calibration, out=out, force=force, propagate=propagate,
                                  sequential=sequential, batch_size=batch_size, progress=progress,
                                  trust_remote_code=trust_remote_code)
    recovery, tuning = split_recovery(recovery)  # depth recovery (before quantizing), recovery tuning (after)
    if recovery is not None and not drop and recipe is None:
        raise HiercompError("recovery (--recover-steps) distils the blocks after a removal: add --drop N "
                            "(drop=N) or a recipe with 'remove:'")
    if budget is not None:
        parse_budget(budget)  # a malformed budget fails before the model loads
    loaded = as_loaded(model_or_path, tokenizer, trust_remote_code)
    calibration = calibration_tokens(loaded.tokenizer, calibration, model_context(loaded.model))
    if tuning is not None:  # a bad tuning config fails now, not after the quantizing it would tune
        check_tuning(tuning, calibration is not None, loaded.is_encoder)
    recipe_obj: Recipe | None = None
    if budget is not None:
        plan = _search(loaded, budget, calibration, search=search, levels=levels, evo=evo, seed=seed,
                       cache_dir=cache_dir, progress=progress, cluster=cluster).plan
    elif recipe is not None:
        plan, recipe_obj = _plan_from(recipe, loaded.model)
    else:
        plan = Plan({})
    if drop:  # depth pruning: score and choose the units now, so the saved plan names them
        plan.removed = list(dict.fromkeys([*plan.removed, *choose_drops(
            loaded.model, calibration, drop, drop_unit, drop_rule, encoder=loaded.is_encoder, seed=seed,
            progress=progress)]))
    if recovery is not None and not plan.removed:
        raise HiercompError("recovery (--recover-steps) distils the blocks after a removal, and this plan removes "
                            "nothing: add --drop N (drop=N) or a recipe with 'remove:'")
    if not plan.kept_layers() and not plan.removed:
        raise HiercompError("the recipe matches no layer of this model; "
                            "check its targets against `hiercomp info MODEL`")
    depth_facts: dict[str, Any] = {}
    teacher = copy.deepcopy(loaded.model) if tuning is not None else None  # the original, for tuning's distillation
    if plan.removed:  # depth pruning first, so the engine compresses only (recovered) remaining layers
        depth_facts = apply_removals(loaded.model, plan.removed, calibration, recovery,
                                     encoder=loaded.is_encoder, progress=progress)
    with resume_folder(out, resume) as checkpoints:  # removed once saved; only a hard kill leaves it
        report = CompressionReport()
        if plan.kept_layers():
            report = compress_model(loaded.model, plan, calibration, encoder=loaded.is_encoder, propagate=propagate,
                                    sequential=sequential, batch_size=batch_size, progress=progress,
                                    checkpoints=checkpoints)
        if tuning is not None:
            depth_facts["tuning"] = {**tune(loaded.model, teacher, calibration, tuning, encoder=loaded.is_encoder,
                                            progress=progress).to_dict(), **asdict(tuning)}
            del teacher
        cm = CompressedModel(loaded.model, loaded.tokenizer, loaded.is_encoder, recipe_obj, report, loaded.source,
                             extra=depth_facts, plan=plan)
        if out is not None:
            cm.save(out, force=force)
    return cm


def model_context(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _search(loaded: LoadedModel, budget: str, calibration: torch.Tensor | None, *, search: str = "evo",
            levels: str | None = None, evo: Any = None, seed: int = 0, cache_dir: str | Path | None = None,
            max_removed: int = 2, checkpoint: str | Path | None = None, progress: bool = True,
            cluster: Any = None) -> Any:
    if calibration is None:
        raise HiercompError("a search needs calibration text: pass --calib FILE (.txt or .jsonl)")
    outcome = run_search(loaded, budget, calibration=calibration, search=search, levels=levels or DEFAULT_LEVELS,
                         evo=evo or EvoConfig(seed=seed), cache_dir=cache_dir, max_removed=max_removed,
                         checkpoint=checkpoint, progress=progress, cluster=cluster)
    return outcome


def load(path: str | Path, budget: str | int | float | None = None, runtime: str = "fast") -> CompressedModel:
    """Load a folder written by :meth:`CompressedModel.save`, from its own files alone.

    Each layer is rebuilt from its saved config (the layer registry), and the plan and recipe are kept as
    written, never re-made through the method registry: a folder loads whatever methods this hiercomp has.

    ``runtime``: ``"fast"`` (default) computes with each layer's packed kernel where one exists
    (:mod:`hiercomp.layers.kernels`), ``"reference"`` dequantizes then multiplies (the exact stored form).
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
        model = load_compressed(path, runtime=runtime)
    else:
        model, info = load_budget(path, info, budget)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception:  # a model saved without tokenizer files
        tokenizer = None
    report = CompressionReport.from_dict(info.get("report", {}))
    plan = Plan.from_dict(info["plan"], str(path), validate=False) if info.get("plan") else None
    cm = CompressedModel(model, tokenizer, info.get("is_encoder", False), None, report,
                         info.get("source", str(path)), plan=plan)
    if info.get("recipe"):
        cm.extra["recipe"] = info["recipe"]  # as written; kept on re-save
    if budget is not None:
        cm.extra["loaded"] = info["loaded"]
    cm.extra.update({k: info[k] for k in ("removed", "recovery", "tuning") if k in info})  # kept on re-save
    return cm


def search(
    model_or_path: Any, budget: str, calibration: Any, *, search: str = "evo", levels: str | None = None,
    evo: Any = None, seed: int = 0, cache_dir: str | Path | None = None, max_removed: int = 2,
    checkpoint: str | Path | None = None, out: str | Path | None = None, pictures: bool = True,
    tokenizer: Any = None, progress: bool = True, trust_remote_code: bool = False, cluster: Any = None,
) -> Plan:
    """Find a per-layer plan that fits ``budget`` ("3.0bpw", "150KB", "0.25x"); compress nothing. Returns a Plan.

    ``search``: "uniform" | "greedy" | "evo"; ``levels``: a level spec (see :mod:`hiercomp.budget.levels`);
    ``out``: write the plan YAML there (and, with ``pictures``, allocation and quality-vs-size PNGs beside it).
    Apply the plan with ``compress(model, plan, calibration)``; calibration defaults are those of compress.
    ``cluster``: a :class:`hiercomp.distributed.ClusterConfig` (e.g. ``ClusterConfig(workers=4)``, or
    ``address="auto"``) scores the search on Ray workers; same seed, same plan as without it.
    """
    parse_budget(budget)
    if cluster is not None:
        cluster.preflight()  # a missing Ray or a dead address fails before the model loads
    loaded = as_loaded(model_or_path, tokenizer, trust_remote_code)
    tokens = calibration_tokens(loaded.tokenizer, calibration, model_context(loaded.model))
    outcome = _search(loaded, budget, tokens, search=search, levels=levels, evo=evo, seed=seed,
                      cache_dir=cache_dir, max_removed=max_removed, checkpoint=checkpoint, progress=progress,
                      cluster=cluster)
    if out is not None:
        outcome.plan.save(out)
        if pictures:
            from hiercomp.report.search_pictures import write_pictures

            write_pictures(outcome, out)
    return outcome.plan


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
    cm = load(path)
    dequantize_layers(cm.model)
    with atomic_dir(out, force) as tmp:
        cm.model.save_pretrained(tmp)
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(tmp)
        (tmp / "hiercomp_export.json").write_text(json.dumps({"exported_from": str(path)}))
    return Path(out)
