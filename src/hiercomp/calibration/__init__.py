"""Calibration: the data a method measures layers on.

    text.py     text -> seeded token windows (the GPTQ protocol), and the one default every route uses
    capture.py  a block's inputs, captured once and carried block to block; replaying a submodule
    stats.py    per-layer input statistics (E[x xᵀ], E[x²]) by forward hooks; output-error measures
"""

from hiercomp.calibration.text import (
    DEFAULT_NUM_SEQUENCES,
    DEFAULT_SEQ_LEN,
    EOT_MARKER,
    HUB_PREFIX,
    TEXT_ALIASES,
    CalibrationConfig,
    calibration_tokens,
    documents_from_hub,
    load_calibration,
    read_documents,
    token_stream,
)

__all__ = [
    "DEFAULT_NUM_SEQUENCES", "DEFAULT_SEQ_LEN", "EOT_MARKER", "HUB_PREFIX", "TEXT_ALIASES", "CalibrationConfig",
    "calibration_tokens", "documents_from_hub", "load_calibration", "read_documents", "token_stream",
]
