"""hiercomp: compress transformer models at every level of their hierarchy, and measure the cost.

    import hiercomp
    cm = hiercomp.compress("path/to/model", hiercomp.Recipe.single("gptq", bits=4, group_size=128),
                           hiercomp.CalibrationConfig("calib.txt", num_sequences=128, seq_len=512))
    cm.save("out/model-gptq4")
    again = hiercomp.load("out/model-gptq4")
    print(hiercomp.evaluate("out/model-gptq4", text="held_out.txt", reference="path/to/model"))
"""

from __future__ import annotations

import importlib
from typing import Any

from hiercomp.errors import HiercompError

__version__ = "0.1.0"

# Public names resolve on first use (PEP 562), so `hiercomp --help` and `import hiercomp.errors` do not pay for
# importing torch and transformers (seconds) before anything is printed.
_LAZY = {
    "CompressedModel": "hiercomp.api", "compress": "hiercomp.api", "export_dense": "hiercomp.api",
    "load": "hiercomp.api", "search": "hiercomp.api", "CalibrationConfig": "hiercomp.calibration",
    "evaluate": "hiercomp.evaluation", "Recipe": "hiercomp.recipe", "Rule": "hiercomp.recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hiercomp' has no attribute {name!r}")


__all__ = [
    "CalibrationConfig", "CompressedModel", "HiercompError", "Recipe", "Rule", "compress", "evaluate", "export_dense",
    "load", "search",
]
