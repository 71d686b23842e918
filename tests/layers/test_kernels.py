"""Fast compute paths (hiercomp.layers.kernels) against the reference (dequantize) path.

The integer kernels take bfloat16 activations and scales (torch's CPU kernels are vectorised for bfloat16 only),
so their outputs match the reference within bfloat16 rounding: asserted as ≤ 1e-2 of the output's norm (measured
~3e-3). Float32 paths (low-rank, sparse) are asserted to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hiercomp.layers import BitStackLinear, HLQLinear, LowRankLinear, QuantizedLinear, SparseLinear, gemv
from hiercomp.layers.base import CompressedLinear
from hiercomp.layers.bitstack import pack_signs
from hiercomp.layers.kernels import select_kernel, set_runtime
from hiercomp.quant.grid import QuantGrid, fit_grid, quantize_weight
from tests.conftest import STORIES, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_TOL = 1e-2
# 1-4 bit grids run on the native kernel where it builds (this machine, CI), else on torch's int4 kernel.
LOW_BIT = "native4" if gemv.available() else "int4"
FP32_TOL = 1e-5


def rel_error(layer: CompressedLinear, x: torch.Tensor) -> tuple[float, str]:
    """Relative error of the fast forward against F.linear with the dequantized weight, and the kernel used."""
    ref = F.linear(x, layer.dequantize(), layer.bias)
    layer.kernel = select_kernel(layer)
    assert layer.kernel is not None
    fast = layer(x)
    return float((fast - ref).norm() / ref.norm()), layer.kernel.name


def quantized(weight: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> QuantizedLinear:
    grid = QuantGrid(bits, group, symmetric)
    scale, zero = fit_grid(weight, grid)
    return QuantizedLinear(grid, quantize_weight(weight, grid, scale, zero), scale, zero, torch.randn(weight.shape[0]))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_grids_fast_equals_reference(bits: int, group: int | None, symmetric: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 256)
    # 64 rows x 256 columns fit torch's int4 kernel (rows % 16, groups % 32); 48 x 172 (a short last group)
    # does not and takes the int8 path at every width.
    err, name = rel_error(quantized(torch.randn(64, 256), bits, group, symmetric), x)
    assert err < BF16_TOL
    assert name == (LOW_BIT if bits <= 4 else "int8")
    err, name = rel_error(quantized(torch.randn(48, 172), bits, group, symmetric), x[..., :172])
    assert err < BF16_TOL and name == "int8"


def test_int4_codes_come_back_exactly_and_the_kernel_zero_matches_the_grid() -> None:
    torch.manual_seed(0)
    layer = quantized(torch.randn(64, 256), 4, 64, symmetric=False)
    codes = layer.codes()
    kernel = select_kernel(layer)
    assert torch.equal(kernel.codes(), codes)
    # The kernel's (q - 8) * s + s * (8 - z) is our s * (q - z): the bf16 weight it applies to a unit vector.
    eye = torch.eye(256)
    assert torch.allclose(kernel(eye).t(), layer.dequantize(), rtol=1e-2, atol=1e-2 * float(layer.scales.max()))


def test_hqq_float_zeros_fast_equals_reference() -> None:
    torch.manual_seed(1)
    for shape in [(64, 256), (48, 172)]:
        weight = torch.randn(*shape)
        grid = QuantGrid(4, 32, False)
        scale, zero = fit_grid(weight, grid)
        zero = (zero + torch.rand_like(zero) - 0.5).half().float()
        codes = quantize_weight(weight, grid, scale, zero)
        layer = QuantizedLinear(grid, codes, scale, zero, None, zero_format="fp16")
        err, _ = rel_error(layer, torch.randn(5, shape[1]))
        assert err < BF16_TOL


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, None])
def test_hlq_planes_fast_equals_reference(bits: int, group: int | None) -> None:
    torch.manual_seed(bits)
    for out_f, in_f in [(64, 256), (48, 172)]:
        groups = 1 if group is None else -(-in_f // group)
        layer = HLQLinear(bits, group, torch.randint(0, 2**bits, (out_f, in_f)),
                          torch.rand(out_f, groups, bits) * 0.1, torch.randn(out_f, groups) * 0.1, None)
        err, name = rel_error(layer, torch.randn(4, in_f))
        assert err < BF16_TOL and name.startswith("planes")


def test_bitstack_signs_fast_equals_reference_and_follows_set_active() -> None:
    torch.manual_seed(2)
    for out_f, in_f in [(64, 256), (48, 172)]:
        n, rank = 3, 4
        signs = torch.stack([pack_signs(torch.randn(out_f, in_f)) for _ in range(n)])
        layer = BitStackLinear(signs, torch.rand(n, out_f, rank), torch.rand(n, rank, in_f), torch.rand(in_f) + 0.5,
                               torch.randn(out_f))
        x = torch.randn(3, in_f)
        err, _ = rel_error(layer, x)
        assert err < BF16_TOL
        layer.set_active(1)  # the kernel follows the prefix
        ref = F.linear(x, layer.dequantize(), layer.bias)
        assert float((layer(x) - ref).norm() / ref.norm()) < BF16_TOL


def test_lowrank_and_sparse_fast_paths_are_float32_exact() -> None:
    torch.manual_seed(3)
    weight = torch.randn(48, 172)
    x = torch.randn(2, 7, 172)
    err, name = rel_error(LowRankLinear(torch.randn(48, 8), torch.randn(8, 172), torch.randn(48)), x)
    assert err < FP32_TOL and name == "lowrank"
    err, _ = rel_error(SparseLinear(weight, torch.rand(48, 172) > 0.5, None), x)
    assert err < FP32_TOL
    runs = weight.abs().view(48, 43, 4)
    mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(2, runs.topk(2, dim=2).indices, True).view(48, 172)
    err, name = rel_error(SparseLinear(weight, mask, None, nm=(2, 4)), x)
    assert err < FP32_TOL and name == "dense-once"


def test_set_runtime_release_keeps_the_state_dict_and_reference_restores() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(quantized(torch.randn(64, 256), 4, 32, False), quantized(torch.randn(48, 64), 8, None, False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 256)
    ref = model(x)
    paths = set_runtime(model, "fast", release=True)
    assert paths == {"0": LOW_BIT, "1": "int8"}
    assert model[0].qweight.device.type == "meta"  # one copy of the codes: the kernel's
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float((model(x) - ref).norm() / ref.norm()) < BF16_TOL
    assert set(set_runtime(model, "reference").values()) == {"reference"}
    assert model[0].qweight.device.type == "cpu" and torch.equal(model(x), ref)


class _NoKernelLayer(LowRankLinear):
    """A layer kind the kernel table does not know: it must fall back to its own forward."""


def test_unknown_layer_kind_falls_back_and_says_so_once() -> None:
    model = nn.Sequential(_NoKernelLayer(torch.randn(8, 2), torch.randn(2, 8), None),
                          _NoKernelLayer(torch.randn(8, 2), torch.randn(2, 8), None))
    with pytest.warns(UserWarning, match="no fast path for _NoKernelLayer") as record:
        paths = set_runtime(model, "fast")
    assert len(record) == 1 and set(paths.values()) == {"reference"}


@needs_shared
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 64, True), (2, 32, False), (3, None, False),
                                                  (8, None, True), (6, 32, False)])
def test_real_stories260k_layers_fast_equals_reference(bits: int, group: int | None, symmetric: bool) -> None:
    """Every linear layer of stories260K quantized (64x64, 32x64, 172x64, 64x172: int4 where the shape fits,
    int8 with a short last group elsewhere), fed real hidden states."""
    from transformers import AutoModelForCausalLM

    from hiercomp.hierarchy import walk

    model = AutoModelForCausalLM.from_pretrained(str(STORIES))
    ids = torch.randint(3, 500, (1, 24))
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(_module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
        return hook

    hooks = [model.get_submodule(info.name).register_forward_hook(keep_input(info.name))
             for info in walk(model).linears]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    for name, x in inputs.items():
        layer = quantized(model.get_submodule(name).weight.detach(), bits, group, symmetric)
        with torch.no_grad():
            err, _ = rel_error(layer, x)
        assert err < BF16_TOL, name
