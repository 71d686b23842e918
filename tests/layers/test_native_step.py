"""The native decode step (hiercomp.layers.native_step, decode.cpp): every decoder block of a batch-1 decode step
in one native call.

Asserted: its logits and the keys and values it writes equal the torch blocks' within float rounding, through a
cache that must grow (Llama, and Qwen2's q/k/v biases); greedy tokens are the same as the torch path's on the real
stories260K and on tiny models; mixed plans (unfused layers of different grids, layers left dense, another kernel
called back) and heads wider than the hidden state run in it; the AVX2 build agrees; and where it cannot compute
what transformers would (hooks, training, transformers' own cache, no compressed layer, turned off) it is not
taken.
"""

from __future__ import annotations

import pytest
import torch

import hiercomp
from hiercomp.generate import decode_loop
from hiercomp.kv.growing import GrowingCache
from hiercomp.layers import gemv, native_step
from hiercomp.layers.kernels import set_runtime
from tests.conftest import STORIES, needs_shared
from tests.layers.test_fused_block import compressed, tiny

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not gemv.available(), reason=f"native kernel unavailable: {gemv.reason()}")]

PROMPT = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(0))


def prefilled(model: torch.nn.Module) -> tuple[GrowingCache, torch.Tensor]:
    cache = GrowingCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=PROMPT, cache=cache, use_cache=True).logits[:, -1]
    return cache, logits


def compare(model: torch.nn.Module, steps: int, lib=None) -> None:
    """Decode ``steps`` greedy tokens both ways from the same prompt; logits and caches agree at every step."""
    native_cache, logits = prefilled(model)
    torch_cache, _ = prefilled(model)
    step = native_step.build(model, native_cache, lib)
    assert step is not None
    token = logits.argmax(-1)
    worst = 0.0
    with torch.no_grad():
        for _ in range(steps):
            ours = step(token)
            theirs = model(input_ids=token.view(1, 1), cache=torch_cache, use_cache=True).logits[:, -1]
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))
            token = theirs.argmax(-1)
    step.sync()
    assert worst < 1e-4  # the same kernels; attention's sums and exp in another order (measured ≤ 2e-5)
    for ours, theirs in zip(native_cache.layers, torch_cache.layers):
        head_dim = model.model.layers[0].self_attn.head_dim
        assert ours.keys.shape == theirs.keys.shape == (1, 2, PROMPT.shape[1] + steps, head_dim)
        # A rounding difference upstream can flip one int8 activation step in a later block (measured ≤ 2.1e-5).
        assert torch.allclose(ours.keys, theirs.keys, atol=1e-4) and torch.allclose(ours.values, theirs.values,
                                                                                    atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_native_step_matches_the_torch_blocks_through_a_growing_cache(kind: str) -> None:
    model = compressed(kind)
    set_runtime(model, "fast")
    compare(model, 140)  # the prefill's buffers hold 20 + 128 tokens: they grow once


MIXED = {"rules": [{"method": "rtn", "bits": 3, "group_size": 32, "targets": ["*q_proj", "*gate_proj"]},
                   {"method": "rtn", "bits": 4, "group_size": 64, "targets": ["*k_proj", "*v_proj", "*up_proj"]},
                   {"method": "rtn", "bits": 8, "group_size": 32, "targets": ["*o_proj"]}]}


def test_mixed_plans_unfused_grids_dense_layers_and_other_kernels() -> None:
    # q/k/v and gate/up in different layouts (one call each), o_proj 8-bit (torch's int8 kernel, called back),
    # down_proj left dense (the native float32 GEMV).
    model = compressed("llama", MIXED)
    set_runtime(model, "fast")
    block = model.model.layers[0]
    assert block._hiercomp_plan.qkv.fused is None and block._hiercomp_plan.gate_up.fused is None
    assert block.self_attn.o_proj.kernel.name == "int8" and type(block.mlp.down_proj) is torch.nn.Linear
    compare(model, 12)


def test_an_error_in_a_called_back_layer_is_raised() -> None:
    model = compressed("llama", MIXED)
    set_runtime(model, "fast")
    cache, logits = prefilled(model)
    step = native_step.build(model, cache)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("broken layer")

    model.model.layers[1].self_attn.o_proj.forward = broken
    with pytest.raises(ValueError, match="broken layer"):
        step(logits.argmax(-1))


def test_the_avx2_build_agrees() -> None:
    model = compressed("llama")
    set_runtime(model, "fast")
    compare(model, 12, gemv.build_library(("-mno-avx512f",)))


def test_decode_loop_takes_it_and_writes_the_torch_paths_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    model = compressed("qwen2")
    set_runtime(model, "fast")
    built = []
    original = native_step.build
    monkeypatch.setattr(native_step, "build", lambda *a: built.append(original(*a)) or built[-1])
    with torch.no_grad():
        native, cache = decode_loop(model, PROMPT, 40)
        assert built[-1] is not None
        assert cache.get_seq_length() == PROMPT.shape[1] + 39  # the views cover what the steps wrote
        monkeypatch.setenv("HIERCOMP_NO_NATIVE_STEP", "1")
        plain, _ = decode_loop(model, PROMPT, 40)
        assert built[-1] is None
    assert torch.equal(native, plain)


@needs_shared
def test_greedy_tokens_on_stories260k_are_the_torch_paths(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cm = hiercomp.compress(str(STORIES), {"rules": [{"method": "rtn", "bits": 4, "group_size": 32}]},
                           progress=False)
    cm.save(tmp_path / "q4")
    model = hiercomp.load(tmp_path / "q4").model
    prompt = torch.tensor([[1, 403, 407, 261, 378]])  # BOS + "Once upon a time"
    with torch.no_grad():
        assert native_step.build(model, prefilled_cache(model, prompt)) is not None
        native, _ = decode_loop(model, prompt, 96)
        monkeypatch.setenv("HIERCOMP_NO_NATIVE_STEP", "1")
        plain, _ = decode_loop(model, prompt, 96)
    assert torch.equal(native, plain)


def prefilled_cache(model: torch.nn.Module, prompt: torch.Tensor) -> GrowingCache:
    cache = GrowingCache(config=model.config)
    model(input_ids=prompt, cache=cache, use_cache=True)
    return cache


def test_it_is_not_taken_where_it_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    model = compressed("llama")
    set_runtime(model, "fast")
    cache, _ = prefilled(model)
    assert native_step.build(model, cache) is not None
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    assert native_step.build(model, cache) is None  # a hook must see the layer's call
    handle.remove()
    model.train()
    assert native_step.build(model, cache) is None
    model.eval()
    from transformers import DynamicCache

    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=PROMPT, cache=dynamic, use_cache=True)
    assert native_step.build(model, dynamic) is None  # transformers' own cache: no buffers to write into
    monkeypatch.setenv("HIERCOMP_NO_NATIVE_STEP", "1")
    assert native_step.build(model, cache) is None
    monkeypatch.delenv("HIERCOMP_NO_NATIVE_STEP")
    original = tiny("llama")  # no compressed layer: transformers' blocks are the baseline
    set_runtime(original, "fast")
    assert native_step.build(original, prefilled(original)[0]) is None


def test_heads_wider_than_the_hidden_state() -> None:
    # head_dim x heads = 128 against a hidden state of 64 (as Gemma-style configs do): q, attention and o sized
    # from the heads, not the hidden size.
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiercomp.io.hf import LoadedModel
    from hiercomp.recipe import Recipe
    from tests.layers.test_fused_block import CALIBRATION

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    recipe = Recipe.from_dict({"rules": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    model = hiercomp.compress(LoadedModel(LlamaForCausalLM(config).eval(), None, False, "llama-linear"), recipe,
                              CALIBRATION, progress=False).model
    set_runtime(model, "fast")
    assert model.model.layers[0].self_attn.o_proj.in_features == 128
    compare(model, 8)
