"""Budgets and the exact cost of a plan.

A budget is one number in one unit:

* ``3.0bpw``: bits per weight over the *compressible* layers (the linear layers inside the transformer
  blocks; embeddings, lm_head and norms are not counted here). A layer costs its
  :meth:`~hiercomp.layers.CompressedLinear.storage_bits` (codes, scales, zeros, masks, indices, bias); a removed
  layer costs 0 bits but its weights stay in the denominator.
* ``150KB``, ``2.5GB``, ``300MiB``, ``123456B``: bytes of the saved weights file (``model.safetensors``).
  KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024 (IEC).
* ``0.25x``: a fraction of the *original* model's weights file, counted with the same formula below.

Saved size of a plan, in bytes, an upper bound on ``model.safetensors`` that is exact up to the JSON header's
number widths:

    size = 8 (header length) + 2 (braces) + len(metadata entry) + 7 (padding to 8)
           + Σ over stored tensors [ tensor.nbytes + len('"name":{"dtype":"..","shape":[..],"data_offsets":[O,O]},') ]

where every offset O is counted with 20 digits (the widest u64), so the real header is never longer; tensor
bytes are the packed buffers themselves (storage_bits rounded up to whole bytes per tensor); tied tensors are
counted once, as they are saved. The allowance overshoots by at most ~30 bytes per tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.io.saved import SAFETENSORS_METADATA, _unique_state  # exactly what the saver writes

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]+)\s*$")
# safetensors' dtype names, as they appear in the header.
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
OFFSET_DIGITS = 20
METADATA = SAFETENSORS_METADATA


@dataclass(frozen=True)
class Budget:
    """A target: ``unit`` is "bpw", "bytes" or "ratio"; ``value`` in that unit; ``text`` as the user wrote it."""

    unit: str
    value: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_budget(text: str | float) -> Budget:
    """``"3.0bpw"`` | ``"150KB"`` / ``"2.5GB"`` / ``"300MiB"`` / ``"5000B"`` | ``"0.25x"`` -> :class:`Budget`."""
    raw = str(text).strip()
    match = _BUDGET_RE.match(raw)
    if match is None:
        raise HiercompError(f"cannot read budget {raw!r}; write e.g. 3.0bpw, 150KB, 2.5GB, 300MiB or 0.25x")
    number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise HiercompError(f"budget {raw!r} must be positive")
    if unit.lower() == "bpw":
        return Budget("bpw", number, raw)
    if unit.lower() == "x":
        if number > 1:
            raise HiercompError(f"ratio budget {raw!r} must be at most 1x (a fraction of the original size)")
        return Budget("ratio", number, raw)
    factor = UNITS.get(unit.upper())
    if factor is None:
        raise HiercompError(f"unknown budget unit {unit!r} in {raw!r}; use bpw, B, KB, MB, GB, KiB, MiB, GiB or x")
    return Budget("bytes", number * factor, raw)


def header_entry_bytes(name: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> int:
    """Upper bound on one tensor's entry in a safetensors JSON header (offsets counted at 20 digits)."""
    offsets = "9" * OFFSET_DIGITS
    entry = {name: {"dtype": _ST_DTYPES.get(dtype, "F32"), "shape": list(shape), "data_offsets": [0, 0]}}
    text = json.dumps(entry, separators=(",", ":"))[1:-1].replace("[0,0]", f"[{offsets},{offsets}]")
    return len(text.encode()) + 1  # the comma after it


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes these tensors take in a safetensors file: data plus their header entries (upper bound)."""
    return sum(t.numel() * t.element_size() + header_entry_bytes(name, t.dtype, tuple(t.shape))
               for name, t in tensors.items())


def file_overhead_bytes() -> int:
    """Header length field, braces, the metadata entry and up to 7 bytes of padding."""
    meta = len(json.dumps({"__metadata__": METADATA}, separators=(",", ":"))[1:-1].encode()) + 1
    return 8 + 2 + meta + 7


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return _unique_state(model)[0]


@dataclass(frozen=True)
class SizeModel:
    """How a model's saved size splits into the compressible layers and everything else.

    ``fixed_bytes``: every stored tensor outside the compressible layers plus the file overhead;
    ``layer_weights``: weights per compressible layer (the bpw denominator);
    ``dense_layer_bytes``: each compressible layer as it is in the original (weight + bias + header entries).
    """

    layer_weights: dict[str, int]
    fixed_bytes: int
    dense_layer_bytes: dict[str, int]

    @classmethod
    def of(cls, model: nn.Module, layers: list[str]) -> SizeModel:
        tensors = _unique_tensors(model)
        prefixes = tuple(f"{name}." for name in layers)
        fixed = {k: t for k, t in tensors.items() if not k.startswith(prefixes)}
        weights, dense = {}, {}
        for name in layers:
            module = model.get_submodule(name)
            own = {f"{name}.{k}": t for k, t in module.state_dict().items()}
            dense[name] = tensors_bytes(own)
            weight = own[f"{name}.weight"]
            weights[name] = weight.numel()
        return cls(weights, tensors_bytes(fixed) + file_overhead_bytes(), dense)

    @property
    def total_weights(self) -> int:
        return sum(self.layer_weights.values())

    @property
    def original_bytes(self) -> int:
        return self.fixed_bytes + sum(self.dense_layer_bytes.values())

    def limit(self, budget: Budget) -> tuple[str, int]:
        """The budget as an integer limit on the layers' summed cost: ("bits", max bits) or ("bytes", max bytes)."""
        if budget.unit == "bpw":
            return "bits", int(budget.value * self.total_weights)  # floor: never above the budget
        total = budget.value if budget.unit == "bytes" else budget.value * self.original_bytes
        return "bytes", int(total) - self.fixed_bytes

    def describe(self, unit: str, layer_cost: int) -> str:
        """A summed layer cost in the budget's own words."""
        if unit == "bits":
            return f"{layer_cost / self.total_weights:.4f}bpw"
        return f"{self.fixed_bytes + layer_cost}B"

    def report(self, bits: int, nbytes: int) -> dict[str, float]:
        """Bits per weight and saved bytes of a plan from its summed layer bits and bytes."""
        size = self.fixed_bytes + nbytes
        return {"bits_per_weight": bits / self.total_weights, "size_bytes": size,
                "ratio_of_original": size / self.original_bytes}
