"""transformers' full KV cache, appended in place: the cache `hiercomp generate` decodes with.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies the whole cache
at every token: decode_breakdown.md measured it at ~1 ms of a 10-13 ms SmolLM2 step (60 copies a token), and it
grows with the context. :class:`GrowingLayer` keeps the keys and values in buffers with spare room (half again
what is held, at least 128 tokens) and writes each new token into place; ``keys``/``values`` are views of the
filled part, so everything transformers does with a ``DynamicLayer`` (lengths, masks, crop, reorder) works on them
unchanged. The values are the same tensors' values as ``DynamicCache``'s, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 128  # tokens of room added at least when a buffer grows


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of larger buffers, appended in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _in_buffers(self) -> bool:
        """Whether keys/values still are views at the start of the buffers (a reorder or batch select in
        transformers replaces them with new tensors; a crop keeps them as shorter views)."""
        return (self.keys.data_ptr() == self.key_buffer.data_ptr() and self.keys.stride() == self.key_buffer.stride()
                and self.values.data_ptr() == self.value_buffer.data_ptr())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        need = held + key_states.shape[-2]
        self.make_room(key_states.shape[-2], key_states, value_states)
        self.key_buffer[:, :, held:need] = key_states
        self.value_buffer[:, :, held:need] = value_states
        self.keys = self.key_buffer[:, :, :need]
        self.values = self.value_buffer[:, :, :need]
        return self.keys, self.values

    def make_room(self, tokens: int, key_like: torch.Tensor | None = None,
                  value_like: torch.Tensor | None = None) -> None:
        """Make the buffers hold ``tokens`` more past what is held, with the held keys and values at their start
        (new buffers, half again as large, where they are too small, missing, of another batch or no longer
        behind ``keys``). ``key_like``/``value_like``: the new tokens' shape and dtype (default: the held ones)."""
        key_like = self.keys if key_like is None else key_like
        value_like = self.values if value_like is None else value_like
        held = self.get_seq_length()
        need = held + tokens
        buffer = self.key_buffer
        if buffer is None or need > buffer.shape[-2] or buffer.shape[:2] != key_like.shape[:2] \
                or (held and not self._in_buffers()):
            capacity = need + max(MIN_SPARE, need // 2)
            key_buffer = key_like.new_empty(*key_like.shape[:2], capacity, key_like.shape[-1])
            value_buffer = value_like.new_empty(*value_like.shape[:2], capacity, value_like.shape[-1])
            if held:
                key_buffer[:, :, :held] = self.keys
                value_buffer[:, :, :held] = self.values
            self.key_buffer, self.value_buffer = key_buffer, value_buffer

    def set_length(self, tokens: int) -> None:
        """Hold the first ``tokens`` of the buffers (written there in place, e.g. by the native decode step)."""
        if self.key_buffer is None or tokens > self.key_buffer.shape[-2]:
            raise ValueError(f"the buffers hold no {tokens} tokens")
        self.keys = self.key_buffer[:, :, :tokens]
        self.values = self.value_buffer[:, :, :tokens]

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None

    def held_bytes(self) -> int:
        """Bytes of the buffers (the spare room included: it is held)."""
        buffers = [t for t in (getattr(self, "key_buffer", None), getattr(self, "value_buffer", None))
                   if t is not None]
        return sum(t.numel() * t.element_size() for t in buffers)


class GrowingCache(DynamicCache):
    """``DynamicCache`` with :class:`GrowingLayer` for its full-attention layers (sliding-window layers stay
    transformers' own)."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if getattr(self, "layer_class_to_replicate", None) is DynamicLayer:
            self.layer_class_to_replicate = GrowingLayer

    def held_bytes(self) -> int:
        """What the cache holds, measured from its buffers (what ``hiercomp generate`` reports)."""
        from hiercomp.kv.evaluate import tensor_bytes

        return sum(layer.held_bytes() if isinstance(layer, GrowingLayer) else tensor_bytes(vars(layer))
                   for layer in self.layers)
