"""A compressed layer computed in randomly rotated coordinates (incoherence processing).

The inner layer (any compressed layer: integer grid, HLQ, lattice codebook, ...) holds W' = T_out W T_inᵀ,
with T_in, T_out the randomized Hadamard transforms of ``hiercomp.quant.hadamard``. The forward pass
rotates on the fly: y = T_outᵀ · inner(T_in x) + b, two fast Walsh–Hadamard transforms (plus a small m x m
product for the odd factor of the width) per call. Only the seed is stored (one int64, counted as 64 bits):
the transforms are regenerated from it on load.

Where the rotations could be fused away instead (not done here): T_in of q/k/v and of gate/up acts on
the residual stream after an RMSNorm, so with the norm's weight folded into those layers first, one
rotation of the whole residual stream (QuaRot: embeddings, every o_proj/down_proj output and the lm_head
input) removes them; T_out of v_proj cancels against T_in of o_proj per head, and T_out of up_proj
against T_in of down_proj only if the elementwise product with gate's output is rotated as well (it is
not, so down_proj's input rotation stays online, as in QuaRot).

The inner layer is not a registered submodule (the model would then list it as a second compressed
layer): its buffers are registered here under ``inner_<name>`` and handed to it before each use.
"""

from __future__ import annotations

from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear, build_layer, register_layer
from hiercomp.quant.hadamard import RandomHadamard, derived_seed, unrotate_weight

INNER_PREFIX = "inner_"


@register_layer
class RotatedLinear(CompressedLinear):
    kind = "rotated"

    def __init__(self, inner: CompressedLinear, seed: int, bias: torch.Tensor | None, origin: str = "linear") -> None:
        super().__init__(inner.in_features, inner.out_features, bias, origin)
        if inner.bias is not None:
            raise ValueError("the inner layer of a rotated layer carries no bias (the bias is added unrotated)")
        self.__dict__["_inner"] = inner  # not a submodule: see the module docstring
        for name, buf in inner.named_buffers(recurse=False):
            self.register_buffer(INNER_PREFIX + name, buf)
        self.register_buffer("rotation_seed", torch.tensor([seed], dtype=torch.int64))
        self.__dict__["_transforms"] = None

    @property
    def inner(self) -> CompressedLinear:
        inner: CompressedLinear = self.__dict__["_inner"]
        for name in list(inner._buffers):
            if inner._buffers[name] is not None:
                inner._buffers[name] = self._buffers[INNER_PREFIX + name]
        return inner

    @property
    def seed(self) -> int:
        return int(self.rotation_seed[0])

    def transforms(self) -> tuple[RandomHadamard, RandomHadamard]:
        cached = self.__dict__["_transforms"]
        if cached is None or cached[0].seed != derived_seed(self.seed, 0):
            cached = (RandomHadamard(self.in_features, derived_seed(self.seed, 0)),
                      RandomHadamard(self.out_features, derived_seed(self.seed, 1)))
            self.__dict__["_transforms"] = cached
        return cached

    def dequantize(self) -> torch.Tensor:
        t_in, t_out = self.transforms()
        return unrotate_weight(self.inner.dequantize(), t_in, t_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_in, t_out = self.transforms()
        y = t_out.apply_transpose(self.inner(t_in.apply(x)))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_storage_bits(self) -> dict[str, int]:
        bits = {f"{INNER_PREFIX}{k}": v for k, v in self.inner.weight_storage_bits().items()}
        bits["rotation_seed"] = 64
        return bits

    def layer_config(self) -> dict[str, Any]:
        return {"inner": self.inner.full_config()}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> RotatedLinear:
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        return cls(build_layer(config["inner"]), 0, bias, config["origin"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, inner={type(self.inner).__name__}"
