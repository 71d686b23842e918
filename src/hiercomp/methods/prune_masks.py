"""Masks from scores, shared by the pruners that choose by a score and do not update weights."""

from __future__ import annotations

import torch

from hiercomp.errors import HiercompError


def check_nm_width(in_features: int, nm: tuple[int, int] | None, method: str, layer: str) -> None:
    if nm is not None and in_features % nm[1]:
        raise HiercompError(f"{method}: layer {layer} has {in_features} inputs, not a multiple of {nm[1]}, so "
                            f"{nm[0]}:{nm[1]} sparsity does not apply; choose another pattern or skip the layer")


def mask_lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that drops the ``sparsity`` fraction of lowest scores in every row (ties: first index)."""
    rows, cols = scores.shape
    drop = int(cols * sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :drop]
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, False)
    return mask


def mask_lowest_global(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that drops the ``sparsity`` fraction of lowest scores over the whole matrix."""
    drop = int(scores.numel() * sparsity)
    order = torch.sort(scores.reshape(-1), stable=True).indices[:drop]
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[order] = False
    return mask.view_as(scores)


def mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n highest scores in every run of m consecutive columns of a row."""
    rows, cols = scores.shape
    runs = scores.reshape(rows, cols // m, m)
    top = torch.topk(runs, n, dim=2).indices
    mask = torch.zeros_like(runs, dtype=torch.bool)
    mask.scatter_(2, top, True)
    return mask.view(rows, cols)
