"""Quantization grids shared by every quantizer (RTN, GPTQ, and later AWQ/HQQ)."""

from hiercomp.quant.grid import QuantGrid, fit_grid, group_index

__all__ = ["QuantGrid", "fit_grid", "group_index"]
