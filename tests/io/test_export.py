"""Exports that other tools load: compressed-tensors (vLLM / transformers) and GGUF (llama.cpp), and GGUF input.

Every claim of exactness is checked by the other side's own reader: transformers' from_pretrained or the
compressed-tensors decompressor for compressed-tensors, gguf.GGUFReader + gguf.quants.dequantize for GGUF.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hiercomp
from hiercomp.errors import HiercompError
from hiercomp.recipe import Recipe
from tests.conftest import STORIES, needs_shared

pytestmark = [needs_shared, pytest.mark.usefixtures("one_thread")]
gguf = pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")

IDS = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
SCHEMES = {  # name -> (method, params); stories260K: hidden 64, MLP width 172 (not a multiple of 32)
    "rtn4_g32_sym": ("rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
    "rtn4_g32_asym": ("rtn", {"bits": 4, "group_size": 32}),
    "gptq4_g32_sym": ("gptq", {"bits": 4, "group_size": 32, "symmetric": True}),
    "gptq8_ch_asym": ("gptq", {"bits": 8, "group_size": None}),
    "rtn8_ch_sym": ("rtn", {"bits": 8, "group_size": None, "symmetric": True}),
    "rtn3_g64_sym": ("rtn", {"bits": 3, "group_size": 64, "symmetric": True}),
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, stories_calibration):
    """Each scheme compressed once per module and saved: name -> folder."""
    root = tmp_path_factory.mktemp("compressed")
    made = {}

    def make(name: str):
        if name not in made:
            method, params = SCHEMES[name]
            calib = stories_calibration[:8, :128] if method == "gptq" else None
            cm = hiercomp.compress(str(STORIES), Recipe.single(method, **params), calib, progress=False)
            made[name] = cm.save(root / name)
        return made[name]

    return make


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def reference(folder) -> torch.nn.Module:
    """hiercomp's model on its reference path: every compressed layer as the dense weight it stores exactly
    (a fast kernel may round activations differently; exports are exact against the stored form)."""
    from hiercomp.hierarchy import compressed_layers, set_module
    from hiercomp.io.export_ct import load_stored

    model = load_stored(folder).model
    for name, layer in compressed_layers(model).items():
        set_module(model, name, layer.to_linear())
    return model


# -- compressed-tensors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rtn4_g32_sym", "gptq4_g32_sym", "rtn8_ch_sym", "rtn4_g32_asym", "gptq8_ch_asym"])
def test_compressed_tensors_logits_equal_ours(compressed, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from hiercomp.io.export_ct import export_compressed_tensors, load_with_library

    folder = compressed(name)
    result = export_compressed_tensors(folder, tmp_path / "ct")
    assert max(result.max_abs_error.values()) == 0.0
    grouped = SCHEMES[name][1]["group_size"] is not None
    # groups of 32 cannot cover the MLP's 172 columns: exactly those 5 layers go dense, and are named
    assert sorted(result.dense) == ([f"model.layers.{i}.mlp.down_proj" for i in range(5)] if grouped else [])
    assert len(result.exact) == 35 - len(result.dense)
    ours = logits(reference(folder))
    if SCHEMES[name][1].get("symmetric"):
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
        assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    else:  # transformers cannot build asymmetric packed zeros on the meta device: the library's reader instead
        theirs = load_with_library(tmp_path / "ct")
    torch.testing.assert_close(logits(theirs), ours, rtol=0, atol=1e-5)


def test_compressed_tensors_config_is_what_vllm_reads(compressed, tmp_path):
    import json

    from hiercomp.io.export_ct import export_compressed_tensors

    export_compressed_tensors(compressed("rtn4_g32_asym"), tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert group["weights"]["symmetric"] is False and group["weights"]["strategy"] == "group"
    assert "model.layers.0.self_attn.q_proj" in group["targets"]
    assert "model.layers.0.mlp.down_proj" not in group["targets"]


def test_compressed_tensors_strict_names_layers_and_writes_nothing(compressed, tmp_path):
    from hiercomp.cli import main
    from hiercomp.io.export_ct import export_compressed_tensors

    with pytest.raises(HiercompError, match=r"model\.layers\.\*\.mlp\.down_proj \(5\).*do not divide") as err:
        export_compressed_tensors(compressed("rtn4_g32_sym"), tmp_path / "ct", strict=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []
    assert main(["export", str(compressed("rtn4_g32_sym")), "--format", "compressed-tensors", "--strict",
                 "--out", str(tmp_path / "ct")]) == 2


def test_non_grid_layers_go_dense_or_are_refused(tmp_path, stories_calibration):
    from hiercomp.io.export_ct import export_compressed_tensors
    from hiercomp.io.gguf_export import export_gguf

    recipe = Recipe.from_dict({"rules": [
        {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "targets": ["*self_attn*"]},
        {"method": "magnitude", "pattern": "2:4", "targets": ["*mlp.gate_proj", "*mlp.up_proj"]}]})
    folder = hiercomp.compress(str(STORIES), recipe, progress=False).save(tmp_path / "mixed")
    ct = export_compressed_tensors(folder, tmp_path / "ct")
    assert len(ct.exact) == 20 and sorted(set(ct.dense.values())) == ["sparse layers are not integer grids"]
    with pytest.raises(HiercompError, match=r"GGUF.*mlp\.gate_proj \(5\).*sparse"):
        export_gguf(folder, tmp_path / "m.gguf", strict=True)
    assert not (tmp_path / "m.gguf").exists()
    result = export_gguf(folder, tmp_path / "m.gguf")
    assert len(result.exact) == 20 and len(result.dense) == 10 and max(result.max_abs_error.values()) == 0.0


# -- GGUF --------------------------------------------------------------------------------------------------------

def gguf_weights(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized by the gguf library, in numpy's (rows, cols) order."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            for t in reader.tensors}, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("name, prefer, types, bound", [
    ("rtn4_g32_sym", "exact", {"Q4_0"}, 0.0),
    ("gptq4_g32_sym", "exact", {"Q4_0"}, 0.0),
    ("rtn3_g64_sym", "exact", {"Q4_0"}, 0.0),  # 3-bit codes fit Q4_0's range, one scale per 32-block
    ("rtn8_ch_sym", "exact", {"Q8_0"}, 0.0),
    ("rtn4_g32_asym", "exact", {"Q5_0"}, 0.0),  # code - zero spans -15..15: Q5_0 holds it exactly
    ("rtn4_g32_asym", "compact", {"Q4_1"}, 2e-3),  # the minimum -s*z rounded to float16: half an ulp of it
    ("gptq8_ch_asym", "exact", {"Q8_0"}, 0.02),  # code - zero beyond int8: requantized, error reported
])
def test_gguf_reader_gets_our_weights_back(compressed, tmp_path, name, prefer, types, bound):
    from hiercomp.hierarchy import compressed_layers
    from hiercomp.io.export_ct import load_stored
    from hiercomp.io.gguf_export import rope_permutation

    folder = compressed(name)
    result = export_gguf_file(folder, tmp_path / "m.gguf", prefer)
    back, kinds = gguf_weights(tmp_path / "m.gguf")
    model = load_stored(folder).model
    for layer_name, layer in compressed_layers(model).items():
        i, short = layer_name.split(".")[2], layer_name.rsplit(".", 1)[1]
        key = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[short]
        weight = layer.dequantize()
        if short in ("q_proj", "k_proj"):
            weight = weight[rope_permutation(weight.shape[0], 8 if short == "q_proj" else 4)]
        got = back[f"blk.{i}.{key}.weight"]
        err = float(np.abs(got - weight.numpy()).max())
        assert err <= bound, (layer_name, err)
        assert err == pytest.approx(result.max_abs_error[layer_name], abs=1e-7)
        if short == "down_proj":  # width 172: no 32-weight blocks fit, stored as float32, exact
            assert kinds[f"blk.{i}.{key}.weight"] == "F32" and err == 0.0
        else:
            assert kinds[f"blk.{i}.{key}.weight"] in types
    embed = model.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(back["token_embd.weight"], embed)


def test_gguf_keeps_a_compressed_head_of_a_tied_model(tmp_path):
    """stories260K ties its output head to the embedding; compressed, the head is written as its own output.weight
    (exactly), and the embedding stays the dense table: dropping the head would make llama.cpp run dense."""
    from hiercomp.hierarchy import compressed_layers
    from hiercomp.io.export_ct import load_stored

    recipe = {"rules": [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}], "ignore": []}
    folder = hiercomp.compress(str(STORIES), recipe, progress=False).save(tmp_path / "head")
    export_gguf_file(folder, tmp_path / "m.gguf")
    back, kinds = gguf_weights(tmp_path / "m.gguf")
    model = load_stored(folder).model
    head = compressed_layers(model)["lm_head"].dequantize().numpy()
    assert kinds["output.weight"] == "Q4_0" and np.array_equal(back["output.weight"], head)
    assert np.array_equal(back["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy())


def export_gguf_file(folder, out, prefer="exact"):
    from hiercomp.io.gguf_export import export_gguf

    return export_gguf(folder, out, prefer=prefer)


def test_gguf_round_trip_as_input(compressed, tmp_path):
    """Export to GGUF, load that GGUF as a model (transformers' GGUF loading), same logits and tokens; then
    compress the GGUF itself."""
    from hiercomp.cli import main
    from hiercomp.io.hf import load_hf_model

    folder = compressed("rtn4_g32_sym")
    out = tmp_path / "stories-q4_0.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 0
    loaded = load_hf_model(out)
    torch.testing.assert_close(logits(loaded.model), logits(reference(folder)), rtol=0, atol=1e-5)
    text = "Once upon a time, there was a little girl named Lily. She was 3 years old!"
    assert loaded.tokenizer(text)["input_ids"] == hiercomp.load(folder).tokenizer(text)["input_ids"]
    # compressing the GGUF gives the same model as compressing the same weights from a plain HF folder
    assert main(["export", str(folder), "--out", str(tmp_path / "dense")]) == 0
    recipe = Recipe.single("rtn", bits=8, group_size=32, symmetric=True)
    from_gguf = hiercomp.compress(str(out), recipe, progress=False)
    from_hf = hiercomp.compress(str(tmp_path / "dense"), recipe, progress=False)
    from_gguf.save(tmp_path / "again")
    from_hf.save(tmp_path / "again_hf")
    torch.testing.assert_close(logits(reference(tmp_path / "again")), logits(reference(tmp_path / "again_hf")),
                               rtol=0, atol=0)


def test_gguf_chat_template_and_special_tokens(tmp_path, compressed):
    folder = compressed("rtn4_g32_sym")
    export_gguf_file(folder, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 512
    assert fields["llama.attention.head_count_kv"].contents() == 4


# -- bad input ---------------------------------------------------------------------------------------------------

def test_gguf_refuses_an_encoder_in_one_line(tmp_path):
    from transformers import BertConfig, BertModel

    from hiercomp.cli import main

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)).eval()
    folder = hiercomp.compress(bert, Recipe.single("rtn", bits=4, group_size=32), progress=False).save(
        tmp_path / "bert")
    out = tmp_path / "bert.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".bert.gguf*"))
    with pytest.raises(HiercompError, match="Llama-family.*'bert'.*--format hf"):
        export_gguf_file(folder, out)


def test_corrupt_gguf_input_is_one_line(tmp_path, compressed):
    from hiercomp.io.hf import load_hf_model

    export_gguf_file(compressed("rtn4_g32_sym"), tmp_path / "good.gguf")
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + data[4:2000])
    for bad, pattern in (("short.gguf", "damaged GGUF"), ("junk.gguf", "not a GGUF file"),
                         ("absent.gguf", "does not exist")):
        with pytest.raises(HiercompError, match=pattern) as err:
            load_hf_model(tmp_path / bad)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, name", [
    ({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, "gpt-2"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                              {"type": "ByteLevel"}]}}, "smollm"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "default"),
])
def test_gguf_pre_tokenizer_names_are_llama_cpps(spec, name):
    """llama.cpp refuses a pre-tokenizer name it does not know ("gpt2" stopped a SmolLM2 export from loading):
    the names written are the ones its vocabulary loader lists."""
    from hiercomp.io.gguf_export import _pre_tokenizer_name

    assert _pre_tokenizer_name(spec) == name
