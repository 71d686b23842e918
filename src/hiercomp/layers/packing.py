"""Bit packing: integer codes of any width 1..8 into a dense little bitstream of bytes.

Codes are packed across the whole tensor (no per-row padding), so a tensor of N codes at b bits takes
exactly ceil(N*b/8) bytes: the storage accounting can count bits and the file holds exactly that.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = {}


def _powers(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = (2 ** torch.arange(bits, device=device, dtype=torch.int32)).to(torch.int32)
    return _BIT_WEIGHTS[key]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed to hold ``count`` codes of ``bits`` bits each."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    if 8 % bits == 0:
        # Fast path (1, 2, 4 bits): several whole codes per byte.
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(-1, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.int32) * bits
        return (groups << shifts).sum(dim=1).to(torch.uint8)
    # General path (3, 5, 6, 7 bits): expand to single bits, regroup by 8.
    bit_matrix = ((flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    pad = (-bit_matrix.numel()) % 8
    if pad:
        bit_matrix = torch.cat([bit_matrix, bit_matrix.new_zeros(pad)])
    return (bit_matrix.view(-1, 8) << torch.arange(8, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as int32."""
    data = packed.reshape(-1).to(torch.int32)
    if bits == 8:
        return data[:count]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.int32, device=data.device) * bits
        codes = (data.unsqueeze(1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:count]
    # 3, 5, 6, 7 bits: every 8 codes fill exactly ``bits`` bytes of the little-endian stream, so each run of
    # ``bits`` bytes is one integer of 8·bits ≤ 56 bits holding 8 codes (code i at bit i·bits). This reads each
    # byte once, where expanding to single bits took 8 int32s per byte and a reduction (the slow part of loading
    # a 3-bit model: profiled at a third of the fast runtime's load).
    pad = (-data.numel()) % bits
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=data.device) * 8
    words = (data.view(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1)
    code_shifts = torch.arange(8, dtype=torch.int64, device=data.device) * bits
    codes = ((words.unsqueeze(1) >> code_shifts) & (2**bits - 1)).reshape(-1)[:count]
    return codes.to(torch.int32)


# Codes unpacked at a time by unpack_rows_uint8 (default): ~0.5 MB of temporaries, for kernels built from unpacked
# codes (torch's int4/int8 ones, HLQ planes; native grids are packed from the stored stream directly). 128K at a
# time (~2 MB, more once the heap fragments) put SmolLM2's 3-bit fast load up to 6 MiB over its 1.2x bound when
# its grids went this way; 16K made a 2048-wide model's load ~2x slower (per-chunk overhead) for no further gain.
UNPACK_CODES = 1 << 15


def unpack_rows_uint8(packed: torch.Tensor, bits: int, rows: int, cols: int, chunk: int | None = None) -> torch.Tensor:
    """The (rows, cols) codes of :func:`pack_bits` output as uint8, unpacked ``chunk`` rows at a time (default:
    about :data:`UNPACK_CODES` codes): a kernel built from a large layer (a 49152-row output head) then never holds
    the int32 codes and their shifted temporaries (~10 bytes per weight, 16 for 3/5/6/7 bits) at once. Small
    chunks also keep a model's load from growing its heap: 1024 rows of a 576-wide 3-bit layer (9 MB of
    temporaries) raised SmolLM2's fast-load peak from 180 to 196 MiB. Rows start on whole bytes (and on whole
    8-code runs for 3/5/6/7 bits) when ``cols * bits`` is a multiple of 8 and ``cols`` a multiple of 8; otherwise
    it unpacks in one go."""
    chunk = chunk or max(1, UNPACK_CODES // max(cols, 1))
    if bits > 8:
        raise ValueError("codes wider than 8 bits do not fit uint8")
    if (cols * bits) % 8 or cols % 8:
        return unpack_bits(packed, bits, rows * cols).view(rows, cols).to(torch.uint8)
    flat = packed.reshape(-1)
    row_bytes = cols * bits // 8
    out = torch.empty(rows, cols, dtype=torch.uint8)
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        out[a:b] = unpack_bits(flat[a * row_bytes : b * row_bytes], bits, (b - a) * cols).view(b - a, cols)
    return out

