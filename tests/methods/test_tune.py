"""--rotate under every quantizer, and recovery tuning after quantization (hiercomp.tune)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import hiercomp
from hiercomp.cli import main
from hiercomp.depth.scoring import model_outputs, output_damage
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers
from hiercomp.io.hf import LoadedModel
from hiercomp.layers import RotatedLinear
from hiercomp.recipe import Recipe
from hiercomp.tune import TuneConfig, sampled_windows, split_recovery, tune
from tests.conftest import STORIES, TINYSTORIES, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> LoadedModel:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64))
    return LoadedModel(model, None, False, "llama")


CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.arange(16).view(1, 16)


def assert_reloads_bit_exactly(cm: hiercomp.CompressedModel, folder) -> tuple[torch.Tensor, hiercomp.CompressedModel]:
    """Save ``cm`` to ``folder``; the reference load computes the same logits bit for bit. Returns (logits, load)."""
    with torch.no_grad():
        logits = cm.model(input_ids=IDS).logits
    cm.save(folder)
    again = hiercomp.load(folder, runtime="reference")
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=IDS).logits, logits)
    return logits, again


@pytest.mark.parametrize(("method", "params", "inner"), [
    ("rtn", {"bits": 3, "group_size": 32}, "QuantizedLinear"),
    ("gptq", {"bits": 3, "group_size": 32}, "QuantizedLinear"),
    ("hqq", {"bits": 2, "group_size": 32}, "QuantizedLinear"),
    ("hlq", {"bits": 2, "group_size": 32}, "HLQLinear"),
])
def test_rotate_wraps_the_quantizer_and_reloads_bit_exactly(tmp_path, method, params, inner):
    recipe = Recipe.from_dict({"rules": [{"method": method, "rotate": True, "rotation_seed": 7, **params}]})
    assert recipe.rules[0].method.name == f"rot_{method}"
    assert recipe.to_dict()["rules"][0]["method"] == f"rot_{method}"  # the saved recipe names what ran
    cm = hiercomp.compress(tiny_llama(), recipe, CALIB, progress=False)
    layers = compressed_layers(cm.model)
    assert len(layers) == 14 and all(isinstance(m, RotatedLinear) and m.seed == 7 for m in layers.values())
    assert {type(m.inner).__name__ for m in layers.values()} == {inner}
    _, again = assert_reloads_bit_exactly(cm, tmp_path / "m")
    assert all(m.seed == 7 for m in compressed_layers(again.model).values())


def test_rotate_names_and_errors():
    assert Recipe.single("e8", bits=2.0, rotate=True).rules[0].method.name == "quip"
    assert Recipe.single("rot_gptq", bits=3, rotate=True).rules[0].method.name == "rot_gptq"
    assert Recipe.single("gptq", bits=3, rotate=False).rules[0].method.name == "gptq"
    with pytest.raises(HiercompError, match="rotate applies to the quantizers .*awq"):
        Recipe.single("awq", bits=3, rotate=True)
    with pytest.raises(HiercompError, match="rotate must be true or false"):
        Recipe.from_dict({"rules": [{"method": "gptq", "rotate": "yes"}]})


def test_tuning_lowers_the_loss_keeps_codes_and_dtypes_and_reloads_bit_exactly(tmp_path):
    loaded = tiny_llama()
    original = copy.deepcopy(loaded.model)
    plain = hiercomp.compress(copy.deepcopy(loaded), Recipe.single("gptq", bits=2, group_size=32, rotate=True), CALIB,
                              progress=False)
    # every window trains, at a constant step: the tuning itself, without the held-out guard
    cm = hiercomp.compress(loaded, Recipe.single("gptq", bits=2, group_size=32, rotate=True), CALIB, progress=False,
                           recovery=TuneConfig(steps=30, lr=1e-2, schedule="constant", keep_best=False))
    facts = cm.extra["tuning"]
    assert facts["steps"] == 30 and facts["loss_last"] < 0.5 * facts["loss_first"]
    # the discrete part is untouched, the float part moved and kept its stored dtype
    for name, layer in compressed_layers(cm.model).items():
        before = compressed_layers(plain.model)[name]
        assert torch.equal(layer.inner_qweight, before.inner_qweight) and torch.equal(layer.inner_qzeros,
                                                                                       before.inner_qzeros)
        assert layer.inner_scales.dtype == torch.float16 and not torch.equal(layer.inner_scales, before.inner_scales)
        assert layer.inner.scales is layer.inner_scales  # the inner layer computes with the tuned scales
    norm = cm.model.model.norm.weight
    assert not torch.equal(norm, plain.model.model.norm.weight)
    with torch.no_grad():
        ref = model_outputs(original, CALIB, False)
        kl = {k: float(output_damage(ref, model_outputs(m, CALIB, False), False).mean())
              for k, m in (("plain", plain.model), ("tuned", cm.model))}
    assert kl["tuned"] < 0.7 * kl["plain"]
    logits, again = assert_reloads_bit_exactly(cm, tmp_path / "m")
    assert again.extra["tuning"]["loss_last"] == facts["loss_last"]
    fast = hiercomp.load(tmp_path / "m", runtime="fast")  # the inner kernels are built from the tuned scales
    with torch.no_grad():
        assert torch.allclose(fast.model(input_ids=IDS).logits, logits, atol=1e-4)


def test_tuning_uncompressed_parameters_too_lowers_the_loss_more_and_reloads_bit_exactly(tmp_path):
    """PV-Tuning's update_non_quantized_parameters: the embeddings and the output head train with the scales."""
    loaded = tiny_llama()
    original = copy.deepcopy(loaded.model)
    recipe = Recipe.single("gptq", bits=2, group_size=32, rotate=True)
    runs = {}
    for uncompressed in (False, True):
        runs[uncompressed] = hiercomp.compress(
            copy.deepcopy(loaded), recipe, CALIB, progress=False,
            recovery=TuneConfig(steps=30, lr=1e-2, schedule="constant", keep_best=False, uncompressed=uncompressed))
    narrow, wide = runs[False], runs[True]
    assert wide.extra["tuning"]["trained_params"] - narrow.extra["tuning"]["trained_params"] == (
        original.model.embed_tokens.weight.numel() + original.lm_head.weight.numel())
    assert wide.extra["tuning"]["uncompressed"]
    for m in (wide, narrow):  # the norms train either way; the embeddings and head only when asked
        assert not torch.equal(m.model.model.norm.weight, original.model.norm.weight)
    assert torch.equal(narrow.model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(wide.model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(wide.model.lm_head.weight, original.lm_head.weight)
    assert wide.bits_per_weight == narrow.bits_per_weight  # dense parameters keep their size
    with torch.no_grad():
        ref = model_outputs(original, CALIB, False)
        kl = {k: float(output_damage(ref, model_outputs(m.model, CALIB, False), False).mean())
              for k, m in runs.items()}
    assert kl[True] < 0.6 * kl[False]  # measured: 1.6e-4 vs 4.2e-4 (a random model: its outputs are near uniform)
    assert_reloads_bit_exactly(wide, tmp_path / "m")


def test_sampled_windows_are_the_originals_own_text_seeded_and_train_with_the_calibration():
    teacher = tiny_llama().model.eval()
    windows = sampled_windows(teacher, CALIB, 10, seed=3)
    assert windows.shape == (10, CALIB.shape[1]) and windows.dtype == CALIB.dtype
    assert torch.equal(windows[:, 0], CALIB[torch.arange(10) % len(CALIB), 0])  # each starts as a window does
    assert torch.equal(windows, sampled_windows(teacher, CALIB, 10, seed=3))  # a rerun samples the same text
    assert not torch.equal(windows, sampled_windows(teacher, CALIB, 10, seed=4))
    # temperature 1: on a random model the samples spread over the vocabulary, not one greedy path
    assert windows[:, 1:].unique().numel() > 100
    # the model's own distribution: a repetition penalty in its generation config does not reach the samples
    teacher.generation_config.repetition_penalty = 5.0
    assert torch.equal(windows, sampled_windows(teacher, CALIB, 10, seed=3))
    teacher.generation_config.repetition_penalty = 1.0
    loaded = tiny_llama()
    cm = hiercomp.compress(loaded, Recipe.single("gptq", bits=2, group_size=32), CALIB, progress=False,
                           recovery=TuneConfig(steps=4, generated=12))
    assert cm.extra["tuning"]["generated"] == 12 and cm.extra["tuning"]["held_out"] == 1  # held out: real text
    with pytest.raises(HiercompError, match="0 or more"):
        tune(cm.model, teacher, CALIB, TuneConfig(steps=2, generated=-1), progress=False)
    with pytest.raises(HiercompError, match="encoder: drop --tune-generated"):
        tune(cm.model, teacher, CALIB, TuneConfig(steps=2, generated=4), encoder=True, progress=False)
    with pytest.raises(HiercompError, match="at least 2 tokens"):
        sampled_windows(teacher, CALIB[:, :1], 4, seed=0)


def test_a_bad_tuning_config_fails_before_any_quantizing(monkeypatch):
    import hiercomp.api

    def quantize(*args, **kwargs):
        pytest.fail("quantized before checking the tuning config")

    monkeypatch.setattr(hiercomp.api, "compress_model", quantize)
    for config, match in ((TuneConfig(steps=0), "at least 1 step"), (TuneConfig(lr=0.0), "must be positive"),
                          (TuneConfig(generated=-1), "0 or more")):
        with pytest.raises(HiercompError, match=match):
            hiercomp.compress(tiny_llama(), Recipe.single("rtn", bits=4), CALIB, progress=False, recovery=config)
    with pytest.raises(HiercompError, match="pass --calib"):
        hiercomp.compress(tiny_llama(), Recipe.single("rtn", bits=4), None, progress=False,
                          recovery=TuneConfig(steps=2))
    torch.manual_seed(0)
    encoder = LoadedModel(BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=4, vocab_size=128)), None, True, "bert")
    with pytest.raises(HiercompError, match="encoder: drop --tune-generated"):
        hiercomp.compress(encoder, Recipe.single("rtn", bits=4), CALIB, progress=False,
                          recovery=TuneConfig(steps=2, generated=4))


def assert_same_tuned_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The tensors tuning trains (every layer's scales, the final norm) are bit-equal in ``a`` and ``b``."""
    for name, layer in compressed_layers(a).items():
        assert torch.equal(layer.scales, compressed_layers(b)[name].scales)
    assert torch.equal(a.model.norm.weight, b.model.norm.weight)


@needs_shared
def test_tuning_keeps_the_best_held_out_state_and_never_ends_worse_than_untuned(stories_calibration):
    calib = stories_calibration[:16, :128]  # 16 windows: the last 2 are held out
    plain = hiercomp.compress(str(STORIES), Recipe.single("gptq", bits=2, group_size=32), calib, progress=False)
    good = hiercomp.compress(str(STORIES), Recipe.single("gptq", bits=2, group_size=32), calib, progress=False,
                             recovery=TuneConfig(steps=24, lr=1e-2, batch_size=2))
    facts = good.extra["tuning"]
    assert facts["held_out"] == 2 and facts["schedule"] == "cosine"
    # measured: held-out KL 2.86 -> 1.91 nats/token, best at the last check (24)
    assert facts["best_step"] > 0 and facts["held_out_after"] < 0.7 * facts["held_out_before"]
    # A step size that wrecks the scales: every check after the first is worse, so the untuned state is kept,
    # bit for bit.
    wild = hiercomp.compress(str(STORIES), Recipe.single("gptq", bits=2, group_size=32), calib, progress=False,
                             recovery=TuneConfig(steps=6, lr=30.0, schedule="constant", check_every=2))
    facts = wild.extra["tuning"]
    assert facts["best_step"] == 0 and facts["held_out_after"] == facts["held_out_before"]
    assert not facts["loss_last"] < facts["loss_first"]  # training diverged (to NaN: it stopped there)
    assert_same_tuned_state(wild.model, plain.model)
    # Without keep_best there is no state to go back to: a diverged run is an error, and the model is left as it was.
    teacher = LlamaForCausalLM.from_pretrained(str(STORIES)).eval()
    with pytest.raises(HiercompError, match="diverged .* lower its learning rate"):
        tune(plain.model, teacher, calib, TuneConfig(steps=6, lr=30.0, schedule="constant", keep_best=False),
             progress=False)
    assert_same_tuned_state(wild.model, plain.model)  # plain was left as it was
    raw = hiercomp.compress(str(STORIES), Recipe.single("gptq", bits=2, group_size=32), calib, progress=False,
                            recovery=TuneConfig(steps=3, lr=1e-2, keep_best=False))
    assert raw.extra["tuning"]["held_out"] == 0 and raw.extra["tuning"]["best_step"] is None
    with pytest.raises(HiercompError, match="unknown tuning schedule"):
        hiercomp.compress(tiny_llama(), Recipe.single("rtn", bits=4), CALIB, progress=False,
                          recovery=TuneConfig(steps=2, schedule="linear"))


def test_tuning_e8_stage_scales_and_errors():
    cm = hiercomp.compress(tiny_llama(), Recipe.single("quip", bits=2.0), CALIB, progress=False,
                           recovery=TuneConfig(steps=5, lr=1e-2, norms=False))
    assert cm.extra["tuning"]["tensors"] == 14  # one scales tensor per layer; norms left alone
    with pytest.raises(HiercompError, match="at least 1 step"):
        hiercomp.compress(tiny_llama(), Recipe.single("rtn", bits=4), CALIB, progress=False,
                          recovery=TuneConfig(steps=0))
    with pytest.raises(HiercompError, match="pass --calib"):
        hiercomp.compress(tiny_llama(), Recipe.single("rtn", bits=4), None, progress=False,
                          recovery=TuneConfig(steps=2))
    with pytest.raises(HiercompError, match="at most one"):
        split_recovery([TuneConfig(), TuneConfig()])


@needs_shared
def test_cli_rotate_and_tune_on_stories260k(tmp_path, capsys):
    out = tmp_path / "m"
    code = main(["compress", str(STORIES), "--method", "gptq", "--bits", "3", "--group-size", "32", "--rotate",
                 "--calib", str(TINYSTORIES), "--calib-n", "8", "--calib-len", "64", "--tune-steps", "6",
                 "--tune-lr", "0.005", "--tune-codes", "2", "--tune-uncompressed", "--tune-generated", "4",
                 "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "hiercomp.json").read_text())
    assert meta["tuning"]["steps"] == 6 and meta["tuning"]["lr"] == 0.005 and meta["tuning"]["code_every"] == 2
    assert meta["tuning"]["uncompressed"] and meta["tuning"]["generated"] == 4
    assert meta["tuning"]["loss_last"] < meta["tuning"]["loss_first"]
    assert {r["method"] for r in meta["recipe"]["rules"]} == {"rot_gptq"}
    layers = compressed_layers(hiercomp.load(out, runtime="reference").model)
    assert layers and all(isinstance(m, RotatedLinear) for m in layers.values())
    assert main(["compress", str(STORIES), "--method", "wanda", "--rotate", "--out", str(tmp_path / "w")]) == 2
    assert "rotate applies to the quantizers" in capsys.readouterr().err
    assert main(["compress", str(STORIES), "--method", "rtn", "--tune-steps", "2", "--out", str(tmp_path / "t")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["compress", str(STORIES), "--method", "rtn", "--tune-codes", "2", "--out", str(tmp_path / "c")]) == 2
    assert "add --tune-steps" in capsys.readouterr().err
    for flag in (["--tune-uncompressed"], ["--tune-generated", "8"]):
        assert main(["compress", str(STORIES), "--method", "rtn", *flag, "--out", str(tmp_path / "u")]) == 2
        assert "add --tune-steps" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("w", "t", "c", "u"))
