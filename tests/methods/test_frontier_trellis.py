"""Trellis-coded quantization: the Viterbi path, its bit stream, and its distance from the Shannon bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiercomp.layers.trellis import bits_to_states, paths_to_bits, trellis_codebook, viterbi
from hiercomp.methods import make_method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("state_bits,k", [(8, 2), (9, 2), (12, 3)])
def test_bit_stream_round_trip_and_bitshift_structure(state_bits, k):
    torch.manual_seed(0)
    paths = viterbi(torch.randn(5, 40), state_bits, k)
    # each state keeps the previous one's low L − k bits as its high bits
    assert torch.equal(paths[:, 1:] >> k, paths[:, :-1] & (2 ** (state_bits - k) - 1))
    bits = paths_to_bits(paths, state_bits, k)
    assert bits.shape == (5, state_bits - k + 40 * k)
    assert torch.equal(bits_to_states(bits, state_bits, k, 40), paths)


def test_viterbi_beats_the_lattice_codebook_on_gaussian_rows():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    codebook = trellis_codebook(12)
    assert abs(float(codebook.mean())) < 0.01 and float(codebook.std()) == pytest.approx(1.0, abs=1e-5)
    mse = float((w - 1.05 * codebook[viterbi(w / 1.05, 12, 2)]).pow(2).mean())
    # 2 bits per weight: Shannon bound 0.0625, E8 ball 0.0915, Lloyd-Max scalar 0.1175; measured 0.077
    assert 0.0625 < mse < 0.08


def test_trellis_layer_counts_its_bits_and_computes_with_them():
    torch.manual_seed(0)
    w, bias = torch.randn(16, 96), torch.randn(16)
    layer = make_method("rot_trellis", bits=2, state_bits=8).compress(w, bias, None, "l", "linear")
    assert layer.storage_bits()["inner_bitstream"] == 16 * (8 - 2 + 96 * 2)
    assert layer.storage_bits()["inner_scales"] == 16 * 16
    x = torch.randn(3, 96)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantize(), bias), atol=1e-4)
    assert float((layer.dequantize() - w).pow(2).mean() / w.var()) < 0.14
