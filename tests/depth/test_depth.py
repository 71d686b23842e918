"""Depth pruning: removing sub-blocks / blocks exactly, choosing them, saving them, recovering from them."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hiercomp
from hiercomp.cli import main
from hiercomp.depth import (
    RecoveryConfig,
    RemovalScore,
    SubBlock,
    choose_removals,
    list_subblocks,
    recover,
    remove_subblocks,
    removed_subblocks,
    score_removals,
)
from hiercomp.depth.scoring import model_outputs, output_damage
from hiercomp.errors import HiercompError
from hiercomp.recipe import Recipe
from tests.conftest import STORIES, needs_shared

VOCAB = 96


def tiny_llama(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config).eval()


def tokens(n: int = 8, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_list_names_kinds_and_freed_parameters(build) -> None:
    model = build()
    units = list_subblocks(model)
    assert [u.kind for u in units] == ["attn", "mlp", "block"] * 3
    blocks = {u.block_index: u for u in units if u.kind == "block"}
    for b, unit in blocks.items():
        block = model.get_submodule(unit.name)
        assert unit.param_count == sum(p.numel() for p in block.parameters())  # a whole block frees everything
        parts = [u for u in units if u.block_index == b and u.kind != "block"]
        assert set(unit.linear_names) == {n for u in parts for n in u.linear_names}
    total = sum(p.numel() for p in model.parameters())
    remove_subblocks(model, [units[0].name, units[4].name, units[8].name])
    freed = units[0].param_count + units[4].param_count + units[8].param_count
    assert sum(p.numel() for p in model.parameters()) == total - freed  # the accounting is what is really gone
    assert removed_subblocks(model) == [units[0].name, units[4].name, units[8].name]
    assert [u.name for u in list_subblocks(model)] == [units[1].name, units[2].name, units[3].name, units[5].name]


def test_llama_without_attention_is_residual_plus_mlp() -> None:
    model = tiny_llama()
    ids = tokens(2)
    remove_subblocks(model, [u.name for u in list_subblocks(model) if u.kind == "attn"])
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        expected = model.lm_head(model.model.norm(h))
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_gpt2_without_blocks_is_embeddings_and_head() -> None:
    model = tiny_gpt2()
    ids = tokens(2)
    remove_subblocks(model, [u.name for u in list_subblocks(model) if u.kind == "block"])
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        t = model.transformer
        expected = model.lm_head(t.ln_f(t.wte(ids) + t.wpe(positions)))
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


def test_bert_attention_removal_keeps_the_post_norm_and_block_removal_is_identity() -> None:
    model = tiny_bert()
    ids = tokens(2)
    kept = [(layer.attention.output.LayerNorm, layer.intermediate, layer.output) for layer in model.encoder.layer]
    remove_subblocks(model, [u.name for u in list_subblocks(model) if u.kind == "attn"])
    with torch.no_grad():
        h = model.embeddings(input_ids=ids)
        for norm, intermediate, output in kept:
            a = norm(h)  # LayerNorm(h + 0): a zero attention contribution, then the stream's own norm
            h = output(intermediate(a), a)
        assert torch.allclose(model(input_ids=ids).last_hidden_state, h, atol=1e-5, rtol=0)
        remove_subblocks(model, [u.name for u in list_subblocks(model) if u.kind == "block"])
        assert torch.equal(model(input_ids=ids).last_hidden_state, model.embeddings(input_ids=ids))


def test_unknown_name_is_a_one_line_error() -> None:
    with pytest.raises(HiercompError, match="not a removable sub-block"):
        remove_subblocks(tiny_llama(), ["model.layers.9.mlp"])


def test_generation_with_cache_after_removing_the_first_block() -> None:
    model = tiny_llama(layers=4)
    # block 0 gone: the cache length is read from layer 0, which must still grow (see depth.standins)
    remove_subblocks(model, ["model.layers.0", "model.layers.2.self_attn"])
    prompt = tokens(2, 5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 11)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("build, remove", [
    (tiny_llama, ["model.layers.1", "model.layers.2.mlp"]),
    (tiny_bert, ["encoder.layer.0.attention", "encoder.layer.2"]),
])
def test_save_load_bit_exact_with_removals(tmp_path, build, remove) -> None:
    model = build()
    calibration = tokens(8, 16)
    recipe = Recipe.from_dict({"rules": [{"method": "rtn", "bits": 4, "group_size": 16}], "remove": remove})
    cm = hiercomp.compress(model, recipe, calibration, progress=False)
    assert [r["name"] for r in cm.extra["removed"]] == remove
    removed_linears = {n for r in cm.extra["removed"] for n in r["linear_names"]}
    assert removed_linears and not removed_linears & {r.name for r in cm.report.layers}  # not compressed
    cm.save(tmp_path / "m")
    back = hiercomp.load(tmp_path / "m", runtime="reference")
    assert removed_subblocks(back.model) == remove
    assert back.plan.removed == remove
    with torch.no_grad():
        ids = tokens(2, 16, seed=5)
        a, b = cm.model(input_ids=ids), back.model(input_ids=ids)
    key = "last_hidden_state" if cm.is_encoder else "logits"
    assert torch.equal(a[key], b[key])
    from hiercomp.api import saved_size_bytes

    sizes = saved_size_bytes(tmp_path / "m")
    assert cm.accounted_bytes() == sizes["size_bytes"] - sizes["header_bytes"]


def test_removed_by_hand_is_recorded_on_save(tmp_path) -> None:
    model = tiny_llama()
    remove_subblocks(model, ["model.layers.0.mlp"])
    cm = hiercomp.compress(model, Recipe.single("rtn", bits=8), progress=False)
    cm.save(tmp_path / "m")
    back = hiercomp.load(tmp_path / "m", runtime="reference")
    assert removed_subblocks(back.model) == ["model.layers.0.mlp"]
    ids = tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(cm.model(input_ids=ids).logits, back.model(input_ids=ids).logits)


def _unit(block: int, kind: str) -> SubBlock:
    name = f"model.layers.{block}" + {"block": "", "attn": ".self_attn", "mlp": ".mlp"}[kind]
    return SubBlock(name, block, kind, (), 100)


def test_choose_removals_rules_on_constructed_scores() -> None:
    damage = {0: 0.10, 1: 0.30, 2: 0.31, 3: 0.50, 4: 0.60, 5: 0.45}  # 6 blocks
    scores = [RemovalScore(_unit(b, "block"), d) for b, d in damage.items()]
    assert choose_removals(scores, 2, "score") == ["model.layers.0", "model.layers.1"]
    # position: block 0 protected (first 20%); damage / exp((i-6)/6): 1 -> .69, 2 -> .60, 3 -> .82, 4 -> .84,
    # 5 -> .53, so the late block 5 goes first although blocks 1 and 2 do less damage alone
    assert choose_removals(scores, 3, "position") == ["model.layers.5", "model.layers.2", "model.layers.1"]
    assert choose_removals(scores, 1, "position", protect_first=0) == ["model.layers.0"]
    # at equal damage the later block wins
    tie = [RemovalScore(_unit(b, "block"), 0.2) for b in range(1, 5)]
    assert choose_removals(tie, 1, "score") == ["model.layers.4"]
    assert choose_removals(tie, 1, "position") == ["model.layers.4"]
    draws = {tuple(choose_removals(scores, 2, "random", seed=s)) for s in range(20)}
    assert choose_removals(scores, 2, "random", seed=3) == choose_removals(scores, 2, "random", seed=3)
    assert len(draws) > 3
    # overlapping units are skipped: a block and its own sub-block are never both chosen
    mixed = [RemovalScore(_unit(2, "attn"), 0.01), RemovalScore(_unit(2, "block"), 0.02),
             RemovalScore(_unit(3, "mlp"), 0.5)]
    assert choose_removals(mixed, 2, "score") == ["model.layers.2.self_attn", "model.layers.3.mlp"]
    with pytest.raises(HiercompError, match="only 2 distinct"):
        choose_removals(mixed, 3, "score")


def test_scores_find_a_block_that_does_nothing() -> None:
    model = tiny_llama(layers=4)
    with torch.no_grad():  # block 2 writes nothing to the residual stream: removing it costs exactly 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = score_removals(model, tokens(4, 16), progress=False)
    by_name = {s.unit.name: s.damage for s in scores}
    assert by_name["model.layers.2"] == pytest.approx(0.0, abs=1e-9)
    assert min(v for k, v in by_name.items() if not k.startswith("model.layers.2")) > 1e-4
    assert choose_removals(scores, 1, "score") in (["model.layers.2"], ["model.layers.2.self_attn"],
                                                   ["model.layers.2.mlp"])


def test_recovery_reduces_kl_and_freezes_the_prefix() -> None:
    teacher = tiny_llama(layers=4)
    student = tiny_llama(layers=4)
    remove_subblocks(student, ["model.layers.2"])
    calibration, held_out = tokens(16, 24, seed=2), tokens(8, 24, seed=3)

    def kl() -> float:
        with torch.no_grad():
            ref = model_outputs(teacher, held_out, False)
            return float(output_damage(ref, model_outputs(student, held_out, False), False).mean())

    before = kl()
    frozen = {k: v.clone() for k, v in student.state_dict().items()
              if k.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1."))}
    final_norm = student.model.norm.weight.detach().clone()
    config = RecoveryConfig(steps=10, lr=1e-2, seed=0)
    report = recover(student, teacher, calibration, config, progress=False)
    after = kl()
    assert report.first_trained_block == 2 and report.loss_last < report.loss_first
    assert after < 0.85 * before, (before, after)  # measured 0.32 -> 0.25 nats on held-out windows
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in frozen.items())  # the prefix is untouched
    assert not torch.equal(final_norm, student.model.norm.weight)  # what runs after the blocks is trained
    again = tiny_llama(layers=4)
    remove_subblocks(again, ["model.layers.2"])
    recover(again, teacher, calibration, config, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in student.state_dict().items())  # deterministic


def test_recipe_remove_round_trips_and_may_stand_alone() -> None:
    recipe = Recipe.from_dict({"remove": ["model.layers.3.mlp"]})
    assert recipe.rules == () and Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(HiercompError, match="non-empty 'rules:'"):
        Recipe.from_dict({"ignore": ["lm_head"]})


@needs_shared
def test_cli_drop_alone_and_bad_combination(tmp_path, capsys) -> None:
    out = tmp_path / "d"
    assert main(["compress", str(STORIES), "--drop", "1", "--drop-rule", "random", "--out", str(out), "--quiet"]) == 0
    assert main(["info", str(out)]) == 0
    assert "removed by depth pruning (1" in capsys.readouterr().out
    assert len(removed_subblocks(hiercomp.load(out).model)) == 1
    assert main(["compress", str(STORIES), "--method", "rtn", "--recover-steps", "3", "--out",
                 str(tmp_path / "e"), "--quiet"]) == 2
    assert "--recover-steps" in capsys.readouterr().err
