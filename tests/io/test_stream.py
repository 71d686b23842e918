"""Streaming compression (hiercomp.stream): the same bytes as the in-memory path, one block's weights at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hiercomp
from hiercomp.api import compress
from hiercomp.errors import HiercompError
from hiercomp.recipe import Recipe
from hiercomp.stream import ShardStream, on_meta

VOCAB = 300
N_LAYERS = 3


def _tiny_llama_folder(folder: Path, tie: bool) -> Path:
    """A random 3-block Llama saved as several safetensors shards, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="100KB")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {tie: _tiny_llama_folder(root / f"tie{int(tie)}", tie) for tie in (False, True)}


CALIBRATION = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(1))


def _meta_without_times(folder: Path) -> dict:
    info = json.loads((folder / "hiercomp.json").read_text())
    info["report"].pop("seconds")
    for row in info["report"]["layers"]:
        row.pop("seconds")
    info.pop("files")
    info.pop("structure_sha256", None)
    return info


@pytest.mark.parametrize("method,tie", [("rtn", False), ("gptq", False), ("gptq", True)])
def test_stream_writes_the_in_memory_bytes(llama_folders, tmp_path, method, tie):
    source = llama_folders[tie]
    assert len(list(source.glob("*.safetensors"))) > 1  # really read from several shards
    recipe = Recipe.single(method, bits=4, group_size=32)
    calibration = CALIBRATION if method == "gptq" else None
    memory = compress(str(source), recipe, calibration, out=tmp_path / "memory", progress=False)
    streamed = compress(str(source), recipe, calibration, out=tmp_path / "stream", progress=False, stream=True)

    assert (tmp_path / "stream" / "model.safetensors").read_bytes() == \
        (tmp_path / "memory" / "model.safetensors").read_bytes()
    assert _meta_without_times(tmp_path / "stream") == _meta_without_times(tmp_path / "memory")
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == \
        sorted(p.name for p in (tmp_path / "memory").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "stream"]  # no temporary folder left
    assert len(streamed.report.layers) == len(memory.report.layers) == 7 * N_LAYERS
    assert [r.rel_output_error for r in streamed.report.layers] == [r.rel_output_error for r in memory.report.layers]
    if tie:
        assert json.loads((tmp_path / "stream" / "hiercomp.json").read_text())["aliases"] == {
            "lm_head.weight": "model.embed_tokens.weight"}

    # The streamed folder is a normal one: both runtimes load it, and it computes what the in-memory model does.
    ids = CALIBRATION[:2]
    with torch.inference_mode():
        want = memory.model(ids).logits
        assert torch.equal(hiercomp.load(tmp_path / "stream", runtime="reference").model(ids).logits, want)
        if method == "gptq" and not tie:  # the packed fast path (how a model too large for dense memory is run)
            fast = hiercomp.load(tmp_path / "stream", runtime="fast").model(ids).logits
            assert (fast - want).abs().max() / want.abs().max() < 3e-2  # the integer kernels compute in bfloat16


def _dense_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values()
               if t.device.type != "meta" and t.is_floating_point())


def test_stream_holds_one_block_at_a_time(llama_folders, tmp_path, monkeypatch):
    """Every time a block is read or released, no other block holds weights, the embedding read for the capture is
    gone, and the model's resident float tensors never exceed one block's."""
    events: list[tuple[str, int, int]] = []
    reads: list[str] = []
    block_bytes = 0

    def check(stream: ShardStream, what: str, index: int) -> None:
        nonlocal block_bytes
        for other, (_, module) in stream.blocks.items():
            if other != index:
                assert on_meta(module), f"block {other} holds weights while block {index} is {what}"
        assert stream.model.model.embed_tokens.weight.device.type == "meta"
        assert stream.model.lm_head.weight.device.type == "meta"
        if what == "read":
            block_bytes = max(block_bytes, _dense_bytes(stream.blocks[index][1]))
        events.append((what, index, _dense_bytes(stream.model)))

    before, after, materialise = ShardStream.before_block, ShardStream.after_block, ShardStream.materialise

    def before_block(self, index, block):
        before(self, index, block)
        check(self, "read", index)

    def after_block(self, index, block):
        check(self, "compressed", index)
        after(self, index, block)
        assert on_meta(block)

    def counting_materialise(self, module, prefix, only=None):
        reads.append(prefix)
        materialise(self, module, prefix, only)

    monkeypatch.setattr(ShardStream, "before_block", before_block)
    monkeypatch.setattr(ShardStream, "after_block", after_block)
    monkeypatch.setattr(ShardStream, "materialise", counting_materialise)
    compress(str(llama_folders[False]), Recipe.single("gptq", bits=4, group_size=32), CALIBRATION,
             out=tmp_path / "out", progress=False, stream=True)

    assert [(what, index) for what, index, _ in events] == [
        (what, i) for i in range(N_LAYERS) for what in ("read", "compressed")]
    # the capture's tensors, then each block once
    assert reads == ["", *(f"model.layers.{i}." for i in range(N_LAYERS))]
    assert block_bytes > 0
    assert max(nbytes for _, _, nbytes in events) == block_bytes  # never more than one block's float weights


def test_stream_refuses_what_needs_the_whole_model(llama_folders, tmp_path):
    source = str(llama_folders[False])
    recipe = Recipe.single("rtn", bits=4)
    with pytest.raises(HiercompError, match="--stream"):
        compress(source, None, CALIBRATION, budget="3.0bpw", out=tmp_path / "a", stream=True)
    with pytest.raises(HiercompError, match="--stream"):
        compress(source, recipe, None, out=None, stream=True)
    with pytest.raises(HiercompError, match="--stream"):
        compress(source, recipe, CALIBRATION, drop=1, out=tmp_path / "b", stream=True)
    with pytest.raises(HiercompError, match="no safetensors"):
        compress(str(tmp_path), recipe, None, out=tmp_path / "c", stream=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_compress_stream(llama_folders, tmp_path, capsys):
    from hiercomp.cli import main

    out = tmp_path / "out"
    code = main(["compress", str(llama_folders[False]), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(out), "--stream", "--quiet"])
    assert code == 0, capsys.readouterr()
    assert f"saved {out}: {7 * N_LAYERS} layers compressed" in capsys.readouterr().out
    assert hiercomp.load(out).report.layers[0].kind == "quantized"
