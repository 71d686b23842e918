"""Every contact point with transformers' cache and attention API, in one file.

transformers 5.x moved things between minor versions (see methods/KV_CONTEXT.md §0): the attention kwarg is
``past_key_values`` in 5.2 and ``cache`` in 5.24; ``get_mask_sizes`` takes ``cache_position`` in 5.2 and a query
length in 5.24. Everything here feature-detects, so an upgrade that breaks the cache contract breaks this file only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hiercomp.errors import HiercompError

__all__ = ["Cache", "CacheLayerMixin", "attention_modules", "cache_from_kwargs", "check_supported", "query_length",
           "project_queries"]


def query_length(arg: Any) -> int:
    """``get_mask_sizes``'s argument as a number of new tokens: an int (5.24) or a ``cache_position`` tensor (5.2)."""
    if isinstance(arg, torch.Tensor):
        return int(arg.shape[0])
    return int(arg)


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The cache an attention module was called with (``cache=`` in 5.24, ``past_key_values=`` in 5.2)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise HiercompError(f"{type(model).__name__} has no decoder layers at model.model.layers; hiercomp.kv supports "
                            "Llama/Qwen2/Mistral-family causal LMs")
    return list(layers)


def check_supported(model: torch.nn.Module) -> None:
    """One-line error unless every layer is full self-attention with q/k/v projections and rotary embeddings."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    family = getattr(config, "model_type", type(model).__name__)
    for i, layer_type in enumerate(getattr(config, "layer_types", None) or []):
        if layer_type != "full_attention":
            raise HiercompError(f"{family}: layer {i} uses {layer_type!r} attention; hiercomp.kv supports models whose "
                                "layers are all full attention (Llama, Qwen2, Mistral without sliding window)")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and not getattr(config, "layer_types", None):
        raise HiercompError(f"{family}: sliding-window attention ({window} tokens) is not supported by hiercomp.kv; "
                            "use a config without sliding_window")
    for i, attn in attention_modules(model):
        if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "head_dim")):
            raise HiercompError(f"{family}: attention of layer {i} ({type(attn).__name__}) has no q/k/v projections; "
                                "hiercomp.kv supports Llama/Qwen2/Mistral-family attention")


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) of every decoder layer."""
    out = []
    for i, layer in enumerate(_decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise HiercompError(f"decoder layer {i} of {type(model).__name__} has no self_attn; hiercomp.kv supports "
                                "Llama/Qwen2/Mistral-family causal LMs")
        out.append((int(getattr(attn, "layer_idx", i)), attn))
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_queries(attn: torch.nn.Module, hidden: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The post-RoPE queries [B, H, T, D] the attention module computes from ``hidden`` [B, T, hidden] — the same
    recipe as Llama/Qwen2/Mistral (q_proj, optional q_norm as in Qwen3, rotate-half RoPE with the model's cos/sin)."""
    batch, length = hidden.shape[:2]
    q = attn.q_proj(hidden).view(batch, length, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin


def install_query_hooks(model: torch.nn.Module, observe_attr: str = "observe") -> None:
    """A forward pre-hook on every attention module hands its input hidden states and rotary embeddings to the cache
    it is called with (if that cache has ``observe``), so query-scored methods (SnapKV, H2O, EMS) can recompute the
    queries they need. Installed once per model; caches that need no queries ignore it."""
    if getattr(model, "_hiercomp_kv_hooks", None):
        return
    handles = []
    for layer_idx, attn in attention_modules(model):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, layer_idx: int = layer_idx) -> None:
            cache = cache_from_kwargs(kwargs)
            observe = getattr(cache, observe_attr, None)
            if observe is None:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            observe(layer_idx, module, hidden, kwargs.get("position_embeddings"))
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    model._hiercomp_kv_hooks = handles


def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from the model's config."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword that hands a cache to ``model(...)``/``generate``: ``cache`` where the model's forward takes it
    (5.24), else ``past_key_values`` (5.2; deprecated in 5.24)."""
    import inspect

    from transformers import LlamaModel

    return {"cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values": cache}
