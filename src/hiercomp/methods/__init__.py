"""Compression methods, one file each, registered by their CLI name."""

from hiercomp.methods import awq, bitstack, hlq, hqq, magnitude, rtn, svd, wanda  # noqa: F401  (registration)
from hiercomp.methods.base import METHODS, LayerStats, Method, make_method

try:  # methods that arrive in their own files register themselves on import
    from hiercomp.methods import gptq, sparsegpt  # noqa: F401
except ImportError:  # pragma: no cover - only while a method file is being written
    pass
from hiercomp.methods import rotate, vq  # noqa: E402, F401  (lattice codebook; rotated variants of quantizers)

__all__ = ["METHODS", "LayerStats", "Method", "make_method"]
