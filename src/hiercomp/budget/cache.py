"""The candidate database on disk: one folder per (model, calibration tokens, level, layer set), packed.

Each folder holds ``layers.safetensors`` — every candidate layer's own ``state_dict`` (the packed codes,
float16 scales, bitmaps ... exactly what a saved compressed model holds, never a dense copy) under
``<layer name>.<buffer>`` — and ``meta.json`` with each layer's config (to rebuild it) and its relative output
error. The folder name is a SHA-256 over:

* the model: every state-dict tensor's name, dtype, shape and bytes (so a changed file, or the same weights
  loaded from another path, is recognised by content, not by path);
* the calibration token ids (shape and values);
* the level (method and parameters), the layer names, and :data:`CACHE_VERSION`.

Folders are written atomically (temporary folder, rename), so an interrupted build leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hiercomp.io.atomic import atomic_dir
from hiercomp.io.builtin import cache_root
from hiercomp.layers import CompressedLinear, build_layer

CACHE_VERSION = 1
LAYERS_FILE = "layers.safetensors"
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """``levels/`` under hiercomp's one cache root ($HIERCOMP_CACHE, default ~/.cache/hiercomp), beside the
    converted built-in models."""
    return cache_root() / "levels"


def model_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    data = tokens.detach().to(torch.int64).contiguous().cpu()
    return hashlib.sha256(f"{tuple(data.shape)}|".encode() + data.numpy().tobytes()).hexdigest()


def level_key(model_fp: str, tokens_fp: str, level_params: dict[str, Any], layers: list[str]) -> str:
    """``level_params``: the method's full config, defaults and algorithm version included
    (:meth:`hiercomp.plan.MethodConfig.full_params`), so a changed default never reuses stale candidates."""
    text = json.dumps([CACHE_VERSION, model_fp, tokens_fp, level_params, sorted(layers)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class LevelCache:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def folder(self, key: str) -> Path:
        return self.root / key

    def store(self, key: str, layers: dict[str, CompressedLinear], info: dict[str, Any]) -> None:
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, layer in layers.items()
                   for k, v in layer.state_dict().items()}
        meta = {"version": CACHE_VERSION, "layers": {n: layer.full_config() for n, layer in layers.items()}, **info}
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.folder(key), force=True) as tmp:
            save_file(tensors, str(tmp / LAYERS_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, default=str))

    def load(self, key: str) -> tuple[dict[str, CompressedLinear], dict[str, Any]] | None:
        folder = self.folder(key)
        if not (folder / META_FILE).is_file() or not (folder / LAYERS_FILE).is_file():
            return None
        try:
            meta = json.loads((folder / META_FILE).read_text())
            with safe_open(str(folder / LAYERS_FILE), framework="pt") as handle:
                state = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception:  # a damaged entry is recomputed, not trusted
            return None
        layers: dict[str, CompressedLinear] = {}
        for name, config in meta["layers"].items():
            layer = build_layer(config)
            prefix = f"{name}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            layer.eval()
            layers[name] = layer
        return layers, meta

    def disk_bytes(self, key: str) -> int:
        folder = self.folder(key)
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
