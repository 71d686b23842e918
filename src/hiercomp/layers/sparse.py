"""Sparse weights: kept values (float16 by default) plus where they are.

Two position formats, chosen by the pattern:
- unstructured: a bitmap, one bit per weight (1 = kept), row-major;
- N:M (N kept in every M consecutive weights of a row, NVIDIA's convention; 2:4 is the usual one):
  for each kept value, its index inside its run of M, in ceil(log2 M) bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear, dtype_bits, register_layer
from hiercomp.layers.packing import pack_bits, packed_nbytes, unpack_bits


def nm_index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


@register_layer
class SparseLinear(CompressedLinear):
    kind = "sparse"

    def __init__(
        self,
        weight: torch.Tensor | None,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None,
        origin: str = "linear",
        nm: tuple[int, int] | None = None,
        value_dtype: torch.dtype = torch.float16,
        shape: tuple[int, int] | None = None,
        nnz: int | None = None,
    ) -> None:
        out_features, in_features = weight.shape if weight is not None else shape
        super().__init__(in_features, out_features, bias, origin)
        self.nm = nm
        self.value_dtype = value_dtype
        if nm is not None and in_features % nm[1]:
            raise ValueError(f"{nm[0]}:{nm[1]} sparsity needs the input width ({in_features}) to be a multiple "
                             f"of {nm[1]}")
        if weight is None:
            count = nnz if nm is None else out_features * in_features // nm[1] * nm[0]
            self.register_buffer("values", torch.empty(count, dtype=value_dtype))
            if nm is None:
                self.register_buffer("mask_bits", torch.empty(packed_nbytes(out_features * in_features, 1),
                                                              dtype=torch.uint8))
            else:
                self.register_buffer("indices", torch.empty(packed_nbytes(count, nm_index_bits(nm[1])),
                                                            dtype=torch.uint8))
            return
        mask = mask.bool()
        if nm is None:
            self.register_buffer("mask_bits", pack_bits(mask.to(torch.int32), 1))
            self.register_buffer("values", weight[mask].to(value_dtype))
        else:
            n, m = nm
            runs = mask.view(out_features, in_features // m, m)
            if not bool((runs.sum(dim=2) == n).all()):
                raise ValueError(f"mask does not keep exactly {n} of every {m} weights")
            # Positions of the kept entries inside each run, in increasing order.
            pos = torch.arange(m).expand_as(runs)
            kept_pos = torch.sort(torch.where(runs, pos, m + pos), dim=2).values[..., :n]
            self.register_buffer("indices", pack_bits(kept_pos.reshape(-1), nm_index_bits(m)))
            w_runs = weight.view(out_features, in_features // m, m)
            self.register_buffer("values", torch.gather(w_runs, 2, kept_pos).reshape(-1).to(value_dtype))

    def mask(self) -> torch.Tensor:
        if self.nm is None:
            return unpack_bits(self.mask_bits, 1, self.out_features * self.in_features).view(
                self.out_features, self.in_features).bool()
        n, m = self.nm
        runs = self.out_features * self.in_features // m
        pos = unpack_bits(self.indices, nm_index_bits(m), runs * n).view(runs, n).long()
        mask = torch.zeros(runs, m, dtype=torch.bool)
        mask.scatter_(1, pos, True)
        return mask.view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        weight = torch.zeros(self.out_features, self.in_features, dtype=torch.float32)
        weight[self.mask()] = self.values.float()
        return weight

    def weight_storage_bits(self) -> dict[str, int]:
        bits = {"values": self.values.numel() * dtype_bits(self.value_dtype)}
        if self.nm is None:
            bits["mask"] = self.out_features * self.in_features
        else:
            bits["indices"] = self.values.numel() * nm_index_bits(self.nm[1])
        return bits

    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / (self.out_features * self.in_features)

    def layer_config(self) -> dict[str, Any]:
        return {"nm": None if self.nm is None else list(self.nm),
                "value_dtype": str(self.value_dtype).removeprefix("torch."),
                "nnz": self.values.numel()}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> SparseLinear:
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        nm = None if config["nm"] is None else tuple(config["nm"])
        return cls(None, None, bias, config["origin"], nm, getattr(torch, config["value_dtype"]),
                   shape=(config["out_features"], config["in_features"]), nnz=config["nnz"])
