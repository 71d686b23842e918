"""Compression methods, one file each, registered by their CLI name."""

from hiercomp.methods import awq, bitstack, gptq, hlq, hqq, magnitude, rotate, rtn, sparsegpt, svd, vq, wanda  # noqa: F401  # noqa: E402, F401  (lattice codebook; rotated variants of quantizers)
from hiercomp.methods.base import METHODS, LayerStats, Method, make_method

__all__ = ["METHODS", "LayerStats", "Method", "make_method"]
