"""The KV-cache level: caches that evict, quantize, sparsify or project for real, under one budget.

    from hiercomp.kv import make_cache
    cache = make_cache(model, "snapkv:ratio=0.5+kivi:bits=2")
    model.generate(ids, past_key_values=cache)
    cache.held_bytes(), cache.accounted_bytes()
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.kv import adapter
from hiercomp.kv.base import Budget, Encoder, Evictor
from hiercomp.kv.cache import KVCache
from hiercomp.kv.spec import KVSpec, parse


def make_cache(model: torch.nn.Module, spec: str | KVSpec, store_dtype: torch.dtype | None = None) -> KVCache:
    """A fresh ``KVCache`` for one ``generate``/forward sequence of ``model``, per ``spec`` (a string or a parsed
    ``KVSpec``). ``store_dtype`` (e.g. torch.float16) is the dtype of the tokens kept at full precision; the default
    is the model's compute dtype. Raises a one-line ``HiercompError`` for bad specs or unsupported models."""
    parsed = parse(spec) if isinstance(spec, str) else spec
    adapter.check_supported(model)
    n_layers, _, _ = adapter.model_shape(model)
    if parsed.evictor is not None:
        adapter.install_query_hooks(model)
    return KVCache(n_layers, parsed.evictor, parsed.encoder, store_dtype, parsed.text)


def apply_kv_spec(model: torch.nn.Module, spec: str | None, **kwargs: Any) -> KVCache | None:
    """For commands with ``--kv SPEC``: None for no spec (use transformers' default cache), else ``make_cache``."""
    return None if not spec else make_cache(model, spec, **kwargs)


__all__ = ["Budget", "Encoder", "Evictor", "KVCache", "KVSpec", "apply_kv_spec", "make_cache", "parse"]
