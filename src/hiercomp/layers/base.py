"""The compressed-layer protocol: an nn.Module that holds a packed weight and computes with it.

Every stored tensor is a registered buffer, so ``state_dict()`` is exactly what goes to disk and the
model's own ``load_state_dict`` restores it bit for bit. Each layer counts its own storage in bits,
component by component (codes, scales, zeros, mask, indices, values, bias), from logical counts; the
buffers hold exactly that many bits rounded up to whole bytes per tensor.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LAYER_TYPES: dict[str, type[CompressedLinear]] = {}


def register_layer(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    LAYER_TYPES[cls.__name__] = cls
    return cls


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


class CompressedLinear(nn.Module):
    """Base class. Subclasses implement ``dequantize`` (weight as (out, in) float32), ``storage_bits``
    (a dict of component -> bits, bias excluded), ``layer_config`` and ``empty(config)``."""

    kind: ClassVar[str] = "compressed"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, origin: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # "linear" or "conv1d" (GPT-2's transposed Conv1D): export writes the weight back the same way.
        self.origin = origin
        # The fast compute path (hiercomp.layers.kernels), or None: the reference path below. Not a buffer:
        # it is derived from the stored ones, never saved.
        self.kernel = None
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    # -- to implement -------------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_storage_bits(self) -> dict[str, int]:
        raise NotImplementedError

    def layer_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> CompressedLinear:
        """A layer with correctly shaped, uninitialised buffers, to be filled by load_state_dict."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    def storage_bits(self) -> dict[str, int]:
        bits = dict(self.weight_storage_bits())
        if self.bias is not None:
            bits["bias"] = self.bias.numel() * dtype_bits(self.bias.dtype)
        return bits

    def total_bits(self) -> int:
        return sum(self.storage_bits().values())

    def bits_per_weight(self) -> float:
        return self.total_bits() / (self.in_features * self.out_features)

    def full_config(self) -> dict[str, Any]:
        cfg = {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "origin": self.origin,
            "bias_dtype": None if self.bias is None else str(self.bias.dtype).removeprefix("torch."),
        }
        cfg.update(self.layer_config())
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.device.type == "cpu":
            return self.kernel_forward(x)
        weight = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def release_stored(self) -> None:
        """Drop stored buffers that the attached kernel can give back exactly (only a memory saving; layers
        that cannot give them back keep them)."""

    def restore_stored(self) -> None:
        """Undo :meth:`release_stored`."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.restore_stored()
        self.kernel = None  # built from the old buffers: stale now (set_runtime builds it again)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.reshape(-1, self.in_features)).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def to_linear(self) -> nn.Module:
        """A plain dense module with the dequantized weight (nn.Linear, or Conv1D where it came from one)."""
        weight = self.dequantize()
        if self.origin == "conv1d":
            from transformers.pytorch_utils import Conv1D

            module: nn.Module = Conv1D(self.out_features, self.in_features)
            module.weight.data = weight.t().contiguous()
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            module.weight.data = weight
        if self.bias is not None:
            module.bias.data = self.bias.clone()
        return module

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.bits_per_weight():.3f} bpw"


def build_layer(config: dict[str, Any]) -> CompressedLinear:
    """Rebuild an empty compressed layer from its saved config."""
    cls = LAYER_TYPES.get(config["type"])
    if cls is None:
        raise ValueError(f"unknown compressed layer type {config['type']!r}")
    bias_dtype = None if config.get("bias_dtype") is None else getattr(torch, config["bias_dtype"])
    return cls.empty(config, bias_dtype)
