"""hiercomp: compress transformer models at every level of their hierarchy, and measure the cost.

    import hiercomp
    cm = hiercomp.compress("path/to/model", hiercomp.Recipe.single("gptq", bits=4, group_size=128),
                           hiercomp.CalibrationConfig("calib.txt", num_sequences=128, seq_len=512))
    cm.save("out/model-gptq4")
    again = hiercomp.load("out/model-gptq4")
    print(hiercomp.evaluate("out/model-gptq4", text="held_out.txt", reference="path/to/model"))
"""

from hiercomp.api import CompressedModel, compress, export_dense, load, search
from hiercomp.calibration import CalibrationConfig
from hiercomp.errors import HiercompError
from hiercomp.evaluation import evaluate
from hiercomp.recipe import Recipe, Rule

__version__ = "0.1.0"


__all__ = [
    "CalibrationConfig", "CompressedModel", "HiercompError", "Recipe", "Rule", "compress", "evaluate", "export_dense",
    "load", "search",
]
