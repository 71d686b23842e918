"""The native low-bit kernel (hiercomp.layers.gemv, gemv.cpp) against the reference (dequantize) path.

Its activation is rounded to two int8 levels per block of 32 (~15 bits), so outputs match the reference within
that rounding: asserted as ≤ 1e-2 of the output's norm like every fast path, and ≤ 1e-3 to pin the precision
(measured ~5e-5). The codes come back exactly. Where the native
kernel is off (``HIERCOMP_NO_NATIVE=1``, or unavailable), the torch kernels take the layers as before.
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
        assert torch.equal(layer.kernel.codes(), layer.codes())


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
    for group in (32, 64, 128, None):
        grid = gemv.PackedGrid(torch.randint(0, 16, (24, 384)), torch.rand(24, 1 if group is None else 384 // group),
                               torch.rand(24, 1 if group is None else 384 // group) * 15, group)
        for rows in (1, 3, 8):
            x = torch.randn(rows, 384)
            assert torch.allclose(grid(x, lib), grid(x), rtol=1e-5, atol=1e-4)


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
