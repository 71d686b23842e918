"""Incoherence processing as a modifier: ``rot_<method>`` quantizes a randomly rotated weight with <method>.

For every scalar quantizer here (rtn, gptq, hqq, hlq, hlq_gptq) and the trellis a rotated variant is
registered under ``rot_<name>``, with the same parameters plus ``rotation_seed``. It draws the randomized
Hadamard transforms T_in, T_out from the seed, hands W' = T_out W T_inᵀ to the quantizer, and, when the
quantizer uses the calibration Hessian (GPTQ and its kin), the Hessian of the rotated inputs
H' = T_in H T_inᵀ (the output error tr(ΔW' H' ΔW'ᵀ) of the rotated layer equals the original layer's,
since T_out is orthogonal). The result is a :class:`~hiercomp.layers.RotatedLinear` around the
quantizer's own layer, which rotates on the fly and stores only the seed.

``--rotate`` on the command line and ``rotate: true`` in a recipe rule (or ``rotate=True`` to
:func:`~hiercomp.methods.make_method` / ``Recipe.single``) are the modifier's spelling: they name the rotated variant
(``gptq`` -> ``rot_gptq``, ``e8`` -> ``quip``), whose ``rotation_seed`` (default 0) is stored in every layer.
AWQ is not rotatable: its per-channel scales act on the channels a rotation mixes.

``quip`` is the QuIP#-like combination: rotation + E8 lattice codebook + BlockLDLQ error feedback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hiercomp.errors import HiercompError
from hiercomp.layers import CompressedLinear
from hiercomp.layers.rotated import RotatedLinear
from hiercomp.methods import gptq, hlq, hqq, rtn, trellis, vq  # noqa: F401  (the quantizers wrapped below, registered first)
from hiercomp.methods.base import METHODS, LayerStats, Method, register_method
from hiercomp.quant.hadamard import RandomHadamard, derived_seed, rotate_hessian, rotate_weight

ROTATABLE = ("rtn", "gptq", "hqq", "hlq", "hlq_gptq", "trellis")
PREFIX = "rot_"


def rotated_compress(base: Method, seed: int, weight: torch.Tensor, bias: torch.Tensor | None,
                     stats: LayerStats | None, layer: str, origin: str) -> CompressedLinear:
    """Compress ``weight`` with ``base`` in the coordinates rotated by ``seed``."""
    out_features, in_features = weight.shape
    t_in = RandomHadamard(in_features, derived_seed(seed, 0))
    t_out = RandomHadamard(out_features, derived_seed(seed, 1))
    rotated = rotate_weight(weight.float(), t_in, t_out)
    rotated_stats = stats
    if stats is not None and stats.hessian is not None:
        h = rotate_hessian(stats.hessian.float(), t_in)
        rotated_stats = LayerStats(torch.diagonal(h).clone(), stats.n_tokens, h)
    elif stats is not None:
        # Without the full Hessian the rotated channels' second moments are not known; methods that
        # read only the diagonal (none of ROTATABLE) would see equal channels, which rotation makes nearly true.
        rotated_stats = LayerStats(torch.full_like(stats.channel_sq_mean, float(stats.channel_sq_mean.mean())),
                                   stats.n_tokens)
    inner = base.compress(rotated, None, rotated_stats, layer, origin)
    return RotatedLinear(inner, seed, bias, origin)


def _rotated_class(base_cls: type[Method], name: str) -> type[Method]:
    def compress(self: Method, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None,
                 layer: str, origin: str) -> CompressedLinear:
        params: dict[str, Any] = self.params()
        seed = params.pop("rotation_seed")
        return rotated_compress(base_cls(**params), seed, weight, bias, stats, layer, origin)

    cls = dataclasses.make_dataclass(
        f"Rotated{base_cls.__name__}", [("rotation_seed", int, dataclasses.field(default=0))], bases=(base_cls,),
        namespace={"compress": compress, "__doc__": f"{base_cls.name} on randomly rotated weights (seeded).",
                   "__module__": __name__}, frozen=True)
    cls.name = name
    return cls


for _base in ROTATABLE:
    if _base in METHODS and PREFIX + _base not in METHODS:
        register_method(_rotated_class(METHODS[_base], PREFIX + _base))
if "e8" in METHODS:
    register_method(_rotated_class(METHODS["e8"], "quip"))


def rotated_method_name(method: str) -> str:
    """The name of ``method``'s rotated variant: what ``--rotate`` (CLI) and ``rotate: true`` (a recipe rule,
    ``Recipe.single(..., rotate=True)``) turn a method name into. Already rotated names map to themselves."""
    if method.startswith(PREFIX) and method in METHODS or method == "quip":
        return method
    if method == "e8":
        return "quip"
    if PREFIX + method in METHODS:
        return PREFIX + method
    rotatable = ", ".join([*ROTATABLE, "e8"])
    why = (" (AWQ's per-channel scales work on the channels a rotation mixes: use gptq or hqq with rotate)"
           if method == "awq" else "")
    raise HiercompError(f"rotate applies to the quantizers {rotatable}, not to {method!r}{why}; "
                        "drop --rotate / 'rotate: true' for it")
