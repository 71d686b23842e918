"""Trellis-coded quantization with a bitshift trellis and a computed codebook (QTIP's construction).

Tseng et al., "QTIP: Quantization with Trellises and Incoherence Processing" (NeurIPS 2024). Each output
row is one sequence. The decoder keeps an L-bit state; every weight shifts k new bits into it,
s_t = ((s_{t−1} << k) | b_t) mod 2^L, and reads its value from a codebook of 2^L values indexed by the
state: k bits per weight, yet each value is chosen from 2^L, and the encoder (Viterbi) picks the whole
path that minimises the row's squared error. The codebook is computed, never stored: value(s) is the
Gaussian quantile of a hashed uniform, Φ⁻¹((h(s) + ½) / 2^32), an iid-Gaussian-like codebook as QTIP's
random-Gaussian one (the rows should be Gaussian-like: use it under incoherence processing).

Stored, exactly: per sequence, the L − k low bits of the state before the first weight and k bits per weight
(one bit stream), and one float16 scale per row (or one for the whole layer, ``row_scales=False``; or 8-bit
ones, ``scale_bits=8``: :mod:`hiercomp.quant.stored_scales`). A sequence
is a row (out · (L − k + in · k) bits), or, with ``by_columns`` (what the Hessian sweep of
:mod:`hiercomp.methods.trellis` encodes, one column at a time), a column (in · (L − k + out · k) bits).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from hiercomp.layers.base import CompressedLinear, register_layer
from hiercomp.layers.packing import pack_bits, packed_nbytes, unpack_bits
from hiercomp.quant.grid import SCALE_BITS
from hiercomp.quant.stored_scales import StoredScales, check_scale_bits


@functools.lru_cache(maxsize=8)
def trellis_codebook(state_bits: int) -> torch.Tensor:
    """The 2^L computed codebook values (float32, unit variance), from a 32-bit integer hash of each state."""
    s = torch.arange(2**state_bits, dtype=torch.int64)
    h = (s * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF  # multiplicative hash, then xorshift mixing
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    h = (h * 0x297A2D39) & 0xFFFFFFFF
    h ^= h >> 15
    u = (h.double() + 0.5) / 2.0**32
    values = torch.special.ndtri(u)
    return (values / values.std()).float()


def viterbi(rows: torch.Tensor, state_bits: int, k: int) -> torch.Tensor:
    """The minimum-squared-error state path (rows, T) int64 for each row of ``rows`` (already scaled)."""
    codebook = trellis_codebook(state_bits)
    n_low = 2 ** (state_bits - k)
    n_rows, steps = rows.shape
    # As many rows at once as keep the costs near 2M floats and the back-pointers under 256 MB.
    batch = max(1, min(2**21 >> state_bits, 2**28 // (steps * n_low)))
    paths = torch.empty(n_rows, steps, dtype=torch.int64)
    for r0 in range(0, n_rows, batch):
        w = rows[r0 : r0 + batch].float()
        nb = w.shape[0]
        back = torch.empty(steps, nb, n_low, dtype=torch.int8)
        cost = (w[:, :1] - codebook).pow(2)  # every state is reachable at the first weight
        for t in range(1, steps):
            best, arg = cost.view(nb, 2**k, n_low).min(dim=1)  # predecessors share the low L − k bits
            back[t] = arg.to(torch.int8)
            cost = (best.unsqueeze(-1) + (w[:, t : t + 1] - codebook).pow(2).view(nb, n_low, 2**k)).view(nb, -1)
        state = cost.argmin(dim=1)
        for t in range(steps - 1, -1, -1):
            paths[r0 : r0 + nb, t] = state
            if t:
                high = back[t].gather(1, (state >> k).unsqueeze(1)).squeeze(1).long()
                state = (high << (state_bits - k)) | (state >> k)
    return paths


def paths_to_bits(paths: torch.Tensor, state_bits: int, k: int) -> torch.Tensor:
    """(rows, L − k + T·k) bits: the first state's high L − k bits (= the start state's low bits), then the
    k new bits of every step."""
    first = paths[:, :1] >> k
    head = (first >> torch.arange(state_bits - k - 1, -1, -1)) & 1
    steps = paths & (2**k - 1)
    body = (steps.unsqueeze(-1) >> torch.arange(k - 1, -1, -1)) & 1
    return torch.cat([head, body.reshape(paths.shape[0], -1)], dim=1)


def bits_to_states(bits: torch.Tensor, state_bits: int, k: int, steps: int) -> torch.Tensor:
    """Inverse of :func:`paths_to_bits`: the state of every step (rows, T). The state after step t is the
    L-bit window [t·k, t·k + L) of the row's bit stream."""
    windows = bits.long().unfold(1, state_bits, k)[:, :steps]  # (rows, T, L), most significant bit first
    return (windows * (2 ** torch.arange(state_bits - 1, -1, -1))).sum(-1)


@register_layer
class TrellisLinear(StoredScales, CompressedLinear):
    kind = "trellis"

    def __init__(self, bits: int, state_bits: int, paths: torch.Tensor | None, scales: torch.Tensor | None,
                 bias: torch.Tensor | None, origin: str = "linear", shape: tuple[int, int] | None = None,
                 by_columns: bool = False, row_scales: bool = True, scale_bits: int = 16) -> None:
        """``paths``: the state of every step of every sequence, (out, in), or (in, out) ``by_columns``."""
        out_features, in_features = shape
        super().__init__(in_features, out_features, bias, origin)
        if not 1 <= bits < state_bits <= 20:
            raise ValueError(f"trellis needs 1 <= bits < state_bits <= 20, got bits={bits}, state_bits={state_bits}")
        self.bits, self.state_bits, self.by_columns = bits, state_bits, bool(by_columns)
        self.row_scales, self.scale_bits = bool(row_scales), int(scale_bits)
        check_scale_bits(self.scale_bits, self.row_scales)
        scale_rows = out_features if self.row_scales else 1
        count = self.sequences()[0] * self.sequence_bits()
        self.register_buffer("bitstream", torch.empty(packed_nbytes(count, 1), dtype=torch.uint8) if paths is None
                             else self.packed_codes(paths)["bitstream"])
        self._register_scales(scales, (scale_rows,))

    def packed_codes(self, paths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored bit stream for the states of every step, in the form :meth:`states` gives them."""
        return {"bitstream": pack_bits(paths_to_bits(paths.long(), self.state_bits, self.bits), 1)}

    def sequences(self) -> tuple[int, int]:
        """(how many sequences, the length of each)."""
        return (self.in_features, self.out_features) if self.by_columns else (self.out_features, self.in_features)

    def sequence_bits(self) -> int:
        return self.state_bits - self.bits + self.sequences()[1] * self.bits

    def states(self) -> torch.Tensor:
        """The state of every step, one sequence per row: (out, in), or (in, out) by columns."""
        count, length = self.sequences()
        bits = unpack_bits(self.bitstream, 1, count * self.sequence_bits()).view(count, -1)
        return bits_to_states(bits, self.state_bits, self.bits, length)

    def dequantize(self) -> torch.Tensor:
        # .long(): tuning caches the states in the smallest integer dtype, and a uint8 index would be read as a mask
        values = trellis_codebook(self.state_bits)[self.states().long()]
        return self.scale_values().unsqueeze(1) * (values.t() if self.by_columns else values)

    def weight_storage_bits(self) -> dict[str, int]:
        return {"bitstream": self.sequences()[0] * self.sequence_bits(), **self.scale_storage_bits()}

    def layer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"bits": self.bits, "state_bits": self.state_bits}
        if self.by_columns:  # absent in folders saved before the Hessian sweep: rows
            config["by_columns"] = True
        return {**config, **self.scale_config()}

    @classmethod
    def empty(cls, config: dict[str, Any], bias_dtype: torch.dtype | None) -> TrellisLinear:
        bias = None if bias_dtype is None else torch.empty(config["out_features"], dtype=bias_dtype)
        return cls(config["bits"], config["state_bits"], None, None, bias, config["origin"],
                   shape=(config["out_features"], config["in_features"]), by_columns=config.get("by_columns", False),
                   row_scales=config.get("row_scales", True), scale_bits=config.get("scale_bits", SCALE_BITS))
