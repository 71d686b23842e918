"""Walk a Hugging Face model into its hierarchy: blocks -> linear layers, with names, shapes and sizes.

One generic rule finds the transformer blocks of every supported family instead of a table per
architecture: the blocks are the largest ``nn.ModuleList`` whose children all have the same class and
contain linear layers (``model.layers`` in Llama/Qwen2/Mistral, ``transformer.h`` in GPT-2,
``encoder.layer`` in BERT). Linear layers are ``nn.Linear`` and GPT-2's transposed ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.layers import CompressedLinear

# Families the test suite runs on; others with the same shape of model usually work too.
TESTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2", "bert")


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    conv = conv1d_type()
    return isinstance(module, (nn.Linear, CompressedLinear)) or (conv is not None and isinstance(module, conv))


def linear_origin(module: nn.Module) -> str:
    if isinstance(module, CompressedLinear):
        return module.origin
    conv = conv1d_type()
    return "conv1d" if conv is not None and isinstance(module, conv) else "linear"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    if isinstance(module, CompressedLinear):
        return module.dequantize()
    if linear_origin(module) == "conv1d":
        return module.weight.detach().t()
    return module.weight.detach()


def linear_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, CompressedLinear):
        return module.out_features, module.in_features
    w = module.weight
    return (w.shape[1], w.shape[0]) if linear_origin(module) == "conv1d" else (w.shape[0], w.shape[1])


@dataclass
class LinearInfo:
    name: str  # full module path, e.g. "model.layers.3.self_attn.q_proj"
    block: int | None  # index of its transformer block; None outside the blocks (lm_head, pooler)
    position: str  # path inside its block ("self_attn.q_proj"), or the full name outside
    out_features: int
    in_features: int
    has_bias: bool
    origin: str

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class BlockInfo:
    index: int
    name: str
    module: nn.Module
    linears: list[LinearInfo] = field(default_factory=list)


@dataclass
class ModelHierarchy:
    model: nn.Module
    blocks_name: str
    blocks: list[BlockInfo]
    outside: list[LinearInfo]  # linear layers outside the blocks

    @property
    def linears(self) -> list[LinearInfo]:
        return [lin for block in self.blocks for lin in block.linears] + self.outside

    def linear(self, name: str) -> LinearInfo:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(name)

    def table(self) -> list[dict]:
        return [
            {"name": lin.name, "block": lin.block, "position": lin.position,
             "shape": [lin.out_features, lin.in_features], "params": lin.params}
            for lin in self.linears
        ]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        # any block, not just the first: depth pruning (hiercomp.depth) may have emptied block 0
        if not any(is_linear(m) for child in module for m in child.modules()):
            continue
        size = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise HiercompError(
            f"cannot find transformer blocks in this {model_type} model; supported families: "
            f"{', '.join(TESTED_MODEL_TYPES)} (decoder or encoder models with a list of blocks of linear layers)"
        )
    return best[1], best[2]


def walk(model: nn.Module) -> ModelHierarchy:
    blocks_name, block_list = find_blocks(model)
    blocks: list[BlockInfo] = []
    in_blocks: set[str] = set()
    for index, block in enumerate(block_list):
        block_name = f"{blocks_name}.{index}"
        info = BlockInfo(index, block_name, block)
        for sub_name, sub in block.named_modules():
            if sub_name and is_linear(sub):
                out_f, in_f = linear_shape(sub)
                full = f"{block_name}.{sub_name}"
                info.linears.append(LinearInfo(full, index, sub_name, out_f, in_f,
                                               getattr(sub, "bias", None) is not None, linear_origin(sub)))
                in_blocks.add(full)
        blocks.append(info)
    outside = []
    for name, module in model.named_modules():
        if name and is_linear(module) and name not in in_blocks and not name.startswith(blocks_name + "."):
            out_f, in_f = linear_shape(module)
            outside.append(LinearInfo(name, None, name, out_f, in_f, getattr(module, "bias", None) is not None,
                                      linear_origin(module)))
    return ModelHierarchy(model, blocks_name, blocks, outside)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


def dequantize_layers(model: nn.Module) -> None:
    """Replace every compressed layer by an ``nn.Linear`` holding its exact dequantized weight, in place: the
    function the packed reference path computes, without dequantizing at every forward (exports, fast evaluation
    of many variants)."""
    for name, layer in compressed_layers(model).items():
        set_module(model, name, layer.to_linear())
