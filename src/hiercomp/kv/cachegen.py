"""CacheGen-style storage of a prefix cache on disk: quantize, then entropy-code with ``constriction``.

What the CacheGen code does (methods/KV_CONTEXT.md §9), with one change: symmetric quantization per (layer, token,
KV head) — CacheGen uses one scale per (layer, token) over all heads, so an outlier head coarsens the others — to
``bins`` levels (more bins in the first third of the layers, which are the most loss-sensitive); then one
probability table per (layer, K/V, channel) from the histogram over tokens, and a range coder (constriction's
``RangeEncoder``, a maintained coder) over all symbols. The file holds the coded words, the fp16 scales and the
integer histograms (the decoder rebuilds the exact same tables from them), so its size is the honest total.

    save_prefix(cache, "prefix.hkv")            # any cache with per-layer keys/values, e.g. a KVCache or DynamicCache
    cache = load_prefix("prefix.hkv", model)    # a DynamicCache of the decoded tensors; generate continues from it
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiercomp.errors import HiercompError

MAGIC = b"HKVCG01\n"


def _coder() -> Any:
    try:
        import constriction
    except ImportError:
        raise HiercompError("CacheGen coding needs the constriction package: pip install constriction") from None
    return constriction


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [B, H_kv, T, D] of a filled cache (a KVCache's stored tokens are decoded)."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "materialize"):
            out.append(layer.materialize())
        else:
            out.append((layer.keys, layer.values))
    return out


def default_bins(n_layers: int, early: int = 32, late: int = 16) -> list[int]:
    """CacheGen's schedule shape: more levels in the first third of the layers."""
    return [early if i < max(1, n_layers // 3) else late for i in range(n_layers)]


def _quantize(x: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    half = bins // 2 - 1  # symbols 0 .. 2·half
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8).half()  # per (b, h, t)
    sym = (x.float() / scale.float() * half).round().clamp(-half, half) + half
    return sym.to(torch.int32).numpy(), scale.numpy()


def _probabilities(counts: np.ndarray, per_symbol_channel: np.ndarray) -> np.ndarray:
    probs = (counts.astype(np.float64) + 1.0)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs[per_symbol_channel]


def save_prefix(cache: Any, path: str | os.PathLike, bins: list[int] | None = None) -> dict[str, int]:
    """Write the cache as an entropy-coded bitstream; returns the byte counts (total, coded words, scales, tables)."""
    constriction = _coder()
    tensors = layer_tensors(cache)
    bins = bins or default_bins(len(tensors))
    header: dict[str, Any] = {"layers": [], "dtype": str(tensors[0][0].dtype).replace("torch.", "")}
    blobs: list[bytes] = []
    sizes = {"words": 0, "scales": 0, "tables": 0}
    family = constriction.stream.model.Categorical(perfect=False)
    for li, (keys, values) in enumerate(tensors):
        entry = {"shape": list(keys.shape), "bins": bins[li]}
        for name, x in (("k", keys), ("v", values)):
            sym, scale = _quantize(x, bins[li])
            b, h, t, d = sym.shape
            # channel = (head, dim); histogram over batch and tokens
            per_channel = sym.transpose(1, 3, 0, 2).reshape(h * d, b * t)
            counts = np.stack([np.bincount(row, minlength=bins[li] - 1) for row in per_channel]).astype(np.uint16)
            channel_of = np.repeat(np.arange(h * d), b * t)
            encoder = constriction.stream.queue.RangeEncoder()
            encoder.encode(per_channel.reshape(-1).astype(np.int32), family, _probabilities(counts, channel_of))
            words = encoder.get_compressed()
            for kind, arr in (("words", words), ("scales", scale), ("tables", counts)):
                raw = np.ascontiguousarray(arr).tobytes()
                entry[f"{name}_{kind}"] = len(raw)
                sizes[kind] += len(raw)
                blobs.append(raw)
        header["layers"].append(entry)
    head = json.dumps(header).encode()
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)
    sizes["total"] = Path(path).stat().st_size
    return sizes


def load_prefix(path: str | os.PathLike, model: torch.nn.Module | None = None) -> Any:
    """Decode a file written by ``save_prefix`` into a ``DynamicCache``; a damaged file is a one-line error."""
    from transformers import DynamicCache

    constriction = _coder()
    data = Path(path).read_bytes()
    try:
        if not data.startswith(MAGIC):
            raise ValueError("bad magic")
        (n_head,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
        offset = len(MAGIC) + 4 + n_head
        header = json.loads(data[len(MAGIC) + 4:offset])
        dtype = getattr(torch, header["dtype"])
        family = constriction.stream.model.Categorical(perfect=False)
        cache = DynamicCache(config=model.config) if model is not None else DynamicCache()
        for li, entry in enumerate(header["layers"]):
            b, h, t, d = entry["shape"]
            half = entry["bins"] // 2 - 1
            decoded = []
            for name in ("k", "v"):
                parts = {}
                for kind in ("words", "scales", "tables"):
                    n = entry[f"{name}_{kind}"]
                    parts[kind] = data[offset:offset + n]
                    offset += n
                    if len(parts[kind]) != n:
                        raise ValueError("truncated")
                counts = np.frombuffer(parts["tables"], dtype=np.uint16).reshape(h * d, entry["bins"] - 1)
                channel_of = np.repeat(np.arange(h * d), b * t)
                decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(parts["words"], dtype=np.uint32))
                sym = decoder.decode(family, _probabilities(counts, channel_of))
                sym = torch.from_numpy(np.asarray(sym).reshape(h, d, b, t).transpose(2, 0, 3, 1).copy())
                scale = torch.from_numpy(np.frombuffer(parts["scales"], dtype=np.float16).reshape(b, h, t, 1).copy())
                decoded.append(((sym.float() - half) / half * scale.float()).to(dtype))
            cache.update(decoded[0], decoded[1], li)
        if offset != len(data):
            raise ValueError("trailing bytes")
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as err:
        raise HiercompError(f"{path} is not a readable hiercomp KV bitstream ({err}); re-save the prefix") from None
    return cache


def reference_sizes(cache: Any) -> dict[str, int]:
    """Bytes of the same tensors as fp16 and as per-token 8-bit codes with an fp16 scale per (token, head)."""
    fp16 = eight = 0
    for keys, values in layer_tensors(cache):
        for x in (keys, values):
            fp16 += x.numel() * 2
            eight += x.numel() + x[..., 0].numel() * 2
    return {"fp16": fp16, "int8": eight}
