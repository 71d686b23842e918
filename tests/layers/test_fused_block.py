"""The fast runtime's lean Llama-family block (hiercomp.layers.fused_block): q/k/v and gate/up as one native call.

Asserted: a fused product is bit-identical to the member layers' own products; whole-model logits equal the unfused
blocks' bit for bit and match the reference runtime within the fast-path contract; greedy text is the same; the
memory is held once; hooks, a mixed plan and the reference runtime fall back to transformers' forward; saving is
unchanged.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hiercomp
from hiercomp.io.hf import LoadedModel
from hiercomp.layers import fused_block, gemv
from hiercomp.layers.kernels import set_runtime
from hiercomp.recipe import Recipe

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not gemv.available(), reason=f"native kernel unavailable: {gemv.reason()}")]

IDS = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v carry biases
        config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return Qwen2ForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def compressed(kind: str, recipe: dict | None = None) -> torch.nn.Module:
    recipe = recipe or {"rules": [{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*self_attn*"]},
                                  {"method": "rtn", "bits": 3, "group_size": 32, "targets": ["*mlp*"]}]}
    cm = hiercomp.compress(LoadedModel(tiny(kind), None, False, "llama-linear"), Recipe.from_dict(recipe),
                           CALIBRATION, progress=False)
    return cm.model


def logits(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_blocks_match_the_unfused_ones_and_the_reference(kind: str) -> None:
    model = compressed(kind)
    set_runtime(model, "fast")
    blocks = fused_block.decoder_blocks(model)
    assert len(blocks) == 2 and all("forward" in vars(b) for b in blocks)
    plan = blocks[0]._hiercomp_plan
    assert plan.qkv.fused is not None and plan.gate_up.fused is not None
    assert (plan.qkv.fused.bias is not None) == (kind == "qwen2")
    fused = logits(model)
    fused_block.unfuse(model)
    unfused = logits(model)
    set_runtime(model, "reference")
    reference = logits(model)
    # Rows are computed exactly as alone and the norms and rotary are transformers' arithmetic: bit for bit.
    assert torch.equal(fused, unfused)
    assert rel(fused, reference) < 1e-2 and rel(unfused, reference) < 1e-2


def test_a_fused_product_is_bit_identical_to_the_member_layers() -> None:
    model = compressed("llama")
    set_runtime(model, "fast")
    attn = model.model.layers[0].self_attn
    plan = model.model.layers[0]._hiercomp_plan
    x = torch.randn(3, 64)
    together = plan.qkv.fused(x)
    alone = torch.cat([layer.kernel(x) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
    assert torch.equal(together, alone)
    # Each layer's kernel holds a view of its rows of the stacked codes: the memory is held once.
    stacked = plan.qkv.fused.grid.packed
    base = stacked.untyped_storage().data_ptr()
    assert all(layer.kernel.grid.packed.untyped_storage().data_ptr() == base
               for layer in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_greedy_text_and_padded_batches_are_the_same() -> None:
    model = compressed("llama")
    set_runtime(model, "fast")
    mask = torch.ones_like(IDS)
    mask[1, :5] = 0
    with torch.no_grad():
        fused_tokens = model.generate(IDS[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
        fused_masked = model(IDS, attention_mask=mask).logits
        fused_block.unfuse(model)
        tokens = model.generate(IDS[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
        masked = model(IDS, attention_mask=mask).logits
    assert torch.equal(fused_tokens, tokens)
    assert torch.equal(fused_masked, masked)


def test_hooks_fall_back_to_transformers_forward() -> None:
    model = compressed("llama")
    set_runtime(model, "fast")
    seen = []
    handle = model.model.layers[1].self_attn.k_proj.register_forward_pre_hook(lambda m, args: seen.append(1))
    logits(model)
    assert seen == [1]  # the block ran transformers' forward, so the hook saw its input
    handle.remove()
    logits(model)
    assert seen == [1]


def test_layers_of_different_grids_run_one_by_one() -> None:
    recipe = {"rules": [{"method": "rtn", "bits": 8, "group_size": 32, "targets": ["*q_proj"]},
                        {"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*k_proj", "*v_proj", "*mlp*"]}]}
    model = compressed("llama", recipe)
    set_runtime(model, "fast")
    plan = model.model.layers[0]._hiercomp_plan
    assert plan.qkv.fused is None and plan.gate_up.fused is not None
    fused = logits(model)
    set_runtime(model, "reference")
    assert rel(fused, logits(model)) < 1e-2


def test_state_dict_is_unchanged_and_the_reference_runtime_restores_the_forward() -> None:
    model = compressed("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_runtime(model, "fast")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    set_runtime(model, "reference")
    assert not any("forward" in vars(b) or hasattr(b, "_hiercomp_plan") for b in model.model.layers)


def test_an_original_model_keeps_transformers_forward() -> None:
    model = tiny("llama")
    set_runtime(model, "fast")  # no compressed layer: the baseline stays transformers' own
    assert not any("forward" in vars(b) for b in model.model.layers)
