"""Randomized Hadamard transforms for incoherence processing (QuIP#, QuaRot), regenerated from a seed.

A weight with a few large entries or a few heavy input channels quantizes badly on any grid. Rotating
the input and output spaces of a linear layer by random orthogonal matrices spreads every entry over
all the others: W' = T_out W T_inᵀ has nearly Gaussian entries of equal size, and the layer still
computes y = T_outᵀ W' (T_in x) exactly.

T for a dimension n = a·m (a the largest power of two dividing n, m odd) is

    T = (H_a / √a ⊗ Q_m) · diag(s)

with H_a the Sylvester Hadamard matrix (applied by the fast Walsh–Hadamard transform, O(n log a)),
Q_m a random orthogonal m x m matrix (QR of a Gaussian draw; m = 1 for powers of two, 3 for 576 or
1536, 43 for stories260K's 172) and s a random ±1 vector. Everything random is drawn from one
``torch.Generator`` seeded with the stored seed, so a reload regenerates T bit for bit (same torch
build; Q_m is computed in float64 and rounded to float32, so other LAPACK builds agree to that rounding).
"""

from __future__ import annotations

import functools

import torch


def split_power_of_two(n: int) -> tuple[int, int]:
    """n = a·m with a the largest power of two dividing n and m odd."""
    if n < 1:
        raise ValueError(f"dimension must be positive, got {n}")
    a = n & -n
    return a, n // a


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform (H_a / √a, Sylvester order) along ``dim`` (size a = 2^k)."""
    x = x.movedim(dim, -1)
    a = x.shape[-1]
    if a & (a - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a power-of-two size, got {a}")
    lead = x.shape[:-1]
    y = x.reshape(-1, a)
    h = 1
    while h < a:
        pairs = y.view(-1, a // (2 * h), 2, h)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).view(-1, a)
        h *= 2
    y = y * (1.0 / a**0.5)
    return y.view(*lead, a).movedim(-1, dim)


def sylvester_hadamard(a: int) -> torch.Tensor:
    """The explicit orthonormal Sylvester Hadamard matrix (for tests and small sizes)."""
    return fwht(torch.eye(a, dtype=torch.float64), dim=0)


@functools.lru_cache(maxsize=64)
def _factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    _, m = split_power_of_two(n)
    if m == 1:
        return signs, None
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a Haar-distributed Q, independent of LAPACK's sign choices
    return signs, q.float()


class RandomHadamard:
    """The orthogonal transform T of one dimension ``n``, defined by ``seed``; ``apply``: x -> T x along
    the last dimension, ``apply_transpose``: x -> Tᵀ x."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.a, self.m = split_power_of_two(n)
        self.signs, self.q = _factors(n, seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = (x * self.signs.to(x.dtype)).reshape(*lead, self.a, self.m)
        y = fwht(y, dim=-2)
        if self.q is not None:
            y = y @ self.q.to(x.dtype).t()
        return y.reshape(*lead, self.n)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x.reshape(*lead, self.a, self.m)
        if self.q is not None:
            y = y @ self.q.to(x.dtype)
        y = fwht(y, dim=-2)  # H is symmetric
        return y.reshape(*lead, self.n) * self.signs.to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """T as an explicit (n, n) float32 matrix."""
        return self.apply(torch.eye(self.n)).t()


def derived_seed(seed: int, role: int) -> int:
    """The seed of one side (0 = input, 1 = output) of a layer rotated with ``seed``."""
    return (seed * 2 + role) % (2**63)


def rotate_weight(weight: torch.Tensor, t_in: RandomHadamard, t_out: RandomHadamard) -> torch.Tensor:
    """W' = T_out W T_inᵀ for W (out, in)."""
    w = t_in.apply(weight)  # rows: W T_inᵀ
    return t_out.apply(w.t()).t()  # columns: T_out (W T_inᵀ)


def unrotate_weight(rotated: torch.Tensor, t_in: RandomHadamard, t_out: RandomHadamard) -> torch.Tensor:
    """W = T_outᵀ W' T_in."""
    w = t_out.apply_transpose(rotated.t()).t()
    return t_in.apply_transpose(w)


def rotate_hessian(hessian: torch.Tensor, t_in: RandomHadamard) -> torch.Tensor:
    """H' = T_in H T_inᵀ: the input statistics E[x' x'ᵀ] of the rotated inputs x' = T_in x."""
    h = t_in.apply(hessian)  # H T_inᵀ (rows transformed)
    h = t_in.apply(h.t()).t()
    return (h + h.t()) * 0.5
