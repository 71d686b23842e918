"""Compressed layers: modules that keep the packed form and compute from it."""

from hiercomp.layers.base import LAYER_TYPES, CompressedLinear, build_layer
from hiercomp.layers.bitstack import BitStackLinear
from hiercomp.layers.hlq import HLQLinear
from hiercomp.layers.lowrank import LowRankLinear
from hiercomp.layers.quantized import QuantizedLinear
from hiercomp.layers.rotated import RotatedLinear  # noqa: F401
from hiercomp.layers.sparse import SparseLinear
from hiercomp.layers.trellis import TrellisLinear  # noqa: F401
from hiercomp.layers.vq import E8Linear  # noqa: F401

__all__ = ["LAYER_TYPES", "BitStackLinear", "CompressedLinear", "HLQLinear", "LowRankLinear", "QuantizedLinear",
           "SparseLinear", "build_layer"]
