"""``KVCache``: a transformers cache whose layers evict and encode for real (the bytes held are the bytes counted).

Each layer holds, per sequence and KV head, the same number of physical tokens (so attention stays a rectangular
tensor op and transformers' shared causal mask stays valid), as

    encoded block (tokens older than the encoder's window, in the encoder's format)  ++  tail (store dtype)

plus the evictor's per-token state (H2O's accumulated attention). ``get_seq_length`` is the *logical* length (every
token seen) so that positions and ``generate``'s prompt slicing stay right; ``get_mask_sizes`` returns the physical
length and the number of evicted tokens as offset (recipe of methods/KV_CONTEXT.md §0, checked there against a
masked full cache).

Every update returns the stored past, decoded, followed by the new tokens exactly: the current step always attends
to its own tokens at full precision (as KIVI, kvpress and HF's QuantizedCache do), and compression applies to what
is kept for later steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hiercomp.errors import HiercompError
from hiercomp.kv import adapter
from hiercomp.kv.base import Encoder, Evictor, ScoreContext, gather_tokens


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class KVLayer(adapter.CacheLayerMixin):
    """One layer of a ``KVCache`` (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, evictor: Evictor | None, encoder: Encoder | None, store_dtype: torch.dtype | None,
                 n_layers: int, layer_idx: int):
        super().__init__()
        self.evictor, self.encoder, self.store_dtype = evictor, encoder, store_dtype
        self.n_layers, self.layer_idx = n_layers, layer_idx
        self.logical = 0
        self.n_keep: int | None = None
        self.short_prefills = 0  # prefills too short for the budget: sink + window kept instead (see below)
        self.encoded: dict[str, torch.Tensor] | None = None
        self.n_encoded = 0
        self.state: dict[str, torch.Tensor] = {}
        self.pending: tuple[Any, torch.Tensor, Any] | None = None

    # --- transformers' layer contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.compute_dtype = key_states.dtype
        self.store_dtype = self.store_dtype or key_states.dtype
        self.batch, self.heads, _, self.head_dim = key_states.shape
        empty = key_states.new_zeros((self.batch, self.heads, 0, self.head_dim), dtype=self.store_dtype)
        self.keys, self.values = empty, empty.clone()
        if self.encoder is not None:
            self.encoder.prepare(self.layer_idx, self.heads, self.head_dim)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.logical

    def physical_length(self) -> int:
        return self.n_encoded + (self.keys.shape[2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        q = adapter.query_length(query_length)
        physical = self.physical_length()
        return physical + q, self.logical - physical

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 5.2 name
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.logical, self.n_keep, self.encoded, self.n_encoded, self.state = 0, None, None, 0, {}

    def crop(self, tokens_to_remove: int) -> None:
        raise HiercompError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def _tensors(self) -> list[torch.Tensor]:
        out = [self.keys, self.values, *self.state.values()]
        return out + list((self.encoded or {}).values())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.state = {k: fn(v) for k, v in self.state.items()}
        if self.encoded is not None:
            self.encoded = {k: fn(v) for k, v in self.encoded.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))
        self.batch *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices].contiguous())
        self.batch = self.keys.shape[0]

    # --- storage --------------------------------------------------------------------------------------------------
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token decoded to the compute dtype, [B, H_kv, S_phys, D] (transient)."""
        tail_k, tail_v = self.keys.to(self.compute_dtype), self.values.to(self.compute_dtype)
        if self.encoded is None or self.n_encoded == 0:
            return tail_k, tail_v
        enc_k, enc_v = self.encoder.decode(self.encoded, self.compute_dtype)
        return torch.cat([enc_k, tail_k], dim=2), torch.cat([enc_v, tail_v], dim=2)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the whole store with these tokens: the oldest whole chunks beyond the window are encoded."""
        n = keys.shape[2]
        n_enc = 0
        if self.encoder is not None:
            chunk = self.encoder.chunk
            n_enc = max(n - self.encoder.residual, 0) // chunk * chunk
        self.encoded = self.encoder.encode(keys[:, :, :n_enc], values[:, :, :n_enc]) if n_enc else None
        self.n_encoded = n_enc
        self.keys = keys[:, :, n_enc:].to(self.store_dtype).contiguous().clone()
        self.values = values[:, :, n_enc:].to(self.store_dtype).contiguous().clone()

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new tokens to the tail; move whole chunks that left the window into the encoded block."""
        self.keys = torch.cat([self.keys, keys.to(self.store_dtype)], dim=2)
        self.values = torch.cat([self.values, values.to(self.store_dtype)], dim=2)
        if self.encoder is None:
            return
        chunk = self.encoder.chunk
        n_move = max(self.keys.shape[2] - self.encoder.residual, 0) // chunk * chunk
        if n_move == 0:
            return
        block = self.encoder.encode(self.keys[:, :, :n_move].to(self.compute_dtype),
                                    self.values[:, :, :n_move].to(self.compute_dtype), self.encoded)
        if self.encoded is None:
            self.encoded = block
        else:
            self.encoded = {k: v if k.startswith("fixed_") else torch.cat([self.encoded[k], v], dim=2)
                            for k, v in block.items()}
        self.n_encoded += n_move
        self.keys = self.keys[:, :, n_move:].contiguous().clone()
        self.values = self.values[:, :, n_move:].contiguous().clone()

    def bytes_for_tokens(self, n: int) -> float:
        """The bytes this layer holds with ``n`` tokens per sequence and head (the accounting formula)."""
        elem = torch.empty((), dtype=self.store_dtype).element_size()
        tail_bytes = 2 * self.heads * self.head_dim * elem
        state_bytes = sum(t.element_size() * self.heads for t in self.state.values())
        n_enc = 0
        if self.encoder is not None:
            n_enc = max(n - self.encoder.residual, 0) // self.encoder.chunk * self.encoder.chunk
        enc = self.encoder.bytes_per_token(self.heads, self.head_dim) if self.encoder is not None else 0.0
        fixed = self.encoder.fixed_bytes(self.heads, self.head_dim) if n_enc else 0.0
        return self.batch * (n_enc * enc + fixed + (n - n_enc) * tail_bytes + n * state_bytes)

    def accounted_bytes(self) -> float:
        if not self.is_initialized:
            return 0.0
        elem = self.keys.element_size()
        tail = 2 * self.batch * self.heads * self.keys.shape[2] * self.head_dim * elem
        state = sum(t.numel() * t.element_size() for t in self.state.values())
        enc = 0.0
        if self.encoder is not None and self.n_encoded:
            per_token = self.encoder.bytes_per_token(self.heads, self.head_dim)
            enc = self.batch * (self.n_encoded * per_token + self.encoder.fixed_bytes(self.heads, self.head_dim))
        return tail + state + enc

    def held_bytes(self) -> int:
        return _storage_bytes(self._tensors()) if self.is_initialized else 0

    # --- the update -----------------------------------------------------------------------------------------------
    def _queries_fn(self):
        if self.pending is None:
            return None
        module, hidden, pos = self.pending

        def queries(n: int) -> torch.Tensor:
            cos, sin = pos
            with torch.no_grad():
                return adapter.project_queries(module, hidden[:, -n:], (cos[:, -n:], sin[:, -n:]))
        return queries

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        is_prefill = self.logical == 0
        past_k, past_v = self.materialize()
        full_k = torch.cat([past_k, key_states], dim=2)
        full_v = torch.cat([past_v, value_states], dim=2)
        n_new = key_states.shape[2]
        self.logical += n_new
        if self.evictor is None:
            self._append(key_states, value_states)
            return full_k, full_v
        self._evict_or_append(full_k, full_v, key_states, value_states, n_new, is_prefill)
        self.pending = None
        return full_k, full_v

    def _evict_or_append(self, full_k: torch.Tensor, full_v: torch.Tensor, key_states: torch.Tensor,
                         value_states: torch.Tensor, n_new: int, is_prefill: bool) -> None:
        evictor = self.evictor
        self.state = {k: torch.cat([v, v.new_zeros((*v.shape[:2], n_new))], dim=2) for k, v in self.state.items()}
        ctx = ScoreContext(full_k, full_v, n_new, is_prefill, self._queries_fn(), self.state)
        evictor.observe(ctx)
        self.state = ctx.state
        if is_prefill:
            keep = evictor.budget.keep_tokens(full_k.shape[2],
                                              lambda n: self.n_layers * self.bytes_for_tokens(n))
            if keep < evictor.protected():
                # A ratio (or byte) budget on a prompt shorter than sink + window would keep fewer tokens than
                # the method always protects: keep those instead (the prompt is compressed less than asked; the
                # bytes held say by how much) rather than fail a whole evaluation on one short question. Token
                # budgets below sink + window are refused when the spec is parsed.
                keep = evictor.protected()
                self.short_prefills += 1
            self.n_keep = keep
        physical = full_k.shape[2]
        # a composed cache evicts once per encoder chunk during decode, so re-encoding is amortised
        slack = self.encoder.chunk if (self.encoder is not None and not is_prefill) else 0
        if physical <= self.n_keep + slack or not (is_prefill or evictor.decode_evict):
            self._append(key_states, value_states)
            return
        scores = evictor.scores(ctx)
        kept = scores.topk(self.n_keep, dim=-1).indices.sort(dim=-1).values
        new_k, new_v = evictor.reduce(ctx, kept, scores)
        self.state = {k: gather_tokens(v, kept).contiguous() for k, v in ctx.state.items()}
        self._store(new_k, new_v)


class KVCache(adapter.Cache):
    """A transformers ``Cache`` of ``KVLayer``s; pass it as ``past_key_values=`` to ``model(...)``/``generate``.

    Build it with ``hiercomp.kv.make_cache(model, spec)`` (which also hooks the attention modules for the
    query-scored methods)."""

    def __init__(self, n_layers: int, evictor: Evictor | None = None, encoder: Encoder | None = None,
                 store_dtype: torch.dtype | None = None, spec: str = ""):
        layers = [KVLayer(evictor, encoder, store_dtype, n_layers, i) for i in range(n_layers)]
        super().__init__(layers=layers)
        self.evictor, self.encoder, self.spec = evictor, encoder, spec

    def observe(self, layer_idx: int, module: Any, hidden: torch.Tensor, position_embeddings: Any) -> None:
        if self.evictor is not None and layer_idx < len(self.layers) and position_embeddings is not None:
            self.layers[layer_idx].pending = (module, hidden, position_embeddings)

    def held_bytes(self) -> int:
        """Bytes of every tensor the cache holds, measured from the tensors' storage."""
        return sum(layer.held_bytes() for layer in self.layers)

    def accounted_bytes(self) -> float:
        """Bytes by the formula: tokens × (encoded bytes per token or store-dtype bytes) + per-token state."""
        return sum(layer.accounted_bytes() for layer in self.layers)

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length() for layer in self.layers]
