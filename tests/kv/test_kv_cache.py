"""KV caches in real forwards and generate: exactness when off, eviction equals masking, bytes held == counted."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hiercomp.errors import HiercompError
from hiercomp.kv import adapter, make_cache, parse
from hiercomp.kv.methods.kivi import KIVI
from hiercomp.kv.methods.mustafar import Mustafar
from tests.conftest import STORIES, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = ["kivi:bits=2", "kivi:bits=4,group_size=16,residual=16", "mustafar:sparsity=0.7",
         "streaming:budget=48", "snapkv:ratio=0.5", "h2o:budget=0.4x", "ems:ratio=0.6",
         "snapkv:ratio=0.5+kivi:bits=2", "h2o:budget=48+mustafar:sparsity=0.5",
         "cskv:rank=12", "snapkv:ratio=0.5+cskv:rank=8"]


@pytest.fixture(scope="module")
def gqa_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _generate(model, ids, cache, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **adapter.cache_kwargs(cache))


def test_exact_cache_equals_dynamic_cache(gqa_llama):
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = _generate(gqa_llama, ids, DynamicCache())
    for spec in ["", "kivi:bits=2,residual=128"]:  # nothing compressed: the window holds every token
        cache = make_cache(gqa_llama, spec)
        assert torch.equal(_generate(gqa_llama, ids, cache), ref), spec
        assert cache.get_seq_length() == 70 + 11


@pytest.mark.parametrize("spec", SPECS)
def test_generate_and_bytes(gqa_llama, spec):
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    cache = make_cache(gqa_llama, spec)
    out = _generate(gqa_llama, ids, cache)
    assert out.shape == (1, 112)
    assert cache.get_seq_length() == 111  # logical: every token seen
    held, counted = cache.held_bytes(), cache.accounted_bytes()
    assert abs(held - counted) <= 0.01 * counted, (held, counted)
    full = 2 * 2 * 2 * 111 * 16 * 4  # layers × K/V × heads × tokens × head_dim × fp32
    assert held < full


def test_eviction_keeps_exactly_the_budget_per_head(gqa_llama):
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    for spec, keep in [("h2o:budget=40", 40), ("streaming:budget=40", 40), ("snapkv:ratio=0.6", 36)]:
        cache = make_cache(gqa_llama, spec)
        with torch.no_grad():
            gqa_llama(ids, **adapter.cache_kwargs(cache))
        for layer in cache.layers:
            assert layer.keys.shape == (1, 2, keep, 16), spec
        assert cache.get_seq_length() == 90


def test_a_prompt_too_short_for_a_ratio_keeps_sink_and_window(gqa_llama):
    """snapkv:ratio=0.75 on a 40-token prompt would keep 10 tokens, below the 32 it always protects (sink +
    observation window): the cache keeps those 32 and counts the short prefill instead of failing the evaluation."""
    cache = make_cache(gqa_llama, "snapkv:ratio=0.75")
    protected = cache.evictor.protected()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        gqa_llama(ids, **adapter.cache_kwargs(cache))
    for layer in cache.layers:
        assert layer.keys.shape[2] == protected < 40
        assert layer.short_prefills == 1
    long_cache = make_cache(gqa_llama, "snapkv:ratio=0.75")
    with torch.no_grad():
        gqa_llama(torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(5)),
                  **adapter.cache_kwargs(long_cache))
    assert all(layer.keys.shape[2] == 100 and layer.short_prefills == 0 for layer in long_cache.layers)


def test_physical_eviction_equals_masking_the_evicted_keys(gqa_llama):
    """StreamingLLM drops tokens 4..19 of 40; a 5-token chunk then must see what a full cache with those keys
    masked sees (the positions and mask recipe of methods/KV_CONTEXT.md §0)."""
    ids = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(4))
    cache = make_cache(gqa_llama, "streaming:budget=24,sinks=4")
    with torch.no_grad():
        gqa_llama(ids[:, :40], **adapter.cache_kwargs(cache))
        got = gqa_llama(ids[:, 40:], **adapter.cache_kwargs(cache)).logits
        mask = torch.ones(45, 45, dtype=torch.bool).tril()
        mask[40:, 4:20] = False
        ref = gqa_llama(ids, attention_mask=mask[None, None]).logits[:, 40:]
    assert (got - ref).abs().max() < 1e-4


def test_kivi_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 32)
    x[..., 3] *= 20  # an outlier channel: per-channel key groups give it its own range
    for bits in (2, 4, 8):
        enc = KIVI(bits=bits, group_size=32)
        k, v = enc.decode(enc.encode(x, x), torch.float32)
        k_range = x.reshape(1, 2, 2, 32, 32).amax(3) - x.reshape(1, 2, 2, 32, 32).amin(3)
        k_bound = (k_range / (2**bits - 1) / 2).repeat_interleave(32, dim=2) * 1.01 + 1e-2
        assert ((k - x).abs() <= k_bound).all(), bits
        v_range = x.reshape(1, 2, 64, 1, 32).amax(-1) - x.reshape(1, 2, 64, 1, 32).amin(-1)
        assert ((v - x).abs() <= v_range / (2**bits - 1) / 2 * 1.01 + 1e-2).all(), bits
    # packed: 2-bit codes take a quarter byte per element
    assert KIVI(bits=2).encode(x, x)["k_codes"].shape == (1, 2, 64, 8)


def test_mustafar_keeps_the_largest_entries_exactly():
    x = torch.randn(1, 2, 16, 32)
    enc = Mustafar(sparsity=0.75)
    k, _ = enc.decode(enc.encode(x, x), torch.float32)
    assert ((k != 0).sum(-1) == 8).all()
    kept = x.abs().topk(8, dim=-1).values
    assert torch.allclose(k.abs().sort(-1, descending=True).values[..., :8], kept, atol=1e-2)


def test_cskv_low_rank_round_trip():
    from hiercomp.kv.methods.cskv import CSKV
    torch.manual_seed(0)
    # keys of rank 6 across 2 heads × 16 channels: a rank-6 projection reconstructs them to fp16 precision
    x = (torch.randn(1, 64, 6) @ torch.randn(6, 32)).reshape(1, 64, 2, 16).transpose(1, 2)
    enc = CSKV(rank=6)
    k, _ = enc.decode(enc.encode(x, x), torch.float32)
    assert (k - x).abs().max() < 0.02 * x.abs().max()
    low = CSKV(rank=2)
    k2, _ = low.decode(low.encode(x, x), torch.float32)
    assert (k2 - x).norm() > 10 * (k - x).norm()


@pytest.mark.parametrize("bad, words", [
    ("foo:bits=2", "unknown KV method"), ("kivi:bitz=2", "unknown parameter"), ("snapkv:ratio=1.5", "(0, 1)"),
    ("streaming:budget=3", "below"), ("kivi:bits=3", "2, 4 or 8"), ("kivi:bits=2+snapkv:ratio=0.5", "first"),
    ("h2o:budget=lots", "not a fraction"),
])
def test_bad_specs_are_one_line_errors(bad, words):
    with pytest.raises(HiercompError) as err:
        parse(bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unsupported_attention_is_named():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, use_sliding_window=True, sliding_window=16,
                      max_window_layers=0)
    with pytest.raises(HiercompError, match="sliding"):
        make_cache(Qwen2ForCausalLM(cfg), "kivi:bits=2")


@needs_shared
def test_stories260k_generate_with_every_method():
    model = LlamaForCausalLM.from_pretrained(str(STORIES)).eval()
    ids = torch.randint(3, 512, (1, 120), generator=torch.Generator().manual_seed(5))
    ref = _generate(model, ids, DynamicCache(), n=8)
    assert torch.equal(_generate(model, ids, make_cache(model, ""), n=8), ref)
    for spec in SPECS:
        cache = make_cache(model, spec.replace("group_size=16", "group_size=8"))
        out = _generate(model, ids, cache, n=8)
        assert out.shape == (1, 128)
        assert abs(cache.held_bytes() - cache.accounted_bytes()) <= 0.01 * cache.accounted_bytes()
