"""The native low-bit kernel (hiercomp.layers.gemv, gemv.cpp) against the reference (dequantize) path.

Its activation is rounded to two int8 levels per block of 32 (~15 bits), so outputs match the reference within
that rounding: asserted as ≤ 1e-2 of the output's norm like every fast path, and ≤ 1e-3 to pin the precision
(measured ~5e-5). The codes come back exactly from each of the four layouts (4, 3, 2 and 1 bits per code). Where
the native kernel is off (``HIERCOMP_NO_NATIVE=1``, or unavailable), the torch kernels take the layers as before.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hiercomp.layers import QuantizedLinear, gemv
from hiercomp.layers.kernels import (
    Int4Kernel,
    Int8Kernel,
    NativeLowBitKernel,
    affine_kernel,
    select_kernel,
    set_runtime,
)
from hiercomp.quant.grid import QuantGrid, fit_grid, quantize_weight
from tests.conftest import STORIES, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")
needs_native = pytest.mark.skipif(not gemv.available(), reason=f"native kernel unavailable: {gemv.reason()}")

TOL = 1e-2


def quantized(weight: torch.Tensor, bits: int, group: int | None, symmetric: bool, float_zeros: bool = False
              ) -> QuantizedLinear:
    grid = QuantGrid(bits, group, symmetric)
    scale, zero = fit_grid(weight, grid)
    if float_zeros:  # HQQ-like: the zero a float16 off the integer grid
        zero = (zero + torch.rand_like(zero) - 0.5).half().float()
    codes = quantize_weight(weight, grid, scale, zero)
    return QuantizedLinear(grid, codes, scale, zero, torch.randn(weight.shape[0]),
                           **({"zero_format": "fp16"} if float_zeros else {}))


def rel_error(layer: QuantizedLinear, x: torch.Tensor) -> tuple[float, str]:
    ref = F.linear(x, layer.dequantize(), layer.bias)
    layer.kernel = select_kernel(layer)
    fast = layer(x)
    return float((fast - ref).norm() / ref.norm()), layer.kernel.name


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_fast_equals_reference(bits: int, group: int | None, symmetric: bool) -> None:
    torch.manual_seed(bits)
    # 48 rows (not a multiple of 16: torch's int4 kernel could not take them); 384 inputs (3 superchunks of
    # 128) and 96 (3 blocks of 32: padded, and per channel or groups of 32 only).
    shapes = [(48, 384)] + ([(40, 96)] if group in (32, None) else [])
    for out_f, in_f in shapes:
        layer = quantized(torch.randn(out_f, in_f), bits, group, symmetric)
        for rows in (1, 3, 16, 130):
            err, name = rel_error(layer, torch.randn(rows, in_f))
            assert name == "native4" and err < TOL and err < 1e-3, (out_f, in_f, rows, err)
        assert layer.kernel.grid.bits == bits  # held in its own layout: 2 and 3 bits not on the nibbles
        assert torch.equal(layer.kernel.codes(), layer.codes())


def affine_grid(out_f: int, in_f: int, bits: int, group: int | None, symmetric: bool, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes of ``bits`` (1 included: HLQ/BitStack planes) with float16 scales, integer or mid zeros, and
    the dense weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else in_f // group
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    scale = (torch.rand(out_f, groups, generator=g) + 0.1).half().float()
    zero = (torch.full((out_f, groups), ((1 << bits) - 1) / 2) if symmetric
            else torch.randint(0, 1 << bits, (out_f, groups), generator=g).float())
    width = in_f // groups
    weight = scale.repeat_interleave(width, 1) * (codes - zero.repeat_interleave(width, 1))
    return codes, scale, zero, weight


@needs_native
@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_narrow_layouts_equal_reference(bits: int, group: int | None, symmetric: bool) -> None:
    """The 1-, 2- and 3-bit layouts (chosen from the codes' range) against the dense product, codes exact."""
    shapes = [(40, 384)] + ([(24, 96)] if group in (32, None) else [])
    for out_f, in_f in shapes:
        codes, scale, zero, weight = affine_grid(out_f, in_f, bits, group, symmetric, 10 * bits + out_f)
        grid = gemv.PackedGrid(codes, scale, zero, group)
        assert grid.bits == bits and grid.packed.shape == (out_f, -(-in_f // 128) * 16 * bits)
        assert torch.equal(grid.codes(), codes)
        for rows in (1, 3, 16, 130):
            x = torch.randn(rows, in_f)
            ref = x @ weight.T
            err = float((grid(x) - ref).norm() / ref.norm())
            assert err < 1e-3, (bits, out_f, in_f, rows, err)


@needs_native
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_activation_rounding_is_the_only_error_in_every_layout(bits: int) -> None:
    """With an input already on each block's int8 grid, every layout gives W·x up to float32 summation."""
    codes, scale, zero, weight = affine_grid(32, 256, bits, 64, False, bits)
    x = torch.randint(-127, 128, (3, 256)).float()
    x[:, ::32] = 127.0
    ref = F.linear(x, weight)
    y = gemv.PackedGrid(codes, scale, zero, 64)(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_layout_choice_and_round_trip() -> None:
    """The layout follows the codes' range unless given; packing is pure torch (no native library needed)."""
    assert [gemv.layout_bits(m) for m in (0, 1, 2, 3, 4, 7, 8, 15)] == [1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError):
        gemv.layout_bits(16)
    torch.manual_seed(7)
    codes = torch.randint(0, 4, (1030, 160))  # more rows than one packing slice; 160 inputs padded to 256
    for bits in (2, 3, 4):
        grid = gemv.PackedGrid(codes, torch.ones(1030, 5), torch.zeros(1030, 5), 32, bits=bits)
        assert grid.bits == bits and grid.packed.shape == (1030, 2 * 16 * bits)
        assert torch.equal(grid.codes(), codes)
    with pytest.raises(ValueError, match="2-bit"):
        gemv.PackedGrid(codes + 1, torch.ones(1030, 5), torch.zeros(1030, 5), 32, bits=2)


def test_narrow_layouts_hold_fewer_bytes() -> None:
    """A 2-bit layer holds half the code bytes of the same codes on the 4-bit layout, a 3-bit one three quarters
    (scales and zeros, float16 per group, are the same)."""
    codes, scale, zero, _ = affine_grid(256, 2048, 2, 128, False, 8)
    four = NativeLowBitKernel(codes, scale, zero, 128, bits=4)
    two = NativeLowBitKernel(codes, scale, zero, 128)
    three = NativeLowBitKernel(codes, scale, zero, 128, bits=3)
    assert two.grid.packed.numel() * 2 == four.grid.packed.numel() == three.grid.packed.numel() * 4 // 3
    assert two.nbytes() < 0.55 * four.nbytes() and three.nbytes() < 0.8 * four.nbytes()
    assert torch.equal(two.codes(), codes) and torch.equal(three.codes(), codes)


@needs_native
def test_float_zeros_and_batched_inputs() -> None:
    torch.manual_seed(1)
    layer = quantized(torch.randn(64, 256), 4, 32, symmetric=False, float_zeros=True)
    err, name = rel_error(layer, torch.randn(2, 5, 256))
    assert name == "native4" and err < TOL
    assert torch.equal(layer.kernel.codes(), layer.codes())


@needs_native
def test_activation_rounding_is_the_only_error() -> None:
    """With an input already on the grid of each block of 32 (integers, and 127 in every block: the residual
    level is 0), the kernel is exact up to float32 summation."""
    torch.manual_seed(2)
    layer = quantized(torch.randn(32, 256), 4, 64, symmetric=False)
    x = torch.randint(-127, 128, (3, 256)).float()
    x[:, ::32] = 127.0
    kernel = select_kernel(layer)
    ref = F.linear(x, layer.dequantize().double().float())
    assert torch.allclose(kernel(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_native
def test_shapes_the_layout_does_not_take_fall_back() -> None:
    torch.manual_seed(3)
    assert not gemv.supports(172, 32) and not gemv.supports(192, 96) and not gemv.supports(384, 192)
    assert gemv.supports(96, None) and gemv.supports(384, 128) and gemv.supports(512, 256)
    assert rel_error(quantized(torch.randn(48, 172), 4, 32, True), torch.randn(2, 172))[1] == "int8"
    assert rel_error(quantized(torch.randn(64, 192), 4, 96, True), torch.randn(2, 192))[1] == "int4"
    assert rel_error(quantized(torch.randn(48, 256), 5, 32, True), torch.randn(2, 256))[1] == "int8"


@needs_native
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avxvnni")])
def test_avx2_builds_agree_with_the_native_build(flags: tuple[str, ...]) -> None:
    """The AVX-VNNI and plain AVX2 (maddubs) code paths, built here as variants, give the same sums."""
    lib = gemv.build_library(flags)
    assert lib.hc_isa().decode() in ("avxvnni", "avx2")
    torch.manual_seed(4)
    for bits in (1, 2, 3, 4):  # every layout's unpacking has its own AVX2 code
        for group in (32, 64, 128, None):
            groups = 1 if group is None else 384 // group
            grid = gemv.PackedGrid(torch.randint(0, 1 << bits, (24, 384)), torch.rand(24, groups),
                                   torch.rand(24, groups) * ((1 << bits) - 1), group)
            assert grid.bits == bits
            for rows in (1, 3, 8):
                x = torch.randn(rows, 384)
                assert torch.allclose(grid(x, lib), grid(x), rtol=1e-5, atol=1e-4), (bits, group, rows)


def test_no_native_env_gives_the_torch_kernels_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    layer = quantized(torch.randn(64, 256), 4, 32, symmetric=False)
    codes, zeros = layer.codes(), layer.zeros()
    x = torch.randn(3, 256)
    monkeypatch.setenv("HIERCOMP_NO_NATIVE", "1")
    assert not gemv.available() and "HIERCOMP_NO_NATIVE" in gemv.reason()
    kernel = affine_kernel(codes, layer.scales, zeros, 32, 4)
    assert isinstance(kernel, Int4Kernel)
    assert torch.equal(kernel(x), Int4Kernel(codes, layer.scales, zeros, 32)(x))
    odd = affine_kernel(codes[:40], layer.scales[:40], zeros[:40], 32, 4)  # 40 rows: not the int4 kernel's
    assert isinstance(odd, Int8Kernel)
    assert torch.equal(odd(x), Int8Kernel(codes[:40], layer.scales[:40], zeros[:40], 32, 4)(x))


def test_unavailable_library_falls_back_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIERCOMP_NO_NATIVE", raising=False)
    monkeypatch.setattr(gemv, "_load", lambda: (None, "no C++ compiler (test)"))
    gemv.warn_unavailable.cache_clear()
    try:
        layer = quantized(torch.randn(64, 256), 4, 32, symmetric=True)
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler") as record:
            assert select_kernel(layer).name == "int4"
            assert select_kernel(layer).name == "int4"
        assert len(record) == 1
    finally:
        gemv.warn_unavailable.cache_clear()


def test_failed_build_is_an_os_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HIERCOMP_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(OSError, match="false failed"):
        gemv.build_library()
    assert os.listdir(tmp_path / "kernels") == []  # no half-written library left behind


@needs_native
def test_release_keeps_one_copy_and_the_state_dict() -> None:
    torch.manual_seed(6)
    model = torch.nn.Sequential(quantized(torch.randn(48, 256), 3, 64, False),
                                quantized(torch.randn(32, 48), 4, None, True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 256)
    ref = model(x)
    assert set_runtime(model, "fast", release=True) == {"0": "native4", "1": "int8"}  # 48 inputs: not a multiple of 32
    assert model[0].qweight.device.type == "meta"
    assert isinstance(model[0].kernel, NativeLowBitKernel)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float((model(x) - ref).norm() / ref.norm()) < TOL


@needs_native
@needs_shared
def test_stories260k_fast_logits_match_the_reference() -> None:
    """The whole tiny Llama compressed (4-bit attention, 2-bit MLP), decoded and prefilled on the native kernel."""
    import hiercomp

    recipe = {"rules": [{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*self_attn*"]},
                        {"method": "rtn", "bits": 2, "group_size": 64, "targets": ["*mlp*"]}]}
    cm = hiercomp.compress(str(STORIES), recipe, progress=False)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cm.model(ids).logits
        paths = set_runtime(cm.model, "fast")
        assert "native4" in set(paths.values())
        fast = cm.model(ids).logits
        one = cm.model(ids[:1, :1]).logits  # one token: the batch-1 decode shape
    assert float((fast - ref).norm() / ref.norm()) < TOL
    assert float((one - ref[:1, :1]).norm() / ref[:1, :1].norm()) < TOL


@needs_native
@pytest.mark.parametrize("shape", [(300, 2048), (37, 50), (64, 576)])
@pytest.mark.parametrize("rows", [1, 3])
def test_native_float32_gemv_equals_f_linear(shape: tuple[int, int], rows: int) -> None:
    torch.manual_seed(rows)
    weight, x = torch.randn(*shape), torch.randn(rows, shape[1])
    ref = F.linear(x, weight)
    assert float((gemv.dense(x, weight) - ref).norm() / ref.norm()) < 1e-6
    variant = gemv.build_library(("-mno-avx512f",))  # the AVX2 build: 8 lanes, another tail
    assert float((gemv.dense(x, weight, variant) - ref).norm() / ref.norm()) < 1e-6


@needs_native
def test_dense_layers_of_a_compressed_model_take_the_float32_gemv_for_decode() -> None:
    """A head kept dense (and any plain float32 Linear) in a fast-runtime model: the native GEMV for up to
    DENSE_MAX_ROWS rows, F.linear for a prefill or with gradients; the reference runtime gives F.linear back."""
    from torch import nn

    from hiercomp.layers import kernels

    model = nn.Sequential(quantized(torch.randn(64, 128), 4, 32, False), nn.Linear(64, 96))
    set_runtime(model, "fast")
    head = model[1]
    assert "forward" in vars(head)
    step, prefill = torch.randn(1, 1, 128), torch.randn(1, 40, 128)
    with torch.no_grad():
        for x in (step, prefill):
            hidden = model[0](x)
            ref = F.linear(hidden, head.weight, head.bias)
            assert float((head(hidden) - ref).norm() / ref.norm()) < 1e-6
    called = []
    original = gemv.dense
    gemv.dense = lambda *a, **k: called.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            model(step)
        model(step).sum().backward()  # with gradients: F.linear, so the weight gets its gradient
    finally:
        gemv.dense = original
    assert called == [1] and head.weight.grad is not None
    set_runtime(model, "reference")
    assert "forward" not in vars(head) and not hasattr(head, kernels.DENSE_FORWARD)


@needs_native
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape_group", [((37, 576), 64), ((5, 96), 32), ((130, 256), 128), ((9, 640), None)])
def test_a_grid_packed_from_the_stored_bitstream_is_the_grid_from_its_codes(bits: int, shape_group) -> None:
    # hc_pack_stream reads the layer's stored form (pack_bits' dense little-endian stream, rows not byte-aligned
    # for odd widths) straight into the layout: bit for bit what PackedGrid makes from the unpacked codes.
    from hiercomp.layers.packing import pack_bits

    (rows, cols), group = shape_group
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=generator)
    groups = 1 if group is None else cols // group
    scale, zero = torch.rand(rows, groups, generator=generator), torch.randint(0, 1 << bits, (rows, groups)).float()
    reference = gemv.PackedGrid(codes, scale, zero, group, bits=bits)
    streamed = gemv.PackedGrid.from_stream(pack_bits(codes, bits), bits, rows, cols, scale, zero, group)
    assert streamed.layout == reference.layout
    assert torch.equal(streamed.packed, reference.packed)
    assert torch.equal(streamed.scale, reference.scale) and torch.equal(streamed.zero, reference.zero)
    assert torch.equal(streamed.codes(), codes.to(torch.int32))
    with pytest.raises(ValueError, match="does not hold"):  # a stream too short for the shape
        gemv.PackedGrid.from_stream(pack_bits(codes, bits)[:-2], bits, rows, cols, scale, zero, group)
