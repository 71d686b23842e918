"""The 2–3 bit frontier: randomized Hadamard rotations, the E8 lattice codebook, and their layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import hiercomp
from hiercomp.budget.levels import parse_levels
from hiercomp.engine import relative_output_error
from hiercomp.errors import HiercompError
from hiercomp.io.hf import LoadedModel
from hiercomp.layers import RotatedLinear
from hiercomp.layers.vq import E8Linear, _brute_force, e8_codebook, encode_stage
from hiercomp.methods import LayerStats, make_method
from hiercomp.quant import hadamard
from hiercomp.quant.hadamard import RandomHadamard, fwht, rotate_hessian, rotate_weight, sylvester_hadamard
from hiercomp.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fwht_is_the_orthonormal_sylvester_hadamard_matrix():
    h = sylvester_hadamard(16)
    # Sylvester recursion H_2k = [[H, H], [H, -H]], built independently of the fast transform
    ref = torch.ones(1, 1, dtype=torch.float64)
    while ref.shape[0] < 16:
        ref = torch.cat([torch.cat([ref, ref], 1), torch.cat([ref, -ref], 1)], 0)
    assert torch.equal(h, ref / 4)  # ±1/4 exactly
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h.t(), atol=1e-12)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)  # an orthonormal involution
    with pytest.raises(ValueError):
        fwht(torch.zeros(12))


@pytest.mark.parametrize("n", [64, 172, 576, 47])
def test_random_hadamard_is_orthogonal_and_regenerated_bit_exactly(n):
    t = RandomHadamard(n, 123)
    m = t.matrix().double()
    assert torch.allclose(m @ m.t(), torch.eye(n, dtype=torch.float64), atol=2e-6)
    x = torch.randn(4, n)
    assert torch.allclose(t.apply_transpose(t.apply(x)), x, atol=1e-5)
    assert torch.allclose(t.apply(x), x @ t.matrix().t(), atol=1e-5)
    hadamard._factors.cache_clear()  # regenerate from the seed alone
    again = RandomHadamard(n, 123)
    assert torch.equal(again.matrix(), t.matrix())
    assert not torch.equal(RandomHadamard(n, 124).matrix(), t.matrix())


def test_rotation_spreads_an_outlier_and_preserves_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(48, 172) * 0.02
    w[3, 7] = 1.0  # one huge weight
    t_in, t_out = RandomHadamard(172, 0), RandomHadamard(48, 1)
    rotated = rotate_weight(w, t_in, t_out)
    kurtosis = lambda v: float((v - v.mean()).pow(4).mean() / v.var().pow(2))  # noqa: E731
    assert kurtosis(w) > 400 and kurtosis(rotated) < 4  # a Gaussian has 3
    x = torch.randn(300, 172)
    h = x.t() @ x / 300
    dw = torch.randn(48, 172) * 0.01
    # tr(ΔW H ΔWᵀ) is the same in rotated coordinates with H' = T_in H T_inᵀ
    before = float(torch.trace(dw @ h @ dw.t()))
    after = float(torch.trace(rotate_weight(dw, t_in, t_out) @ rotate_hessian(h, t_in)
                              @ rotate_weight(dw, t_in, t_out).t()))
    assert after == pytest.approx(before, rel=1e-4)


def test_e8_codebook_is_a_ball_of_lattice_points_and_the_fast_search_is_exact():
    words = e8_codebook(16)[0]
    doubled = (words * 2).round().long()
    assert words.shape == (65536, 8) and torch.unique(doubled, dim=0).shape[0] == 65536
    parity = doubled % 2
    assert bool(((parity == 0).all(1) | (parity == 1).all(1)).all())  # all integer or all half-integer
    assert bool((doubled.sum(1) % 4 == 0).all())  # even coordinate sum: E8
    assert float(words.pow(2).sum(1).max()) == 12.0
    torch.manual_seed(0)
    x = torch.randn(1500, 8)
    fast = (x - words[encode_stage(x, 16)]).pow(2).sum()
    exact = (x - words[_brute_force(x, words)]).pow(2).sum()
    assert float(fast) <= float(exact) * 1.002
    # the MSE of 2 bits per weight on a unit Gaussian: ~0.0915, i.e. 0.275 bit above the Shannon bound
    assert 0.088 < float(exact) / x.numel() < 0.096


def _correlated_layer(out: int = 128, inp: int = 256):
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(inp, inp, generator=gen) * torch.linspace(1, 0.05, inp).pow(2).unsqueeze(1)
    x = torch.randn(2048, inp, generator=gen) @ mix
    x[:, :4] *= 10  # a few heavy input channels
    h = x.t() @ x / x.shape[0]
    w = torch.randn(out, inp, generator=gen) * 0.02
    w[:, 5] *= 8  # an outlier column
    return w, LayerStats(torch.diagonal(h).clone(), x.shape[0], h)


def test_vector_quantization_beats_scalar_gptq_at_2_bits():
    w, stats = _correlated_layer()
    errors, rates = {}, {}
    for label, name, params in [("gptq", "gptq", dict(bits=2, group_size=128)),
                                ("rot_gptq", "rot_gptq", dict(bits=2, group_size=128)),
                                ("quip", "quip", dict(bits=2))]:
        layer = make_method(name, **params).compress(w, None, stats, "l", "linear")
        errors[label] = relative_output_error(w, layer.dequantize(), stats.hessian)
        rates[label] = layer.bits_per_weight()
    assert rates["quip"] == pytest.approx(2 + (16 + 64 / 128) / 256)  # codes + row scales + the seed
    assert rates["quip"] < rates["gptq"] == pytest.approx(2 + 18 / 128)
    assert errors["rot_gptq"] < 0.8 * errors["gptq"]  # incoherence helps the scalar grid too
    assert errors["quip"] < 0.4 * errors["gptq"]  # measured: 0.0040 vs 0.0169
    assert errors["quip"] < 0.02


def test_layer_scales_cost_16_bits_per_stage_per_layer_and_little_error_after_a_two_sided_rotation():
    from hiercomp.layers.base import build_layer

    w, stats = _correlated_layer()
    layers = {(name, rows): make_method(name, bits=3, row_scales=rows).compress(w, None, stats, "l", "linear")
              for name in ("quip", "rot_trellis") for rows in (True, False)}
    errors = {key: relative_output_error(w, layer.dequantize(), stats.hessian) for key, layer in layers.items()}
    bits = {key: layer.storage_bits() for key, layer in layers.items()}
    assert bits["quip", True]["inner_scales"] == 128 * 2 * 16 and bits["quip", False]["inner_scales"] == 2 * 16
    assert bits["rot_trellis", True]["inner_scales"] == 128 * 16 and bits["rot_trellis", False]["inner_scales"] == 16
    assert layers["quip", False].bits_per_weight() == pytest.approx(3 + (2 * 16 + 64) / (128 * 256))
    # measured: quip 0.00641 vs 0.00516 per row (0.124 bpw less), rot_trellis 0.00289 vs 0.00284 (0.062 less)
    assert errors["quip", False] < 1.3 * errors["quip", True]
    assert errors["rot_trellis", False] < 1.1 * errors["rot_trellis", True]
    for name in ("quip", "rot_trellis"):
        inner = layers[name, False].inner
        assert inner.layer_config()["row_scales"] is False
        assert "row_scales" not in layers[name, True].inner.layer_config()  # as in folders saved before the option
        again = build_layer(inner.full_config())
        again.load_state_dict(inner.state_dict())
        assert not again.row_scales and torch.equal(again.dequantize(), inner.dequantize())


def test_8_bit_row_scales_halve_the_scale_cost_and_lose_little():
    from hiercomp.layers.base import build_layer

    w, stats = _correlated_layer()
    layers = {(name, sb): make_method(name, bits=3, scale_bits=sb).compress(w, None, stats, "l", "linear")
              for name in ("quip", "rot_trellis") for sb in (16, 8)}
    errors = {key: relative_output_error(w, layer.dequantize(), stats.hessian) for key, layer in layers.items()}
    bits = {key: layer.storage_bits() for key, layer in layers.items()}
    assert bits["quip", 8]["inner_scales"] == 128 * 2 * 8 and bits["quip", 8]["inner_scale_base"] == 2 * 16
    assert bits["rot_trellis", 8]["inner_scales"] == 128 * 8 and bits["rot_trellis", 8]["inner_scale_base"] == 16
    # measured: quip 0.00538 vs 0.00516, rot_trellis 0.00286 vs 0.00284
    assert errors["quip", 8] < 1.06 * errors["quip", 16] and errors["rot_trellis", 8] < 1.02 * errors["rot_trellis", 16]
    for name in ("quip", "rot_trellis"):
        inner = layers[name, 8].inner
        assert inner.scales.dtype == torch.float8_e4m3fn and inner.layer_config()["scale_bits"] == 8
        ratios = inner.scales.float()
        assert float(ratios.max()) <= 256 and float(ratios.min()) > 0
        assert torch.equal(inner.scale_base, torch.exp2(torch.log2(inner.scale_base.float())).half())  # powers of 2
        again = build_layer(inner.full_config())
        again.load_state_dict(inner.state_dict())
        assert torch.equal(again.dequantize(), inner.dequantize())
    for bad, match in ((dict(scale_bits=4), "scale_bits must be 16 or 8"),
                       (dict(scale_bits=8, row_scales=False), "leave scale_bits at 16")):
        with pytest.raises(HiercompError, match=match):
            make_method("quip", bits=3.0, **bad)


@pytest.mark.parametrize("name,params", [("quip", dict(bits=2.5)), ("rot_rtn", dict(bits=3, group_size=32)),
                                         ("e8", dict(bits=3, ldlq=False))])
def test_layer_forward_equals_its_dequantized_weight(name, params):
    torch.manual_seed(0)
    w, bias = torch.randn(48, 172), torch.randn(48)
    layer = make_method(name, **params).compress(w, bias, None, "l", "linear")
    x = torch.randn(2, 5, 172)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantize(), bias), atol=1e-4)
    rel = float((layer.dequantize() - w).pow(2).mean() / w.var())
    assert rel < 0.1


def test_save_load_bit_exact_and_bits_equal_bytes_on_disk(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.from_dict({"rules": [{"method": "rot_gptq", "bits": 3, "group_size": 32, "targets": ["*"]},
                                         {"method": "quip", "bits": 2, "targets": ["*mlp*"]}]})  # later wins
    cm = hiercomp.compress(LoadedModel(model, None, False, "llama"), recipe, calib, progress=False)
    kinds = {type(m.inner).__name__ for m in cm.model.modules() if isinstance(m, RotatedLinear)}
    assert kinds == {"E8Linear", "QuantizedLinear"}
    ids = torch.arange(16).view(1, 16)
    with torch.no_grad():
        logits = cm.model(input_ids=ids).logits
    cm.save(tmp_path / "m")
    again = hiercomp.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, logits)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for report in cm.report.layers:
        layer = cm.model.get_submodule(report.name)
        on_disk = sum(t.numel() * t.element_size() * 8 for k, t in stored.items() if k.startswith(report.name + "."))
        assert on_disk == layer.total_bits(), report.name  # every count here is a whole number of bytes
        assert layer.storage_bits()["rotation_seed"] == 64
    assert isinstance(again.model.model.layers[0].mlp.up_proj.inner, E8Linear)


def test_levels_name_the_new_methods():
    levels, _ = parse_levels("quip:bits=2,3;rot_gptq:bits=2:group_size=128;e8:bits=2.5")
    assert [lv.label for lv in levels] == ["quip:bits=2", "quip:bits=3", "rot_gptq:bits=2:group_size=128",
                                           "e8:bits=2.5"]
    assert levels[0].make().describe().startswith("quip(bits=2")
    with pytest.raises(hiercomp.errors.HiercompError):
        make_method("quip", bits=2.25)


def test_gaussian_rate_distortion_within_0_3_bit_of_the_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 1024)
    layer = make_method("e8", bits=2).compress(w, None, None, "l", "linear")
    rate = sum(layer.weight_storage_bits().values()) / w.numel()
    mse = float((w - layer.dequantize()).pow(2).mean())
    above = rate - 0.5 * math.log2(float(w.var(unbiased=False)) / mse)
    assert rate == pytest.approx(2 + 16 / 1024)
    assert above < 0.3
    assert np.isfinite(above)
