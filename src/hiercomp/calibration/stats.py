"""Statistics of a layer's calibration inputs: E[x xᵀ] and E[x²], gathered with forward hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hiercomp.calibration.capture import StopForward
from hiercomp.errors import HiercompError
from hiercomp.methods.base import LayerStats


class StatsCollector:
    """Forward pre-hooks that accumulate E[x xᵀ] and E[x²] for a set of linear layers."""

    def __init__(self, modules: dict[str, nn.Module], want_hessian: dict[str, bool]) -> None:
        self.modules = modules
        self.want_hessian = want_hessian
        self.sums: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(modules, 0)
        self.seen: set[str] = set()
        self.handles: list[Any] = []

    def __enter__(self) -> StatsCollector:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.counts[name] += x.shape[0]
            sq = (x * x).sum(dim=0)
            self.sq[name] = self.sq[name] + sq if name in self.sq else sq
            if self.want_hessian[name]:
                xtx = x.t() @ x
                self.sums[name] = self.sums[name] + xtx if name in self.sums else xtx
            self.seen.add(name)
            if len(self.seen) == len(self.modules):
                raise StopForward

        return hook

    def stats(self, name: str) -> LayerStats:
        """The statistics gathered at layer ``name`` (a group leader: its group reads the same input)."""
        n = max(self.counts[name], 1)
        # Handed over, not copied: each leader's statistics are taken once, and for a wide input (an MLP's down
        # projection) one more (in, in) matrix is hundreds of MB at the peak of the block.
        total = self.sums.pop(name, None)
        if total is not None:
            with torch.inference_mode():  # the sums were made in inference mode (the block's forward)
                total.div_(n)
        hessian = total
        stats = LayerStats(channel_sq_mean=self.sq[name] / n, n_tokens=self.counts[name], hessian=hessian)
        for tensor in (stats.channel_sq_mean, stats.hessian):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise HiercompError(
                    f"calibration statistics of layer {name} contain NaN or Inf: the activations overflow "
                    "(check the model's weights, or compress a float32 copy)"
                )
        return stats


def input_hessians(model: nn.Module, names: list[str], calls: list[dict[str, torch.Tensor]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (weight (out, in), H = E[x xᵀ] over every input token the layer saw in ``model(**call)`` for each
    call), both float32. Whole-model forward passes with sums in float64: for measuring a method on real
    layers outside the engine (benchmarks, tests), not for calibration, which goes block by block."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable:
        def grab(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + x.t() @ x if name in sums else x.t() @ x
            counts[name] += x.shape[0]

        return grab

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for call in calls:
                model(**call)
    finally:
        for h in handles:
            h.remove()
    return {n: (modules[n].weight.detach().float().clone(), (sums[n] / counts[n]).float()) for n in names}


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Ŵ) x||² / ||W x||² averaged over the tokens that produced ``hessian`` = E[x xᵀ]."""
    delta = weight - approx
    num = float(((delta @ hessian) * delta).sum())
    den = float(((weight @ hessian) * weight).sum())
    return num / den if den > 0 else float(num > 0)
