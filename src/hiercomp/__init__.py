"""hiercomp: compress transformer models at every level of their hierarchy, and measure the cost."""

__version__ = "0.1.0"
