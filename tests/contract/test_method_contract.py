"""The contract every registered method passes by being registered (kvpress's default_presses idea).

For each method in ``hiercomp.methods.METHODS`` and each layer kind (Llama's bias-free nn.Linear, GPT-2's
transposed Conv1D with bias): compress a tiny model, then
- save -> load is bit-exact (logits identical) and loads from the folder alone, with the method unregistered;
- the bytes on disk are the bytes accounted: the weights file's tensor data minus the accounted bytes is only the
  whole-byte rounding of each packed tensor;
- the same call twice writes byte-identical files (same seed, same bytes);
- every fast compute path a layer offers equals its dequantize-then-matmul reference;
- an unknown or out-of-range parameter is a one-line HiercompError.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hiercomp
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers
from hiercomp.io.hf import LoadedModel
from hiercomp.io.saved import WEIGHTS_FILE, safetensors_header_bytes
from hiercomp.methods import METHODS, make_method
from hiercomp.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

# Parameters that make a method cheap on a 64-wide model; everything else stays at the method's defaults.
SMALL = {"bitstack": {"n_blocks": 3}, "awq": {"n_grid": 4}, "hqq": {"iters": 5}, "hlq": {"iters": 2},
         "hlq_gptq": {"iters": 2}}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama-linear": tiny_llama, "gpt2-conv1d": tiny_gpt2}
CALIBRATION = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))


def compress(name: str, kind: str) -> hiercomp.CompressedModel:
    params = SMALL.get(name, {})
    recipe = Recipe.single(name, **params)
    return hiercomp.compress(LoadedModel(BUILDERS[kind](), None, False, kind), recipe, CALIBRATION, progress=False)


def without_times(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "gpt2-conv1d" and METHODS[name].transforms_groups:
        pytest.skip(f"{name} folds scales into the operation before a group, which GPT-2's fused c_attn lacks")
    cm = compress(name, kind)
    assert cm.report.layers, f"{name} compressed nothing"
    before = logits(cm.model)
    cm.save(tmp_path / "a")

    # Same call, same seed: the same bytes, not only the same tensors (hiercomp.json also records wall times).
    compress(name, kind).save(tmp_path / "b")
    for f in sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file()):
        if f == "hiercomp.json":
            a, b = (without_times(json.loads((tmp_path / d / f).read_text())) for d in "ab")
            assert a == b, f"{name}: hiercomp.json differs beyond wall times"
        else:
            assert sha(tmp_path / "a" / f) == sha(tmp_path / "b" / f), f"{name}: {f} differs between identical runs"

    # The bytes on disk are the bytes accounted (each packed tensor rounds its bits up to whole bytes).
    weights = tmp_path / "a" / WEIGHTS_FILE
    data_bytes = weights.stat().st_size - safetensors_header_bytes(weights)
    n_tensors = sum(len(layer.state_dict()) for layer in compressed_layers(cm.model).values())
    assert 0 <= data_bytes - cm.accounted_bytes() < n_tensors, name

    # The folder loads from its own files alone: unregistering the method must not matter.
    monkeypatch.delitem(METHODS, name)
    back = hiercomp.load(tmp_path / "a", runtime="reference")
    assert torch.equal(logits(back.model), before), f"{name}: reload is not bit-exact"

    # Every fast path a layer offers is checked against its reference (dequantize, then matmul): per layer, and
    # on the whole model's logits. The fast integer kernels compute in bfloat16 (see hiercomp.layers.kernels).
    fast = hiercomp.load(tmp_path / "a", runtime="fast")
    generator = torch.Generator().manual_seed(3)
    reference_layers = compressed_layers(back.model)
    for layer_name, layer in compressed_layers(fast.model).items():
        x = torch.randn(3, 5, layer.in_features, generator=generator)
        reference = reference_layers[layer_name](x).float()
        scale = reference.abs().max().clamp_min(1e-6)
        assert (layer(x).float() - reference).abs().max() / scale < 1e-2, f"{name}: {layer_name} fast path"
    fast_logits = logits(fast.model)
    assert (fast_logits - before).abs().max() / before.abs().max() < 3e-2, f"{name}: fast logits"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_parameters_are_one_line_errors(name: str) -> None:
    with pytest.raises(HiercompError) as err:
        make_method(name, no_such_parameter=1)
    assert "\n" not in str(err.value) and "no_such_parameter" in str(err.value)
    numeric = [f for f in ("bits", "sparsity", "rank", "n_blocks") if f in METHODS[name].__dataclass_fields__]
    for field_name in numeric:
        with pytest.raises(HiercompError) as err:
            make_method(name, **{field_name: -3})
        assert "\n" not in str(err.value), f"{name}.{field_name}=-3: {err.value}"
