"""One memory budget across weights and KV cache: `hiercomp plan-memory`, its plan, and applying it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hiercomp.budget.memory import kv_bytes_at, kv_layer_like, parse_memory
from hiercomp.cli import main
from hiercomp.errors import HiercompError
from hiercomp.plan import MethodConfig, Plan
from tests.conftest import STORIES, TINYSTORIES, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough for seconds: RTN levels (no calibration statistics), short evaluation windows.
FAST = ["--levels", "rtn:bits=2,4,8:group_size=channel", "--calib-n", "8", "--calib-len", "128",
        "--eval-prefix", "128", "--eval-continuation", "16", "--eval-sequences", "2", "--fitness-tokens", "256",
        "--quiet"]


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("spec", ["none", "kivi:bits=2", "kivi:bits=4,residual=16",
                                  "snapkv:ratio=0.5+kivi:bits=4", "streaming:budget=64"])
def test_kv_bytes_at_context_and_batch_equal_a_real_cache(spec: str) -> None:
    """The formula the plan counts at context × batch equals the bytes a real cache of that shape holds."""
    from hiercomp.kv import adapter, make_cache

    model = _tiny_llama()
    context, batch = 150, 3
    ids = torch.randint(0, 128, (batch, context))
    cache = make_cache(model, spec)
    with torch.no_grad():
        model(ids, **adapter.cache_kwargs(cache))
    predicted = kv_bytes_at(kv_layer_like(model, spec), 2, context, batch)
    assert cache.held_bytes() == pytest.approx(predicted, rel=0.01)
    if spec == "none":
        assert predicted == 2 * batch * 2 * context * 32 * 4  # K and V, 2 layers, 2 KV heads × 32 dims, fp32
    with torch.no_grad():  # then 40 decoded tokens: appended, or held at the budget by streaming
        for _ in range(40):
            model(torch.randint(0, 128, (batch, 1)), **adapter.cache_kwargs(cache))
    after = kv_bytes_at(kv_layer_like(model, spec), 2, context, batch, generated=40)
    assert cache.held_bytes() == pytest.approx(after, rel=0.01)
    assert (after == predicted) == spec.startswith("streaming")


def test_memory_units_and_plan_round_trip() -> None:
    assert parse_memory("1GB") == 10**9 and parse_memory("800MiB") == 800 * 2**20
    for bad in ("3bpw", "0.5x", "lots"):
        with pytest.raises(HiercompError):
            parse_memory(bad)
    plan = Plan({"model.layers.0.mlp.up_proj": MethodConfig("rtn", (("bits", 4),))}, kv="kivi:bits=2",
                memory={"memory_bytes": 10**9, "context": 8192, "batch": 4, "weights_bytes": 1, "kv_bytes": 2})
    again = Plan.from_dict(plan.to_dict())
    assert (again.kv, again.memory, again.layers) == (plan.kv, plan.memory, plan.layers)
    with pytest.raises(HiercompError, match="kv: unknown KV method"):
        Plan.from_dict({**plan.to_dict(), "kv": "zip:bits=2"})
    with pytest.raises(HiercompError, match="'memory' must be a mapping"):
        Plan.from_dict({**plan.to_dict(), "memory": [1, 2]})


@needs_shared
def test_plan_memory_fits_applies_and_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The chosen pair fits the memory, beats every other fitting pair on damage, and `compress --plan` keeps its KV
    spec in hiercomp.json, where `hiercomp.load` exposes it."""
    import hiercomp

    plan_file, pairs_file = tmp_path / "plan.yaml", tmp_path / "pairs.json"
    memory = 700_000
    code = main(["plan-memory", str(STORIES), "--memory", f"{memory}B", "--context", "256", "--batch", "2",
                 "--calib", str(TINYSTORIES), "--out", str(plan_file), "--json", str(pairs_file),
                 "--cache", str(tmp_path / "levels"), *FAST])
    assert code == 0, capsys.readouterr()
    plan = Plan.load(plan_file)
    split = plan.memory
    assert split["weights_bytes"] + split["kv_bytes"] + split["overhead_bytes"] == split["total_bytes"] <= memory
    assert (split["context"], split["batch"]) == (256, 2)
    assert plan.kv is not None and plan.layers
    check = split["evaluation"]["kv_bytes_check"]
    assert check["formula"] == pytest.approx(check["measured"], rel=0.01)
    pairs = json.loads(pairs_file.read_text())["candidates"]
    assert len(pairs) >= 3 and all(p["total_bytes"] <= memory for p in pairs)
    verified = [p for p in pairs if p["measured_kl"] is not None]
    assert len(verified) == 2
    assert split["damage"]["measured_kl"] == pytest.approx(min(p["measured_kl"] for p in verified), abs=1e-6)
    # the sum of KLs is a usable prediction of the pair measured together (within a factor 1.5 here)
    for p in verified:
        assert p["measured_kl"] == pytest.approx(p["predicted_kl"], rel=0.5)
    # a compressed cache wins here: the full fp32 cache leaves too little for the weights (or does not fit at all)
    full = [p for p in pairs if p["kv"] == "none"]
    assert plan.kv is not None and all(p["predicted_kl"] > split["damage"]["predicted_kl"] for p in full)

    out = tmp_path / "model"
    assert main(["compress", str(STORIES), "--plan", str(plan_file), "--calib", str(TINYSTORIES), "--calib-n", "8",
                 "--calib-len", "128", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "hiercomp.json").read_text())["kv"] == plan.kv
    assert (out / "model.safetensors").stat().st_size <= split["weights_bytes"]
    loaded = hiercomp.load(out)
    assert loaded.kv_spec == plan.kv
    plain = tmp_path / "plain"
    assert main(["compress", str(STORIES), "--method", "rtn", "--out", str(plain), "--quiet"]) == 0
    assert hiercomp.load(plain).kv_spec is None
    assert "kv" not in json.loads((plain / "hiercomp.json").read_text())


@needs_shared
def test_impossible_memory_names_the_smallest_reachable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--context", "256", "--batch", "2", "--calib", str(TINYSTORIES), "--cache", str(tmp_path), *FAST]
    # below even the embeddings + cheapest cache: refused before any candidate is built
    assert main(["plan-memory", str(STORIES), "--memory", "200KB", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: memory 200 KB cannot hold context 256 × batch 2") and "0 bytes" in err
    assert err.count("\n") == 1
    # above that floor but below the cheapest weights: the smallest reachable, in its parts
    assert main(["plan-memory", str(STORIES), "--memory", "620KB", "--kv", "kivi:bits=2", *common]) == 2
    err = capsys.readouterr().err
    assert "the smallest reachable is" in err and "weights at their cheapest level" in err and "kivi:bits=2" in err
    assert not list(tmp_path.glob("*.yaml"))


def test_bad_input_fails_before_loading(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan-memory", "no/such/model", "--memory", "3bpw", "--context", "8", "--calib", "x.txt"]) == 2
    assert "must be bytes" in capsys.readouterr().err
    assert main(["plan-memory", "no/such/model", "--memory", "1GB", "--context", "8", "--calib", "x.txt",
                 "--kv", "snapkv:ratio=2"]) == 2
    assert "ratio=2 must lie in (0, 1)" in capsys.readouterr().err
