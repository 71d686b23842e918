"""Lean loading: the skeleton on ``meta``, filled by assignment from the file; fast vs reference runtimes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hiercomp.errors import HiercompError
from hiercomp.io.saved import WEIGHTS_FILE, build_skeleton, load_compressed, read_meta, read_tensors
from tests.conftest import STORIES, needs_shared

pytestmark = [needs_shared, pytest.mark.usefixtures("one_thread")]

RECIPE = {"rules": [{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*self_attn*"]},
                    {"method": "rtn", "bits": 3, "group_size": 32, "targets": ["*mlp*"]}]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """stories260K compressed (4-bit attention, 3-bit MLP), saved; the token ids and the in-memory logits."""
    import hiercomp

    cm = hiercomp.compress(str(STORIES), RECIPE, progress=False)
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = cm.model(ids).logits
    out = tmp_path_factory.mktemp("lean") / "m"
    cm.save(out)
    return out, ids, logits


def test_reference_load_is_bit_exact_and_matches_the_dense_init_load(saved) -> None:
    path, ids, logits = saved
    model = load_compressed(path, runtime="reference")
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    # The old way: a randomly initialised dense skeleton, then load_state_dict (copying).
    info = read_meta(path)
    old = build_skeleton(path, info)
    state = read_tensors(path / WEIGHTS_FILE)
    for alias, stored in info.get("aliases", {}).items():
        state[alias] = state[stored]
    old.load_state_dict(state)
    old.eval()
    with torch.no_grad():
        lean_logits = model(ids).logits
        assert torch.equal(lean_logits, logits)
        assert torch.equal(old(ids).logits, lean_logits)


def test_tied_embeddings_stay_tied(saved) -> None:
    model = load_compressed(saved[0])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_skeleton_on_meta_allocates_no_weights(saved) -> None:
    model = build_skeleton(saved[0], read_meta(saved[0]), meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    # the non-persistent rotary buffers are real (they are not in the file)
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_fast_runtime_matches_reference_and_keeps_one_copy_of_the_codes(saved) -> None:
    path, ids, logits = saved
    fast = load_compressed(path, runtime="fast")
    layers = {n: m for n, m in fast.named_modules() if hasattr(m, "kernel") and m.kernel is not None}
    assert len(layers) == 5 * 7
    assert all(m.qweight.device.type == "meta" for m in layers.values())  # released: the kernel holds the codes
    with torch.no_grad():
        fast_logits = fast(ids).logits
    assert float((fast_logits - logits).norm() / logits.norm()) < 1e-2
    reference = load_compressed(path, runtime="reference")
    fast_state, ref_state = fast.state_dict(), reference.state_dict()
    assert fast_state.keys() == ref_state.keys()
    assert all(torch.equal(fast_state[k], ref_state[k]) for k in ref_state)


def test_old_folder_loads_without_its_method_in_the_registry(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved folder loads from its layer configs (LAYER_TYPES) alone: renaming or removing a method later
    must not break it."""
    from hiercomp.methods import METHODS

    monkeypatch.delitem(METHODS, "rtn")
    path, ids, logits = saved
    with torch.no_grad():
        assert torch.equal(load_compressed(path, runtime="reference")(ids).logits, logits)


def test_bad_runtime_and_damaged_file_are_one_line_errors(saved, tmp_path: Path) -> None:
    with pytest.raises(HiercompError, match="unknown runtime"):
        load_compressed(saved[0], runtime="turbo")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved[0].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(HiercompError, match="damaged"):
        load_compressed(broken)


@pytest.fixture(scope="module")
def saved_with_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K with every linear 4-bit, the output head too: the head no longer reads the embedding table."""
    import hiercomp

    recipe = {"rules": [{"method": "rtn", "bits": 4, "group_size": 32}], "ignore": []}
    cm = hiercomp.compress(str(STORIES), recipe, progress=False)
    out = tmp_path_factory.mktemp("lean_head") / "m"
    cm.save(out)
    return out


def mapped_files(tensor: torch.Tensor) -> set[str]:
    """Paths of the file mappings (/proc/self/maps) that hold the tensor's first byte."""
    address, paths = tensor.data_ptr(), set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(v, 16) for v in span.split("-"))
        if low <= address < high and len(rest) == 5 and rest[4].strip().startswith("/"):
            paths.add(rest[4].strip())
    return paths


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_input_embedding_is_mapped_from_the_file_when_the_head_does_not_read_it(saved_with_head: Path,
                                                                                saved) -> None:
    from hiercomp.io.saved import sparse_read_names

    weights = saved_with_head / WEIGHTS_FILE
    model = load_compressed(saved_with_head)
    embedding = model.model.embed_tokens.weight
    assert str(weights.resolve()) in mapped_files(embedding)
    # the same values as reading the file
    assert torch.equal(embedding, read_tensors(weights)["model.embed_tokens.weight"])
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    read = load_compressed(saved_with_head)
    read.model.embed_tokens.weight.data = embedding.clone()  # a copy that is not mapped
    with torch.no_grad():
        assert torch.equal(model(ids).logits, read(ids).logits)
    # copy-on-write: writing to the loaded model never changes the folder
    before = weights.read_bytes()
    with torch.no_grad():
        embedding[0].fill_(1.0)
    assert weights.read_bytes() == before
    # a dense head tied to the table reads all of it every token: then it is read, not mapped
    tied = load_compressed(saved[0])
    assert sparse_read_names(tied) == frozenset()
    assert not mapped_files(tied.model.embed_tokens.weight)


def test_a_compressed_head_of_a_tied_model_holds_only_its_stored_form(saved_with_head: Path, tmp_path: Path) -> None:
    # The config still ties the head to the embedding, but a compressed head has no weight to tie: loading must not
    # hang the table on it as a parameter it never reads, and saving the loaded model writes the same tensors.
    import hiercomp
    from hiercomp.layers.base import CompressedLinear

    model = load_compressed(saved_with_head)
    assert model.config.tie_word_embeddings and isinstance(model.lm_head, CompressedLinear)
    assert not any(name.startswith("lm_head.weight") for name in model.state_dict())
    loaded = hiercomp.load(saved_with_head)
    loaded.save(tmp_path / "again")
    first, second = read_tensors(saved_with_head / WEIGHTS_FILE), read_tensors(tmp_path / "again" / WEIGHTS_FILE)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
