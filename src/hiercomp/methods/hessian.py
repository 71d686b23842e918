"""OBS machinery shared by GPTQ and SparseGPT: Hessian preparation and the lazy-batch column sweep.

Both methods minimise the layer's output error tr(ΔW H ΔWᵀ) with H = E[x xᵀ] by fixing one input column
at a time (rounding it, or zeroing some of its entries) and moving that column's error onto the columns
not yet fixed, through U, the upper Cholesky factor of H⁻¹:

    err_j = (w_j − q_j) / U_jj,    W[:, k] −= err_j · U_jk   for every k > j.

The sweep applies these updates eagerly inside a block of columns and lazily (one GEMM per block) to
the columns after the block; a method only says what to do with each column, and optionally at the
start of each block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hiercomp.errors import HiercompError
from hiercomp.methods.base import LayerStats

CHOLESKY_RETRIES = 3  # damping x10 each time before giving up


def check_obs_params(damp: float, block_size: int) -> None:
    """Validate the parameters shared by the OBS methods (ValueError, turned into a one-line error)."""
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")


def layer_hessian(stats: LayerStats | None, weight: torch.Tensor, method: str, layer: str) -> torch.Tensor:
    """The layer's H = E[x xᵀ] as a float32 copy, checked for shape and finiteness."""
    if stats is None:
        raise HiercompError(f"{method} needs calibration data for layer {layer}: pass --calib FILE")
    hessian = stats.require_hessian(method, layer)
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise HiercompError(f"{method}: the Hessian of layer {layer} has shape {tuple(hessian.shape)}, expected "
                            f"({in_features}, {in_features}) for its weight of shape {tuple(weight.shape)}")
    hessian = hessian.to(device=weight.device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(hessian).all()):
        raise HiercompError(f"{method}: the Hessian of layer {layer} contains NaN or Inf (the calibration "
                            "activations overflow; compress a float32 copy of the model)")
    return hessian


def zero_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that are always zero (H_jj = 0) get H_jj = 1 and a zero weight column (they never matter).

    Returns float32 copies (weight, hessian); the arguments are not modified.
    """
    weight = weight.to(torch.float32).clone()
    hessian = hessian.clone()
    dead = torch.diagonal(hessian) == 0
    if bool(dead.any()):
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
    return weight, hessian


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float, method: str, layer: str) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H).

    Computed without forming the inverse: with J the order-reversing permutation and J (H + λI) J = M Mᵀ
    (M lower triangular), (H + λI)⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J) and J M⁻¹ J is upper triangular with a positive
    diagonal, so it is U. This is the same factor as cholesky(cholesky_inverse(cholesky(H)), upper=True)
    (to float32 rounding) at about half the work, and avoids LAPACK's potri, whose multi-threaded CPU
    timing varies tenfold from run to run.

    When H + λI is not numerically positive definite, λ is multiplied by 10 and the factorisation
    retried, up to CHOLESKY_RETRIES times; then a HiercompError names the layer.
    """
    # Memory: at most three (in, in) matrices live here besides the argument (the damped copy or the factor, the
    # identity, the solution); for an MLP's down projection of a 7-8B model each is ~0.8 GB. The damping is added
    # to the diagonal in place, which gives the same floats as adding λ·I.
    mean_diag = float(torch.diagonal(hessian).mean())
    factor, tried = damp, damp
    for _ in range(CHOLESKY_RETRIES + 1):
        tried = factor
        damped = hessian.flip(0, 1)  # a copy
        damped.diagonal().add_(factor * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
            solved = torch.linalg.solve_triangular(lower, eye, upper=False)
            del lower, eye
            upper = solved.flip(0, 1)
            del solved
            if bool(torch.isfinite(upper).all()) and bool((torch.diagonal(upper) > 0).all()):
                return upper
        factor = factor * 10 if factor > 0 else 1e-6
    raise HiercompError(f"{method}: the Hessian of layer {layer} is not positive definite even with "
                        f"damp={tried:g}; pass a larger damp (e.g. damp={max(10 * tried, 0.1):g})")


ColumnFn = Callable[[int, torch.Tensor], torch.Tensor]
BlockFn = Callable[[int, int], None]


class LazyBatchSweep:
    """The OBS column sweep with lazy batch updates, over a working copy of the weight.

    ``run(column, block)`` visits columns j = 0 .. in−1 in order. ``block(i1, i2)`` (optional) is called
    when a block of columns [i1, i2) starts; ``column(j, w)`` gets the current (error-updated) column j
    as a read-only (out,) tensor and returns its fixed value q_j. Inside either callback,
    ``current(a, b)`` gives the exact current values of columns [a, b), including updates still pending
    for columns after the block.
    """

    def __init__(self, weight: torch.Tensor, upper: torch.Tensor, block_size: int) -> None:
        # Column j of the weight is row j here, so per-column work touches contiguous memory.
        self._wt = weight.t().to(torch.float32).contiguous()
        self._u = upper
        self.block_size = block_size
        self._i1 = self._i2 = self._done = 0
        self._err = torch.empty(0)

    def current(self, start: int, stop: int) -> torch.Tensor:
        """Current weights of columns [start, stop) as an (out, stop − start) copy."""
        rows = self._wt[start:stop].clone()
        lo = max(start, self._i2)
        if lo < stop and self._done > self._i1:
            pending = self._u[self._i1 : self._done, lo:stop].t() @ self._err[: self._done - self._i1]
            rows[lo - start :] -= pending
        return rows.t()

    def run(self, column: ColumnFn, block: BlockFn | None = None) -> torch.Tensor:
        """Sweep all columns; returns the final weight (out, in), each column replaced by its q_j.

        The per-column work (vectors of length out) runs on one thread: there, waking a second
        thread costs more than it saves, and on a contended 2-core machine each wake-up can stall
        for milliseconds. The lazy update after each block is one large GEMM on all threads.
        """
        wt, u = self._wt, self._u
        n, out = wt.shape
        threads = torch.get_num_threads()
        try:
            for i1 in range(0, n, self.block_size):
                i2 = min(i1 + self.block_size, n)
                self._i1, self._i2, self._done = i1, i2, i1
                self._err = err = torch.empty(i2 - i1, out, dtype=wt.dtype, device=wt.device)
                w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
                torch.set_num_threads(1)
                if block is not None:
                    block(i1, i2)
                for k in range(i2 - i1):
                    w = w1[k]
                    q = column(i1 + k, w)
                    torch.div(w - q, u1[k, k], out=err[k])
                    if k + 1 < i2 - i1:
                        w1[k + 1 :].addr_(u1[k, k + 1 :], err[k], alpha=-1)
                    w1[k] = q
                    self._done = i1 + k + 1
                torch.set_num_threads(threads)
                if i2 < n:
                    wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
        finally:
            torch.set_num_threads(threads)
        self._i1 = self._i2 = self._done = n
        return wt.t()
