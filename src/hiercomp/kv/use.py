"""Running a model through a KV spec, as `hiercomp eval --kv` and `hiercomp generate --kv` do.

One convention for both commands (the same as `hiercomp kv eval`'s default): the tokens a cache keeps at full
precision are stored in 16 bits (the model's dtype when it is already 16-bit, else float16, since CPU models run in
float32), and "the full cache" it is compared with is every token seen, keys and values, at 16 bits. The bytes held
are measured from the cache's tensors (``KVCache.held_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hiercomp.kv import adapter, make_cache
from hiercomp.kv.spec import KVSpec, parse


def store_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the tokens a cache keeps at full precision: the model's if 16-bit, else float16."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point and torch.finfo(dtype).bits == 16 else torch.float16


def full_cache_bytes(model: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    """Bytes of an uncompressed 16-bit cache holding ``tokens`` per sequence: keys and values of every layer."""
    layers, kv_heads, head_dim = adapter.model_shape(model)
    return 2 * layers * kv_heads * head_dim * tokens * batch * 2


def resolve(given: str | None, loaded: Any = None) -> tuple[KVSpec | None, str | None]:
    """(spec to run with, note) from ``--kv`` and the loaded model's default (``kv_spec``, from a plan such as
    `hiercomp plan-memory` writes; None when absent). ``--kv none`` asks for the full cache even when the folder
    names a spec. The spec is None for the full cache (transformers' own). Bad specs raise a one-line error."""
    note = None
    if given is None:
        given = getattr(loaded, "kv_spec", None)
        if not given:
            return None, None
        note = f"KV cache {given} (the compressed folder's default, from its plan; --kv none for the full cache)"
    spec = parse(given)
    return (None if spec.is_exact else spec), note


class CacheMaker:
    """A factory of fresh ``KVCache``s of one spec for one model, which keeps what the caches it made held.

    ``last`` is the most recent cache; ``finished`` lists (bytes held, logical tokens, batch) of each earlier one,
    measured when the next was made (so only one cache is alive at a time, however many questions a task runs;
    choice scoring repeats a question's cache once per choice, hence the batch)."""

    def __init__(self, model: torch.nn.Module, spec: KVSpec) -> None:
        self.model, self.spec = model, spec
        self.dtype = store_dtype(model)
        self.last: Any = None
        self.finished: list[tuple[int, int, int]] = []

    def __call__(self, model: torch.nn.Module | None = None) -> Any:
        self._retire()
        self.last = make_cache(model if model is not None else self.model, self.spec, store_dtype=self.dtype)
        return self.last

    def _retire(self) -> None:
        if self.last is not None and self.last.get_seq_length() > 0:
            self.finished.append((self.last.held_bytes(), self.last.get_seq_length(), self.last.layers[0].batch))
        self.last = None

    def summary(self) -> dict[str, Any]:
        """Mean bytes held per sequence at its end, the 16-bit full cache of the same tokens, and their ratio."""
        self._retire()
        if not self.finished:
            return {"kv": self.spec.text, "kv_sequences": 0}
        held = sum(b for b, _, _ in self.finished) / len(self.finished)
        full = sum(full_cache_bytes(self.model, t, n) for _, t, n in self.finished) / len(self.finished)
        return {"kv": self.spec.text, "kv_sequences": len(self.finished), "kv_bytes": held,
                "kv_full_bytes": full, "kv_factor": full / held if held else float("inf")}


class ThroughCache(torch.nn.Module):
    """``model``, except that every forward that starts a sequence (no cache passed) gets a fresh cache from
    ``make``: code that calls ``model(ids, use_cache=True)`` then feeds the returned cache back (the task runner's
    greedy decoding and choice scoring) then runs through the compressed cache without knowing it."""

    def __init__(self, model: torch.nn.Module, make: Callable[[], Any]) -> None:
        super().__init__()
        self.inner, self.make = model, make
        self.config = model.config

    def forward(self, input_ids: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any) -> Any:
        cache = past_key_values if past_key_values is not None else self.make()
        kwargs["use_cache"] = True
        return self.inner(input_ids=input_ids, **adapter.cache_kwargs(cache), **kwargs)
