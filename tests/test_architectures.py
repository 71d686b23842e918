"""The engine on every supported family, with tiny models built here: compress, save, reload, export."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hiercomp
from hiercomp.hierarchy import walk
from hiercomp.io.hf import LoadedModel
from hiercomp.recipe import Recipe

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
             max_position_embeddings=64)


def build(family: str) -> tuple[torch.nn.Module, bool]:
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **SMALL)), False
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **SMALL)), False
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=2, **SMALL)), False
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)), False
    return BertModel(BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=128, max_position_embeddings=64)), True


def output(model: torch.nn.Module, ids: torch.Tensor, encoder: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.last_hidden_state if encoder else out.logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
@pytest.mark.parametrize("method,params", [("rtn", {"bits": 4, "group_size": 32}),
                                           ("gptq", {"bits": 4, "group_size": 32}),
                                           ("sparsegpt", {"pattern": "2:4"})])
def test_compress_save_load_export_round_trip(tmp_path, family, method, params):
    model, encoder = build(family)
    reference = output(model, torch.arange(16).view(1, 16), encoder)
    hierarchy = walk(model)
    n_linears = sum(len(b.linears) for b in hierarchy.blocks)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    cm = hiercomp.compress(LoadedModel(model, None, encoder, family), Recipe.single(method, **params), calib,
                           progress=False)
    assert len(cm.report.layers) == n_linears  # every block linear, nothing outside the blocks
    assert all(r.rel_output_error is not None and r.rel_output_error < 0.5 for r in cm.report.layers)
    ids = torch.arange(16).view(1, 16)
    compressed_out = output(cm.model, ids, encoder)
    rel = float((compressed_out - reference).norm() / reference.norm())
    assert 0 < rel < 0.5

    cm.save(tmp_path / "c")
    again = hiercomp.load(tmp_path / "c", runtime="reference")
    assert torch.equal(output(again.model, ids, encoder), compressed_out)  # bit-exact

    hiercomp.export_dense(tmp_path / "c", tmp_path / "dense")
    auto = AutoModel if encoder else AutoModelForCausalLM
    dense = auto.from_pretrained(str(tmp_path / "dense"))
    assert torch.allclose(output(dense, ids, encoder), compressed_out, atol=1e-5, rtol=1e-4)


def test_recipe_targets_and_ignore_reach_the_named_layers(tmp_path):
    model, _ = build("llama")
    recipe = Recipe.from_dict({"rules": [
        {"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*"], "ignore": ["*.down_proj"]},
        {"method": "rtn", "bits": 8, "targets": ["re:.*layers\\.1\\.self_attn\\.[qk]_proj"]},
    ]})
    plan = recipe.resolve(walk(model)).layers
    assert "lm_head" not in plan  # kept by default
    assert not any(name.endswith("down_proj") for name in plan)
    assert dict(plan["model.layers.1.self_attn.q_proj"].params)["bits"] == 8
    assert dict(plan["model.layers.0.self_attn.q_proj"].params)["bits"] == 4
    assert len(plan) == 2 * 6


def test_lm_head_can_be_opted_in_with_a_calibration_free_method():
    model, _ = build("llama")
    recipe = Recipe.from_dict({"ignore": [], "rules": [{"method": "rtn", "bits": 8, "targets": ["lm_head"]}]})
    cm = hiercomp.compress(LoadedModel(model, None, False, "x"), recipe, None, progress=False)
    assert [r.name for r in cm.report.layers] == ["lm_head"]
