"""CacheGen bitstream: round trip within the quantization step, smaller than 8-bit, corrupt files refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from hiercomp.errors import HiercompError
from hiercomp.kv import adapter
from hiercomp.kv.cachegen import load_prefix, reference_sizes, save_prefix
from tests.conftest import STORIES, needs_shared

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_shared]


def test_cachegen_round_trip_and_size(tmp_path, stories_tokens):
    pytest.importorskip("constriction")
    model = LlamaForCausalLM.from_pretrained(str(STORIES)).eval()
    ids = torch.cat([torch.tensor([1]), stories_tokens[:255]])[None]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :200], **adapter.cache_kwargs(cache))
    sizes = save_prefix(cache, tmp_path / "p.hkv")
    refs = reference_sizes(cache)
    assert sizes["total"] < refs["int8"] < refs["fp16"]
    loaded = load_prefix(tmp_path / "p.hkv", model)
    for a, b in zip(cache.layers, loaded.layers):
        step = a.keys.abs().amax(-1, keepdim=True) / 15  # 32 bins in layer 0, 16 after: ≤ half a step of 7 levels
        assert ((a.keys - b.keys).abs() <= step / 2 * 2.2 + 1e-3).all()
    with torch.no_grad():  # generation continues from the loaded prefix
        out = model.generate(ids[:, :200], max_new_tokens=5, do_sample=False, **adapter.cache_kwargs(loaded))
    assert out.shape == (1, 205)
    raw = (tmp_path / "p.hkv").read_bytes()
    (tmp_path / "bad.hkv").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(HiercompError, match="not a readable"):
        load_prefix(tmp_path / "bad.hkv")
