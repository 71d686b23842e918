"""Gather what a report shows about each variant: size, bits, per-layer allocation, evaluation numbers.

Sizes and per-layer data come from the saved folder (``hiercomp.json`` and the bytes on disk). Evaluation
numbers come from :func:`hiercomp.evaluation.evaluate` with the user's options, cached in a hidden folder
beside the report keyed by the folder's contents and the options, so a second run only renders; or from
precomputed ``hiercomp eval --json`` files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hiercomp.errors import HiercompError
from hiercomp.io.hf import WEIGHT_FILES, is_compressed_dir
from hiercomp.report.files import write_text_atomic

CACHE_DIR_NAME = ".hiercomp_report_cache"
# Bumped when the cached evaluation's meaning changes, so old cache entries are not reused.
CACHE_VERSION = 2  # 2: per-question task scores and intervals in the results


@dataclass(frozen=True)
class EvalOptions:
    """The evaluation the user asked for; every variant (and the reference) is measured the same way."""

    text: str | None = None
    reference: str | None = None
    tasks: tuple[str, ...] = ()
    data_dir: str | None = None
    squad: str | None = None
    limit: int | None = None
    seed: int | None = None
    seq_len: int | None = None
    max_windows: int | None = None

    @property
    def wanted(self) -> bool:
        """Whether any measurement was asked for (without one, the report shows sizes and layers only)."""
        return bool(self.text or self.tasks or self.squad)

    def evaluate_kwargs(self, with_reference: bool) -> dict[str, Any]:
        """Keyword arguments for evaluate(); options left unset are not passed at all."""
        kwargs: dict[str, Any] = {"text": self.text, "squad": self.squad, "seq_len": self.seq_len,
                                  "max_windows": self.max_windows, "limit": self.limit,
                                  "tasks": list(self.tasks) or None, "data_dir": self.data_dir, "seed": self.seed,
                                  "reference": self.reference if with_reference else None}
        return {key: value for key, value in kwargs.items() if value is not None}


@dataclass
class Variant:
    """One row of the report."""

    name: str
    path: str | None
    method: str
    size_bytes: int | None
    bits_per_weight: float | None
    layers: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    is_reference: bool = False
    family: str = "other"  # plot series and colour: see method_family


def _fingerprint(path: str | Path | None) -> Any:
    """Path, size and modification time of a file, or of a folder's files: changes when the content does."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        return [str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                        for f in sorted(path.iterdir()) if f.is_file()]
    return str(path)  # a hub id or task name: its name is all we know


def cache_key(model: str | Path, options: EvalOptions, with_reference: bool) -> str:
    files = {"model": _fingerprint(model), "text": _fingerprint(options.text), "squad": _fingerprint(options.squad),
             "data_dir": _fingerprint(options.data_dir),
             "reference": _fingerprint(options.reference) if with_reference else None,
             "tasks": [_fingerprint(t) for t in options.tasks]}
    blob = json.dumps({"version": CACHE_VERSION, "options": asdict(options), "with_reference": with_reference,
                       "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _check_supported(kwargs: dict[str, Any]) -> None:
    from hiercomp.evaluation import evaluate

    accepted = inspect.signature(evaluate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    missing = [key for key in kwargs if key not in accepted]
    if missing:
        raise HiercompError(f"this hiercomp's evaluate() has no {', '.join(missing)} option; "
                            "upgrade hiercomp or drop --tasks/--data-dir/--seed")


def evaluate_cached(model: str | Path, options: EvalOptions, *, with_reference: bool, cache_dir: Path | None,
                    refresh: bool = False, progress: bool = True,
                    reference_scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """evaluate(model, **options), read from ``cache_dir`` when this exact evaluation was done before.

    ``reference_scores``: the original's own evaluation under the same options, reused instead of measuring the
    original again for every variant (it does not change the result, so it is not part of the cache key)."""
    from hiercomp.evaluation import evaluate

    kwargs = options.evaluate_kwargs(with_reference)
    entry = None if cache_dir is None else cache_dir / f"eval-{cache_key(model, options, with_reference)}.json"
    if entry is not None and entry.is_file() and not refresh:
        try:
            return json.loads(entry.read_text())["result"]
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged entry is recomputed and overwritten
    _check_supported(kwargs)
    if reference_scores is not None and with_reference:
        kwargs["reference_scores"] = reference_scores
    result = evaluate(str(model), progress=progress, **kwargs)
    kwargs.pop("reference_scores", None)
    if entry is not None:
        write_text_atomic(entry, json.dumps({"model": str(model), "options": kwargs, "result": result},
                                            indent=1, default=float))
    return result


def _parse_method(description: str) -> tuple[str, dict[str, str]]:
    """``gptq(bits=4, group_size=128, ...)`` -> (``gptq``, {"bits": "4", "group_size": "128", ...})."""
    name, _, rest = description.partition("(")
    params = {}
    for part in rest.rstrip(")").split(","):
        key, eq, value = part.strip().partition("=")
        if eq:
            params[key.strip()] = value.strip()
    return name.strip(), params


def _sorted_values(values: set[str]) -> list[str]:
    return sorted(values, key=lambda v: (0, float(v)) if v.replace(".", "", 1).isdigit() else (1, v))


def _short_params(params: list[dict[str, str]]) -> str:
    """The parameters that say what a method did, over all its layers: ``3-4 bit (g32/g128)``, ``50%``, ``2:4``."""
    def values(key: str) -> list[str]:
        return _sorted_values({p[key] for p in params if p.get(key) not in (None, "None")})

    parts = []
    bits = values("bits")
    if bits:
        parts.append(f"{bits[0]}-bit" if len(bits) == 1 else f"{bits[0]}-{bits[-1]} bit")
    groups = ["channel" if g in ("0", "-1", "channel") else f"g{g}" for g in values("group_size")]
    if groups:
        parts.append(f"({'/'.join(groups)})")
    patterns = values("pattern")
    sparsities = values("sparsity")
    if patterns:
        parts.append("/".join(patterns))
    elif sparsities:
        parts.append("/".join(f"{float(v):.0%}" for v in sparsities) + " sparse")
    for key, label in (("rank", "rank"), ("rank_ratio", "rank ratio"), ("n_blocks", "blocks")):
        found = values(key)
        if found:
            parts.append(f"{label} {'/'.join(found)}")
    return " ".join(parts)


def method_summary(report_layers: list[dict[str, Any]], removed: list[str] = ()) -> str:
    """What a variant's table cell says about its method.

    One method with one parameter list on every layer: that description (``rtn(bits=8, ...)``). A mixed plan:
    one short entry per method, most layers first — ``gptq 3-4 bit (g32/g128) ×20; rtn 8-bit (g128) ×4`` — not
    every layer's parameter list. Removed units (depth pruning) are counted: ``2 removed``.
    """
    descriptions = [str(layer.get("method", "?")) for layer in report_layers]
    gone = ""
    if removed:
        gone = f"{len(removed)} removed" + (f" ({', '.join(removed)})" if len(removed) <= 2 else "")
    if not descriptions:
        return gone or "uncompressed"
    if len(set(descriptions)) == 1:
        return descriptions[0] + (f"; {gone}" if gone else "")
    by_method: dict[str, list[dict[str, str]]] = {}
    for description in descriptions:
        name, params = _parse_method(description)
        by_method.setdefault(name, []).append(params)
    entries = [f"{name} {_short_params(params)}".strip() + f" ×{len(params)}"
               for name, params in sorted(by_method.items(), key=lambda item: -len(item[1]))]
    return "; ".join(entries + ([gone] if gone else []))


def method_family(report_layers: list[dict[str, Any]], removed: bool = False) -> str:
    """The plot series (and colour) of a variant: its method's name, ``mixed`` when the layers differ in method or
    parameters, ``+ depth`` when units were removed. Variants of one family share a colour in every plot."""
    descriptions = {str(layer.get("method", "?")) for layer in report_layers}
    names = sorted({_parse_method(d)[0] for d in descriptions})
    family = "+".join(names) if names else "uncompressed"
    if len(descriptions) > 1:
        family += " mixed"
    return family + (" + depth" if removed else "")


def _layer_sparsity(config: dict[str, Any]) -> float | None:
    if config.get("sparsity") is not None:
        return float(config["sparsity"])
    if config.get("nnz") is not None and config.get("in_features") and config.get("out_features"):
        return 1.0 - config["nnz"] / (config["in_features"] * config["out_features"])
    return None


def _model_order(name: str) -> tuple[int, int]:
    """(block number, attention before MLP): where a layer sits in the forward pass, from its name alone."""
    number = next((int(part) for part in name.split(".") if part.isdigit()), -1)
    return number, 0 if ("attn" in name or "attention" in name) else 1


def layer_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows for :func:`hiercomp.report.plots.layer_allocation`, in model order.

    Layers inside sub-blocks removed by depth pruning (``removed`` in ``hiercomp.json``) are not in the
    compression report; they become rows marked ``removed`` at their place in the model.
    """
    configs = meta.get("layers", {})
    rows = [{"name": layer["name"], "bits_per_weight": float(layer.get("bits_per_weight", 0.0)),
             "sparsity": _layer_sparsity(configs.get(layer["name"], {})), "removed": False,
             "rel_error": layer.get("rel_output_error")}
            for layer in meta.get("report", {}).get("layers", [])]
    gone = []
    for unit in meta.get("removed", []):
        unit = unit if isinstance(unit, dict) else {"name": str(unit)}
        gone.extend(unit.get("linear_names") or [unit["name"]])
    known = {row["name"] for row in rows}
    rows += [{"name": name, "bits_per_weight": 0.0, "sparsity": None, "removed": True, "rel_error": None}
             for name in gone if name not in known]
    # Report rows are already in model order; a stable sort slots the removed layers in between them.
    return sorted(rows, key=lambda row: _model_order(row["name"])) if gone else rows


def _dense_size(path: Path) -> int | None:
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file() and not f.endswith(".json")]
    files = files or list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _unique_names(paths: list[str]) -> list[str]:
    """Folder names, with the parent added where two variants would otherwise share a name."""
    names = [Path(p).name or p for p in paths]
    clashes = {n for n, count in Counter(names).items() if count > 1}
    return [f"{Path(p).parent.name}/{n}" if n in clashes else n for p, n in zip(paths, names)]


def describe_folder(path: str | Path, name: str) -> Variant:
    """Size, bits and layers of a compressed folder, or the size of an original model folder."""
    from hiercomp.api import saved_size_bytes
    from hiercomp.io.saved import read_meta

    path = Path(path)
    if not path.exists():
        raise HiercompError(f"{path} does not exist; pass folders written by `hiercomp compress`")
    if is_compressed_dir(path):
        meta = read_meta(path)
        report = meta.get("report", {})
        removed = [unit["name"] if isinstance(unit, dict) else str(unit) for unit in meta.get("removed", [])]
        method = method_summary(report.get("layers", []), removed)
        return Variant(name, str(path), method,
                       saved_size_bytes(path)["size_bytes"], report.get("bits_per_weight"), layer_rows(meta),
                       family=method_family(report.get("layers", []), bool(removed)))
    if not (path / "config.json").is_file():
        raise HiercompError(f"{path} is neither a hiercomp folder nor a model folder (no config.json); "
                            "pass folders written by `hiercomp compress`")
    return Variant(name, str(path), "uncompressed", _dense_size(path), None, family="uncompressed")


def load_eval_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HiercompError(f"{path} does not exist; write it with `hiercomp eval DIR --json {path}`") from None
    except json.JSONDecodeError as err:
        raise HiercompError(f"{path} is not JSON ({err.msg} at line {err.lineno}); "
                            "write it with `hiercomp eval DIR --json FILE`") from None
    if not isinstance(data, dict) or "size_bytes" not in data:
        raise HiercompError(f"{path} is not a `hiercomp eval --json` result (no size_bytes); "
                            "write it with `hiercomp eval DIR --json FILE`")
    return data


def _same_path(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _from_json_only(name: str, data: dict[str, Any]) -> Variant:
    model = data.get("model")
    if model and is_compressed_dir(model):
        variant = describe_folder(model, name)
        variant.metrics = data
        return variant
    return Variant(name, model, "(from JSON)", data.get("size_bytes"), data.get("bits_per_weight"), metrics=data)


def collect(dirs: list[str], options: EvalOptions, *, from_json: list[str] = (), cache_dir: Path | None = None,
            refresh: bool = False, progress: bool = True) -> list[Variant]:
    """Every variant's row, the reference (when given) first as the baseline.

    A JSON from ``from_json`` whose ``model`` is one of ``dirs`` replaces that folder's evaluation; the others
    become rows of their own (with the folder's layers when the folder still exists).
    """
    if not dirs and not from_json:
        raise HiercompError("nothing to report: pass compressed folders (or --from-json FILE)")
    jsons = [(str(p), load_eval_json(p)) for p in from_json]
    names = _unique_names(list(dirs) + [data.get("model") or p for p, data in jsons])
    variants: list[Variant] = []
    used_jsons: set[str] = set()
    given = {path: [(p, data) for p, data in jsons if _same_path(data.get("model"), path)] for path in dirs}
    to_measure = [path for path in dirs if not given[path]] if options.wanted else []
    original = None
    if options.reference is not None and to_measure:
        # The original is measured once, first, and every variant's verdicts read these same numbers.
        if progress:
            print(f"report: measuring the original {options.reference}", file=sys.stderr)
        original = evaluate_cached(options.reference, options, with_reference=False, cache_dir=cache_dir,
                                   refresh=refresh, progress=progress)
    for path, name in zip(dirs, names):
        variant = describe_folder(path, name)
        if given[path]:
            used_jsons.add(given[path][0][0])
            variant.metrics = given[path][0][1]
        elif options.wanted:
            if progress:
                print(f"report: measuring {path} ({to_measure.index(path) + 1} of {len(to_measure)})",
                      file=sys.stderr)
            variant.metrics = evaluate_cached(path, options, with_reference=options.reference is not None,
                                              cache_dir=cache_dir, refresh=refresh, progress=progress,
                                              reference_scores=original)
        variants.append(variant)
    for (path, data), name in zip(jsons, names[len(dirs):]):
        if path not in used_jsons:
            variants.append(_from_json_only(name, data))
    if options.reference is not None:
        name = "original (baseline)"
        # A hub id (online users) has no folder to describe: its size comes from the evaluation.
        ref = describe_folder(options.reference, name) if Path(options.reference).exists() else \
            Variant(name, options.reference, "uncompressed", None, None)
        ref.is_reference = True
        ref.metrics = dict(original) if original is not None else reference_metrics(variants)
        if not ref.metrics and options.wanted:  # no variant measured the reference: measure it on its own
            ref.metrics = evaluate_cached(options.reference, options, with_reference=False, cache_dir=cache_dir,
                                          refresh=refresh, progress=progress)
        # The reference compared with itself: no divergence and full agreement, by definition.
        if ref.metrics.get("kind") == "encoder":
            ref.metrics["cosine"] = 1.0
        elif "perplexity" in ref.metrics:
            ref.metrics.update({"kl": 0.0, "top1_agreement": 1.0})
        variants.insert(0, ref)
    return variants


def reference_metrics(variants: list[Variant]) -> dict[str, Any]:
    """The original's own numbers, as every evaluation against it already measured them (``reference_*``)."""
    for variant in variants:
        metrics = variant.metrics
        found = {key.removeprefix("reference_"): value for key, value in metrics.items()
                 if key in ("reference_perplexity", "reference_recall_at_1", "reference_tasks")}
        if found:
            found["kind"] = metrics.get("kind")
            if "reference_size_bytes" in metrics:
                found["size_bytes"] = metrics["reference_size_bytes"]
            return found
    return {}
