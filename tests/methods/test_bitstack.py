"""BitStack: exact block accounting, the decomposition's error ladder, and any-size loading of one saved model.

The stories260K numbers quoted in comments were measured with these fixtures (6 blocks, rank 1, 8
calibration windows of 256 tokens; KL on 6 held-out windows from the first half of the sample).
"""

from __future__ import annotations

import json

import pytest
import torch

import hiercomp
from hiercomp.anysize import choose_prefix, global_order, parse_budget, prefix_sizes
from hiercomp.api import load_any, saved_size_bytes
from hiercomp.cli import main
from hiercomp.errors import HiercompError
from hiercomp.layers import BitStackLinear, build_layer
from hiercomp.layers.packing import packed_nbytes
from hiercomp.methods import LayerStats, make_method
from hiercomp.recipe import Recipe
from tests.conftest import STORIES, TINYSTORIES, needs_shared


def random_layer(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    sq = torch.rand(in_features, generator=gen) * 4 + 0.05
    return weight, LayerStats(channel_sq_mean=sq, n_tokens=1000)


@pytest.mark.parametrize("shape", [(48, 40), (7, 9)])  # 7x9 = 63 sign bits: each block padded to 8 bytes
def test_storage_bits_match_packed_tensors(shape: tuple[int, int]) -> None:
    weight, stats = random_layer(*shape)
    layer = make_method("bitstack", n_blocks=4, rank=2).compress(weight, None, stats, "t", "linear")
    assert isinstance(layer, BitStackLinear)
    m, n = shape
    bits = layer.storage_bits()
    buffer_bits = {name: buf.numel() * buf.element_size() * 8 for name, buf in layer.named_buffers()}
    assert bits == buffer_bits
    assert bits["signs"] == 4 * 8 * packed_nbytes(m * n, 1)
    assert layer.block_bits() == 8 * packed_nbytes(m * n, 1) + 16 * 2 * (m + n)
    layer.set_active(2)
    assert layer.total_bits() == 2 * layer.block_bits() + 16 * n
    assert sum(layer.stack_storage_bits().values()) == 4 * layer.block_bits() + 16 * n


def test_each_block_lowers_the_activation_weighted_error() -> None:
    weight, stats = random_layer(64, 96, seed=1)
    layer = make_method("bitstack", n_blocks=6, rank=4).compress(weight, None, stats, "t", "linear")
    errors = layer.block_errors
    assert errors[0] == 1.0 and len(errors) == 7
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.05  # measured 0.018: six ~1.9-bit blocks of a Gaussian matrix
    # The recorded errors are those of the stored (float16) form, at every prefix.
    sq = stats.channel_sq_mean
    for blocks in (1, 3, 6):
        layer.set_active(blocks)
        delta = weight - layer.dequantize()
        measured = float((delta.pow(2) * sq).sum() / (weight.pow(2) * sq).sum())
        assert measured == pytest.approx(errors[blocks], rel=1e-4)


def test_rebuilt_layer_is_bit_exact() -> None:
    weight, stats = random_layer(24, 32, seed=2)
    layer = make_method("bitstack", n_blocks=3, rank=1).compress(weight, torch.randn(24), stats, "t", "linear")
    clone = build_layer(layer.full_config())
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(5, 32)
    assert torch.equal(clone(x), layer(x))


def test_bad_shapes_and_parameters_are_one_line_errors() -> None:
    weight, stats = random_layer(16, 12)
    with pytest.raises(HiercompError, match=r"rank 13 for layer blk\.q is above min\(out, in\) = 12"):
        make_method("bitstack", rank=13).compress(weight, None, stats, "blk.q", "linear")
    with pytest.raises(HiercompError, match="n_blocks must be >= 1"):
        make_method("bitstack", n_blocks=0)
    with pytest.raises(HiercompError, match="needs calibration data for layer blk.q"):
        make_method("bitstack").compress(weight, None, None, "blk.q", "linear")
    bad_stats = LayerStats(channel_sq_mean=torch.ones(11), n_tokens=10)
    with pytest.raises(HiercompError, match="do not fit its 12 input columns"):
        make_method("bitstack").compress(weight, None, bad_stats, "blk.q", "linear")


def test_budget_parsing() -> None:
    assert parse_budget("120KB") == ("bytes", 120_000)
    assert parse_budget("120 KiB") == ("bytes", 120 * 1024)
    assert parse_budget("1.5MB") == ("bytes", 1_500_000)
    assert parse_budget(250000) == ("bytes", 250000)
    assert parse_budget("3.0bpw") == ("bpw", 3.0)
    for bad in ("lots", "12XB", "-3KB", "0"):
        with pytest.raises(HiercompError, match="budget"):
            parse_budget(bad)


# -- stories260K: one saved stack, many sizes -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_model(stories_calibration, tmp_path_factory):
    cm = hiercomp.compress(str(STORIES), Recipe.single("bitstack", n_blocks=6, rank=1),
                           stories_calibration[:8], progress=False)
    out = tmp_path_factory.mktemp("bitstack") / "s"
    cm.save(out)
    return cm, out


@pytest.fixture(scope="module")
def held_out_windows(stories_tokens) -> torch.Tensor:
    first = stories_tokens[: stories_tokens.numel() // 2]
    return torch.stack([torch.cat([torch.tensor([1]), first[i * 255:(i + 1) * 255]]) for i in range(6)])


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@needs_shared
def test_global_stack_is_saved_and_ordered(stack_model) -> None:
    cm, out = stack_model
    stack = json.loads((out / "hiercomp.json").read_text())["bitstack"]
    n_layers = len(stack["block_bits"])
    assert n_layers == 35 and len(stack["order"]) == 6 * n_layers
    assert [b for _, b in stack["order"][:n_layers]] == [0] * n_layers  # every layer's base first
    seen: dict[str, int] = {}
    for name, block in stack["order"]:  # each layer's blocks in their own order
        assert block == seen.get(name, -1) + 1
        seen[name] = block
    from hiercomp.anysize import bitstack_layers

    assert [list(e) for e in global_order(bitstack_layers(cm.model))] == stack["order"]


@needs_shared
def test_full_load_is_bit_exact_and_sized_exactly(stack_model, held_out_windows) -> None:
    cm, out = stack_model
    loaded = hiercomp.load(out, runtime="reference")
    ids = held_out_windows[:2]
    assert torch.equal(logits(loaded.model, ids), logits(cm.model, ids))
    sizes = saved_size_bytes(out)
    # The file holds exactly the accounted bytes plus the safetensors header.
    assert sizes["size_bytes"] - sizes["header_bytes"] == cm.accounted_bytes()
    _, prefix = prefix_sizes(json.loads((out / "hiercomp.json").read_text())["bitstack"])
    assert prefix[-1] == 8 * cm.accounted_bytes()


@needs_shared
def test_budget_load_is_bit_exact_and_reads_only_the_prefix(stack_model, held_out_windows) -> None:
    cm, out = stack_model
    a = hiercomp.load(out, budget="250KB")
    b = hiercomp.load(out, budget=250_000)
    ids = held_out_windows[:2]
    assert torch.equal(logits(a.model, ids), logits(b.model, ids))
    loaded = a.extra["loaded"]
    assert loaded["size_bytes"] <= 250_000 and round(a.accounted_bytes()) == loaded["size_bytes"]
    from hiercomp.anysize import bitstack_layers

    # The budget model holds only its blocks, and equals the full in-memory model cut to the same prefix.
    full_layers = bitstack_layers(cm.model)
    for name, layer in bitstack_layers(a.model).items():
        assert layer.n_blocks == layer.active == loaded["blocks"][name] == layer.u.shape[0]
        full_layers[name].set_active(layer.active)
    try:
        assert torch.equal(logits(a.model, ids), logits(cm.model, ids))
    finally:
        for layer in full_layers.values():
            layer.set_active(layer.n_blocks)
    # A budget model saved again is a smaller any-size model of its own.
    a.save(out.parent / "cut")
    again = hiercomp.load(out.parent / "cut", runtime="reference")
    assert torch.equal(logits(again.model, ids), logits(a.model, ids))
    assert saved_size_bytes(out.parent / "cut")["size_bytes"] < saved_size_bytes(out)["size_bytes"]


@needs_shared
def test_kl_falls_monotonically_with_size(stack_model, held_out_windows) -> None:
    from hiercomp.eval import compare_distributions

    _, out = stack_model
    stack = json.loads((out / "hiercomp.json").read_text())["bitstack"]
    n_base, sizes = prefix_sizes(stack)
    ref = load_any(str(STORIES))
    budgets = [int(sizes[n_base] / 8 + f * (sizes[-1] - sizes[n_base]) / 8) for f in (0, 0.2, 0.45, 0.7, 1)]
    results = []
    for budget in budgets:
        cm = hiercomp.load(out, budget=budget)
        dist = compare_distributions(ref.model, cm.model, held_out_windows, progress=False)
        results.append((cm.extra["loaded"]["size_bytes"], dist.kl, cm.bits_per_weight))
    loaded_sizes = [r[0] for r in results]
    kls = [r[1] for r in results]
    assert loaded_sizes == sorted(set(loaded_sizes))  # five distinct sizes
    assert all(b <= a for a, b in zip(kls, kls[1:])), results
    # measured: KL 5.8 at the base (1.6 bpw) down to 0.16 with all six blocks (8.6 bpw)
    assert kls[0] > 3 * kls[-1]


@needs_shared
def test_budget_errors_and_bpw_budget(stack_model) -> None:
    _, out = stack_model
    stack = json.loads((out / "hiercomp.json").read_text())["bitstack"]
    n_base, sizes = prefix_sizes(stack)
    with pytest.raises(HiercompError, match=r"below the BitStack base of \d+ bytes"):
        hiercomp.load(out, budget=sizes[n_base] // 8 - 1)
    with pytest.raises(HiercompError, match="below the BitStack base of 1.6"):
        hiercomp.load(out, budget="1.0bpw")
    assert choose_prefix(stack, sizes[n_base] // 8) == n_base
    cm = hiercomp.load(out, budget="3.0bpw")
    assert 2.8 < cm.bits_per_weight <= 3.0


@needs_shared
def test_cli_eval_with_budget(stack_model, tmp_path, capsys) -> None:
    _, out = stack_model
    target = tmp_path / "r.json"
    assert main(["eval", str(out), "--text", str(TINYSTORIES), "--budget", "250KB", "--max-windows", "2",
                 "--seq-len", "128", "--json", str(target), "--quiet"]) == 0
    result = json.loads(target.read_text())
    assert result["budget"] == "250KB" and result["size_bytes"] == result["loaded"]["size_bytes"] <= 250_000
    assert result["perplexity"] > 1
    assert main(["eval", str(out), "--text", str(TINYSTORIES), "--budget", "10KB", "--quiet"]) == 2
    assert "below the BitStack base" in capsys.readouterr().err
