"""Packed layers: exact round trips and exact bit counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiercomp.layers import QuantizedLinear, SparseLinear
from hiercomp.layers.packing import pack_bits, packed_nbytes, unpack_bits, unpack_rows_uint8
from hiercomp.methods import make_method
from hiercomp.quant.grid import QuantGrid, fit_grid, quantize_weight


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip_any_width(bits, count, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (count,), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes.to(torch.int32))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 40), cols=st.sampled_from([8, 16, 24, 36, 64]),
       chunk=st.integers(1, 9), seed=st.integers(0, 1000))
def test_unpack_rows_in_chunks_equals_unpacking_at_once(bits, rows, cols, chunk, seed):
    """Row blocks start on whole bytes (or fall back to one unpack for widths that do not): same codes."""
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    got = unpack_rows_uint8(pack_bits(codes.reshape(-1), bits), bits, rows, cols, chunk=chunk)
    assert got.dtype == torch.uint8 and torch.equal(got, codes.to(torch.uint8))


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0, 8]), 3)


@pytest.mark.parametrize("bits,group,symmetric", [(2, 32, False), (3, 32, True), (4, None, False), (8, 64, False)])
def test_quantized_layer_counts_every_bit_with_short_last_group(bits, group, symmetric):
    torch.manual_seed(0)
    weight = torch.randn(24, 172)  # 172 = stories260K's MLP width: 5 groups of 32 and one of 12
    grid = QuantGrid(bits, group, symmetric)
    scale, zero = fit_grid(weight, grid)
    layer = QuantizedLinear(grid, quantize_weight(weight, grid, scale, zero), scale, zero, None)
    groups = 24 * (1 if group is None else math.ceil(172 / group))
    expected = 24 * 172 * bits + groups * 16 + (0 if symmetric else groups * bits)
    assert layer.total_bits() == expected
    stored_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert 0 <= stored_bytes - expected / 8 < 2  # two packed tensors, each rounded up to a whole byte
    # RTN's error is at most half a step (symmetric grid), or one step where the asymmetric grid's
    # rounded zero point shifts the top of the range by up to half a step.
    step = scale.repeat_interleave(group or 172, dim=1)[:, :172]
    bound = step / 2 if symmetric else step
    assert bool(((layer.dequantize() - weight).abs() <= bound + 1e-6).all())


def test_rtn_8bit_error_is_tiny_and_2bit_is_large():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    errs = {}
    for bits in (2, 4, 8):
        layer = make_method("rtn", bits=bits, group_size=32).compress(weight, None, None, "w", "linear")
        errs[bits] = float((layer.dequantize() - weight).pow(2).mean() / weight.pow(2).mean())
    assert errs[8] < 1e-4 < errs[4] < 0.02 < errs[2] < 0.3


def test_sparse_bitmap_and_nm_formats_round_trip_and_count():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    mask = torch.rand(16, 64) > 0.7
    layer = SparseLinear(weight * mask, mask, None)
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.dequantize(), (weight * mask).half().float())
    assert layer.storage_bits() == {"values": int(mask.sum()) * 16, "mask": 16 * 64}

    nm_layer = make_method("magnitude", pattern="2:4").compress(weight, torch.zeros(16), None, "w", "linear")
    runs = nm_layer.mask().view(16, 16, 4).sum(dim=2)
    assert bool((runs == 2).all())
    # 2 kept of 4: 2 fp16 values + 2 two-bit indices per run of 4 = 9 bits per weight, plus the bias.
    assert nm_layer.weight_storage_bits() == {"values": 16 * 32 * 16, "indices": 16 * 32 * 2}
    assert nm_layer.storage_bits()["bias"] == 16 * 32


def test_nm_needs_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseLinear(torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), None, nm=(2, 4))


def test_forward_computes_from_the_packed_form():
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 32), torch.randn(8)
    layer = make_method("rtn", bits=4, group_size=16).compress(weight, bias, None, "w", "linear")
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ layer.dequantize().t() + bias)
    dense = layer.to_linear()
    assert torch.equal(dense.weight, layer.dequantize())
