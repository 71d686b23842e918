"""A block's calibration inputs: run the model up to its first block once, then block by block.

Only one block's inputs are held at a time (sequences x length x hidden), never the whole model's
activations. :class:`ModuleRunner` replays a submodule of a block on its captured inputs, for methods that
search per-channel scales on a group of layers (AWQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass once what we need has been seen."""


def first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value



@dataclass
class BlockBatch:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int, encoder: bool
) -> list[BlockBatch]:
    """Run the model up to its first block and keep what that block receives, batch by batch."""
    captured: list[BlockBatch] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "cache", "layer_past")}
        captured.append(BlockBatch(hidden.detach(), tuple(_detach(a) for a in rest), kwargs))
        raise StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, calibration.shape[0], batch_size):
                ids = calibration[start : start + batch_size]
                call = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if not encoder:
                    call["use_cache"] = False
                try:
                    model(**call)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return captured



def run_block(block: nn.Module, batch: BlockBatch) -> torch.Tensor:
    return first_tensor(block(batch.hidden, *batch.args, **batch.kwargs))



class ModuleRunner:
    """``runner(position)``: what submodule ``position`` of ``block`` ("" = the block) outputs on a few batches.

    A scale search calls this a score of times while changing only the module's own weights, so the
    module's inputs (args and kwargs, per batch) are captured once by running the block up to it, and the
    module alone is run after that. They are captured again when a parameter *outside* the module has
    changed since (its version counter moved): a fold into the norm or layer before the module changes
    what the module reads.
    """

    def __init__(self, block: nn.Module, batches: list[BlockBatch]) -> None:
        self.block = block
        self.batches = batches
        self.cache: dict[str, tuple[tuple, list[tuple[tuple, dict]]]] = {}

    def _capture(self, module: nn.Module) -> list[tuple[tuple, dict]]:
        calls: list[tuple[tuple, dict]] = []

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))
            raise StopForward

        handle = module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    try:
                        run_block(self.block, batch)
                    except StopForward:
                        pass
        finally:
            handle.remove()
        return calls

    def inputs(self, position: str, max_tokens: int | None = None) -> torch.Tensor:
        """What layer ``position`` reads, (tokens, in_features): the first ``max_tokens`` tokens."""
        calls = self._capture(self.block.get_submodule(position))
        return torch.cat([args[0].reshape(-1, args[0].shape[-1]).float() for args, _ in calls])[:max_tokens]

    def __call__(self, position: str) -> torch.Tensor:
        module = self.block.get_submodule(position)
        inside = {id(p) for p in module.parameters()}
        stamp = tuple((id(p), p._version) for p in self.block.parameters() if id(p) not in inside)
        if position not in self.cache or self.cache[position][0] != stamp:
            self.cache[position] = (stamp, self._capture(module))
        outputs = []
        with torch.inference_mode():
            for args, kwargs in self.cache[position][1]:
                out = first_tensor(module(*args, **kwargs)).float()
                outputs.append(out.reshape(-1, out.shape[-1]))
        return torch.cat(outputs)
