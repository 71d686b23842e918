"""The saved form of a compressed model and the way back.

A folder holds:
- ``model.safetensors``: the model's ``state_dict`` — dense parameters as they were, compressed layers as
  their packed buffers (uint8 codes, float16 scales, ...); tensors shared by tied weights stored once;
- ``config.json`` (+ tokenizer files): the original Hugging Face config, so the skeleton can be rebuilt;
- ``hiercomp.json``: format version, model class, each compressed layer's config, the compression report,
  and ``removed``: the sub-blocks / blocks removed by depth pruning (re-applied before loading the state);
- ``recipe.yaml``: the recipe that made it, readable and re-usable.
Loading rebuilds the skeleton from the config, swaps in empty compressed layers of the saved shapes and
loads the state dict: the logits are bit-identical to the compressed model that was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers, set_module
from hiercomp.io.atomic import atomic_dir
from hiercomp.layers import build_layer

FORMAT_NAME = "hiercomp"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "hiercomp.json"


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without duplicate storage (tied weights): tensors to write, and alias -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.storage_offset())
        key = key if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def save_compressed(
    model: nn.Module, out: str | Path, *, tokenizer: Any = None, recipe_yaml: str | None = None,
    meta: dict[str, Any] | None = None, force: bool = False,
) -> Path:
    """Write ``model`` (with its compressed layers) to ``out`` atomically. Returns the folder."""
    tensors, aliases = _unique_state(model)
    layers = {name: layer.full_config() for name, layer in compressed_layers(model).items()}
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": layers,
        "aliases": aliases,
    }
    info.update(meta or {})
    if "removed" not in info:  # units removed by hand (hiercomp.depth.remove_subblocks): load must re-apply them
        from hiercomp.depth.standins import RemovedSubBlock

        if any(isinstance(m, RemovedSubBlock) for m in model.modules()):
            from hiercomp.depth import removed_subblocks

            info["removed"] = [{"name": name} for name in removed_subblocks(model)]
    with atomic_dir(out, force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": FORMAT_NAME})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / META_FILE).write_text(json.dumps(info, indent=1, default=str))
    return Path(out)


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    try:
        info = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise HiercompError(f"{path} is not a hiercomp folder (no {META_FILE}); "
                            "compress a model into it first") from None
    except json.JSONDecodeError as err:
        raise HiercompError(f"{meta_path} is damaged ({err.msg}); compress the model again") from None
    if info.get("format") != FORMAT_NAME or info.get("format_version", 0) > FORMAT_VERSION:
        raise HiercompError(f"{meta_path} has format version {info.get('format_version')}; this hiercomp reads "
                            f"version {FORMAT_VERSION} — upgrade hiercomp")
    return info


def build_skeleton(path: str | Path, info: dict[str, Any]) -> nn.Module:
    """The model class from its config, in the saved dtype, with compressed layers swapped in (empty)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, info["model_class"], None)
    if cls is None:
        raise HiercompError(f"this transformers version has no {info['model_class']}; upgrade transformers")
    dtype = getattr(torch, info.get("dtype", "float32"))
    model = cls(config).to(dtype)
    removed = [row["name"] for row in info.get("removed", [])]
    if removed:  # depth pruning: the same stand-ins as when saved, so the state keys match
        from hiercomp.depth import remove_subblocks

        remove_subblocks(model, removed)
    for name, layer_cfg in info["layers"].items():
        set_module(model, name, build_layer(layer_cfg))
    return model


def load_compressed(path: str | Path) -> nn.Module:
    path = Path(path)
    info = read_meta(path)
    model = build_skeleton(path, info)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise HiercompError(f"{path} has no {WEIGHTS_FILE}; the folder is incomplete — compress the model again")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise HiercompError(f"{weights} is damaged ({str(err).splitlines()[0]}); compress the model again") from None
    for alias, stored in info.get("aliases", {}).items():
        state[alias] = state[stored]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HiercompError(f"{weights} does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); "
                            "compress the model again")
    model.eval()
    return model


def safetensors_header_bytes(path: str | Path) -> int:
    """Size of a safetensors file's header (8-byte length + JSON), i.e. what is not tensor data."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")
