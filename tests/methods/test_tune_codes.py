"""The discrete half of recovery tuning (hiercomp.tune_codes): V steps that re-choose stored codes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hiercomp
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers
from hiercomp.methods import make_method
from hiercomp.recipe import Recipe
from hiercomp.tune import TuneConfig
from hiercomp.tune_codes import recode, recoder_for
from tests.methods.test_tune import CALIB, IDS, assert_reloads_bit_exactly, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _dequantize_with(layer, attr):
    def dequantize(codes):
        saved = getattr(layer, attr)
        layer.__dict__[attr] = lambda: codes
        try:
            return layer.dequantize()
        finally:
            layer.__dict__[attr] = saved
    return dequantize


@pytest.mark.parametrize(("method", "params", "unit"), [
    ("rtn", {"bits": 3, "group_size": 32}, 1),
    ("hqq", {"bits": 2, "group_size": 32}, 1),  # float16 zeros
    ("e8", {"bits": 3.0}, 8),
    ("trellis", {"bits": 2, "state_bits": 8}, 64),
])
def test_a_v_step_moves_the_units_that_gain_most_toward_the_target(method, params, unit):
    torch.manual_seed(0)
    layer = make_method(method, **params).compress(torch.randn(16, 64), None, None, "x", "linear")
    recoder = recoder_for(layer)
    codes = getattr(layer, recoder.attr)()
    tensors = codes if isinstance(codes, list) else [codes]
    before = [c.clone() for c in tensors]
    layer.__dict__[recoder.attr] = lambda: codes  # what tuning does: its dequantize reads the cached codes
    weight = layer.dequantize()
    target = weight + 0.3 * torch.randn_like(weight) * weight.std()
    grad = weight - target  # the gradient of ½‖W − T‖²: a step of lr = rms(W − T) / rms(W) lands on T exactly
    lr = float((weight - target).pow(2).mean().sqrt() / weight.pow(2).mean().sqrt())
    fraction = 0.1
    units = weight.numel() // unit
    changed = recode(layer, recoder, codes, weight, grad, _dequantize_with(layer, recoder.attr), lr, fraction)
    assert 0 < changed <= math.ceil(fraction * units)
    after = layer.dequantize()
    assert (after - target).pow(2).sum() < (weight - target).pow(2).sum()
    # each unit that changed took the code nearest the target; the others kept theirs
    nearest = recoder.encode(layer, target)
    for old, new, best in zip(before, tensors, nearest if isinstance(nearest, list) else [nearest]):
        moved = new != old
        assert bool(moved.any()) and torch.equal(new[moved], best.to(new.dtype)[moved])
    assert recode(layer, recoder, codes, after, torch.zeros_like(grad), None, lr, fraction) == 0  # no gradient


@pytest.mark.parametrize(("method", "params"), [
    ("gptq", {"bits": 2, "group_size": 32, "rotate": True}),
    ("quip", {"bits": 2.0}),
    ("rot_trellis", {"bits": 2, "state_bits": 8}),
    ("quip", {"bits": 2.5, "row_scales": False}),  # one scale per stage for the whole layer
    ("rot_trellis", {"bits": 2, "state_bits": 8, "row_scales": False}),
    ("quip", {"bits": 3.0, "scale_bits": 8}),  # float8 ratios to a float16 base per stage
    ("rot_trellis", {"bits": 2, "state_bits": 8, "scale_bits": 8}),
])
def test_tuning_with_v_steps_re_chooses_codes_and_reloads_bit_exactly(tmp_path, method, params):
    loaded = tiny_llama()
    plain = hiercomp.compress(copy.deepcopy(loaded), Recipe.single(method, **params), CALIB, progress=False)
    cm = hiercomp.compress(loaded, Recipe.single(method, **params), CALIB, progress=False,
                           recovery=TuneConfig(steps=6, lr=1e-2, keep_best=False, code_every=2, code_lr=0.1,
                                               code_fraction=0.02))
    facts = cm.extra["tuning"]
    assert facts["codes_changed"] > 0 and facts["code_every"] == 2
    stored = [n for n in compressed_layers(cm.model)["model.layers.0.mlp.up_proj"].state_dict()
              if n.startswith("inner_") and "scales" not in n and "seed" not in n]
    assert stored and any(  # the re-chosen codes are in the stored (packed) buffers
        not torch.equal(layer.state_dict()[n], compressed_layers(plain.model)[name].state_dict()[n])
        for name, layer in compressed_layers(cm.model).items() for n in stored)
    logits, _ = assert_reloads_bit_exactly(cm, tmp_path / "m")
    fast = hiercomp.load(tmp_path / "m", runtime="fast")
    with torch.no_grad():
        assert torch.allclose(fast.model(input_ids=IDS).logits, logits, atol=1e-4)


def test_a_v_step_that_hurts_is_undone_by_the_held_out_check():
    loaded = tiny_llama()
    plain = hiercomp.compress(copy.deepcopy(loaded), Recipe.single("gptq", bits=3, group_size=32), CALIB,
                              progress=False)
    # every step moves half the codes by a huge step; the P step is negligible: only the untuned state is kept
    cm = hiercomp.compress(loaded, Recipe.single("gptq", bits=3, group_size=32), CALIB, progress=False,
                           recovery=TuneConfig(steps=4, lr=1e-9, check_every=1, code_every=1, code_lr=5.0,
                                               code_fraction=0.5))
    facts = cm.extra["tuning"]
    assert facts["best_step"] == 0 and facts["codes_changed"] == 0
    for name, layer in compressed_layers(cm.model).items():
        assert torch.equal(layer.qweight, compressed_layers(plain.model)[name].qweight)


def test_v_step_settings_are_checked():
    for bad in ({"code_every": -1}, {"code_every": 2, "code_fraction": 0.0}, {"code_every": 2, "code_lr": 0.0}):
        with pytest.raises(HiercompError, match="re-choosing codes needs"):
            hiercomp.compress(tiny_llama(), Recipe.single("rtn", bits=4), CALIB, progress=False,
                              recovery=TuneConfig(steps=2, **bad))
