"""Calibration data: document splitting, JSONL fields, one-line errors, and seeded windows of the real
stories260K token stream over the TinyStories sample."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from hiercomp.calibration import (
    CalibrationConfig,
    documents_from_hub,
    load_calibration,
    read_documents,
    token_stream,
)
from hiercomp.errors import HiercompError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED_DATA / "models" / "stories260K" / "hf"
TINYSTORIES = SHARED_DATA / "text" / "tinystories" / "valid_sample.txt"
WIKITEXT = SHARED_DATA / "text" / "wikitext-2-raw" / "wiki.valid.raw"
SQUAD = SHARED_DATA / "tasks" / "squad_validation_olmes1000.jsonl"

needs_shared = pytest.mark.skipif(
    not (STORIES.is_dir() and TINYSTORIES.is_file()),
    reason=f"{SHARED_DATA} is absent (a user's clone): the real stories260K tokenizer and TinyStories text live there",
)


@pytest.fixture(scope="module")
def tok():
    if not STORIES.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the real stories260K tokenizer lives there")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ documents


def test_txt_splits_on_endoftext_lines(tmp_path):
    p = _write(tmp_path, "a.txt", "first story.\n\nstill first.\n<|endoftext|>\n  second one  \n  <|endoftext|>  \n"
                                  "<|endoftext|>\nthird <|endoftext|> inline stays\n<|endoftext|>\n")
    # the blank line inside the first story does not split it, because the file has <|endoftext|> lines
    assert read_documents(p) == ["first story.\n\nstill first.", "second one", "third <|endoftext|> inline stays"]


def test_txt_splits_on_blank_lines_without_marker(tmp_path):
    p = _write(tmp_path, "b.txt", "\n\npara one\nline two\n\n\n \t \npara two\n\npara three  \n\n")
    assert read_documents(p) == ["para one\nline two", "para two", "para three"]


def test_txt_crlf_and_single_document(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"\xef\xbb\xbfline a\r\nline b\r\n\r\nline c\r\n")
    assert read_documents(p) == ["line a\nline b", "line c"]
    assert read_documents(_write(tmp_path, "d.txt", "just one line")) == ["just one line"]


@needs_shared
def test_real_files_split_as_expected():
    stories = read_documents(TINYSTORIES)
    raw = TINYSTORIES.read_text()
    # 443 stories, each followed by an <|endoftext|> line (the last one too)
    assert len(stories) == sum(1 for line in raw.splitlines() if line.strip() == "<|endoftext|>") == 443
    assert stories[1].startswith("Once upon a time, in a big forest")
    assert all(s == s.strip() and s and "<|endoftext|>" not in s for s in stories)
    wiki = read_documents(WIKITEXT)  # .raw reads as .txt; no marker, so split on blank lines
    assert len(wiki) > 1000 and wiki[0] == "= Homarus gammarus ="
    if SQUAD.is_file():
        contexts = read_documents(SQUAD, field="context")
        assert len(contexts) == 1000 and all(len(c) > 100 for c in contexts)


def test_jsonl_reads_field_and_skips_blank_and_empty(tmp_path):
    rows = [{"text": " a \u2028 b ", "id": 1}, {"text": "", "id": 2}, {"text": "c", "context": "ctx"}]
    p = _write(tmp_path, "r.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert read_documents(p) == ["a \u2028 b", "c"]
    q = _write(tmp_path, "q.jsonl", json.dumps({"context": "only context", "question": "q?"}) + "\n")
    assert read_documents(q, field="context") == ["only context"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = _write(tmp_path, "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(HiercompError) as exc:
        read_documents(p)
    msg = _one_line(exc)
    assert f"{p}:3" in msg and "not valid JSON" in msg and "'text'" in msg


def test_jsonl_missing_field_lists_available_fields(tmp_path):
    p = _write(tmp_path, "f.jsonl", '{"text": "ok"}\n{"context": "c", "question": "q"}\n')
    with pytest.raises(HiercompError) as exc:
        read_documents(p)
    msg = _one_line(exc)
    assert f"{p}:2" in msg and "'text'" in msg and "context, question" in msg and "--calib-field" in msg


def test_jsonl_non_string_field_and_non_object(tmp_path):
    p = _write(tmp_path, "n.jsonl", '{"text": {"a": 1}, "title": "t"}\n')
    with pytest.raises(HiercompError) as exc:
        read_documents(p)
    msg = _one_line(exc)
    assert f"{p}:1" in msg and "not a string" in msg and "text, title" in msg
    q = _write(tmp_path, "l.jsonl", '["text"]\n')
    with pytest.raises(HiercompError) as exc:
        read_documents(q)
    assert f"{q}:1" in _one_line(exc) and "not an object" in str(exc.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(HiercompError) as exc:
        read_documents(tmp_path / "nope.txt")
    msg = _one_line(exc)
    assert "nope.txt" in msg and "does not exist" in msg and ".jsonl" in msg
    p = _write(tmp_path, "data.csv", "a,b\n")
    with pytest.raises(HiercompError) as exc:
        read_documents(p)
    msg = _one_line(exc)
    assert "data.csv" in msg and "'.csv'" in msg and ".txt" in msg and ".jsonl" in msg
    with pytest.raises(HiercompError, match="not a file"):
        read_documents(tmp_path)


def test_file_without_text(tmp_path):
    for name, text in [("e.txt", " \n\n<|endoftext|>\n\t\n"), ("e.jsonl", '{"text": "  "}\n\n')]:
        p = _write(tmp_path, name, text)
        with pytest.raises(HiercompError) as exc:
            read_documents(p)
        msg = _one_line(exc)
        assert name in msg and "no " in msg and "text" in msg
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(HiercompError, match="not UTF-8"):
        read_documents(p)


# ------------------------------------------------------------------------------------------- sampling


@needs_shared
def test_shape_dtype_bos_and_windows_are_substrings(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    cfg = CalibrationConfig(str(TINYSTORIES), num_sequences=16, seq_len=128, seed=3)
    ids = load_calibration(tok, cfg, max_len=512)
    assert ids.shape == (16, 128) and ids.dtype == torch.int64 and ids.is_contiguous()
    assert (ids[:, 0] == tok.bos_token_id).all()
    # the reference stream, built independently: per-document ids with EOS between documents
    docs = read_documents(TINYSTORIES)
    stream: list[int] = []
    for i, d in enumerate(docs):
        stream += ([tok.eos_token_id] if i else []) + tok.encode(d, add_special_tokens=False)
    ref = torch.tensor(stream)
    assert torch.equal(token_stream(tok, docs), ref)
    assert 150_000 < ref.numel() < 200_000
    assert (ref == tok.eos_token_id).sum() == len(docs) - 1 and (ref == tok.bos_token_id).sum() == 0
    for row in ids:
        body = row[1:]
        m = ref.numel() - body.numel() + 1
        cands = torch.nonzero((ref[:m] == body[0]) & (ref[1 : m + 1] == body[1]) & (ref[2 : m + 2] == body[2]))
        assert any(torch.equal(ref[c : c + body.numel()], body) for c in cands.flatten().tolist())
    # the text decodes to English story text
    assert "the" in tok.decode(ids[0, 1:].tolist()).lower().split()


@needs_shared
def test_deterministic_per_seed(tok):
    base = CalibrationConfig(str(TINYSTORIES), num_sequences=8, seq_len=64, seed=0)
    a = load_calibration(tok, base)
    b = load_calibration(tok, base)
    c = load_calibration(tok, CalibrationConfig(str(TINYSTORIES), num_sequences=8, seq_len=64, seed=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the windows themselves are spread out, not a repeat of one window
    assert len({tuple(r.tolist()) for r in a}) == 8


@needs_shared
def test_without_bos_uses_full_length_of_text(tok, tmp_path):
    cfg = CalibrationConfig(str(TINYSTORIES), num_sequences=4, seq_len=32, seed=5, add_bos=False)
    ids = load_calibration(tok, cfg)
    assert ids.shape == (4, 32) and (ids[:, 0] != tok.bos_token_id).any()
    with_bos = load_calibration(tok, CalibrationConfig(str(TINYSTORIES), 4, 33, 5))
    assert (with_bos[:, 0] == 1).all()


@needs_shared
def test_jsonl_source_and_no_special_tokens(tok, tmp_path):
    # a tokenizer without BOS/EOS: no BOS column, documents simply concatenated
    class NoSpecial:
        bos_token_id = None
        eos_token_id = None

        def __call__(self, texts, **kwargs):
            return tok(texts, **kwargs)

    rows = [{"text": f"Once upon a time there was a cat number {i}."} for i in range(20)]
    p = _write(tmp_path, "s.jsonl", "\n".join(map(json.dumps, rows)))
    ids = load_calibration(NoSpecial(), CalibrationConfig(str(p), num_sequences=4, seq_len=16, seed=0))
    assert ids.shape == (4, 16)
    assert not (ids == 1).any() and not (ids == 2).any()
    stream = token_stream(NoSpecial(), [r["text"] for r in rows])
    assert stream.numel() == sum(len(tok.encode(r["text"], add_special_tokens=False)) for r in rows)


@needs_shared
def test_too_short_text_says_tokens_and_remedy(tok, tmp_path):
    p = _write(tmp_path, "short.txt", "Once upon a time there was a little dog.")
    n = len(tok.encode("Once upon a time there was a little dog.", add_special_tokens=False))
    with pytest.raises(HiercompError) as exc:
        load_calibration(tok, CalibrationConfig(str(p), num_sequences=2, seq_len=64))
    msg = _one_line(exc)
    assert "short.txt" in msg and f"has {n} tokens" in msg and "63" in msg and "64" in msg and "--calib-len" in msg
    # exactly one window fits: every row is that window, with a warning that windows overlap
    with pytest.warns(UserWarning, match="overlap"):
        ids = load_calibration(tok, CalibrationConfig(str(p), num_sequences=3, seq_len=n + 1))
    assert ids.shape == (3, n + 1) and (ids == ids[0]).all()


@needs_shared
def test_overlap_warning_only_when_needed(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_calibration(tok, CalibrationConfig(str(TINYSTORIES), num_sequences=64, seq_len=256))
    with pytest.warns(UserWarning, match="windows overlap"):
        load_calibration(tok, CalibrationConfig(str(TINYSTORIES), num_sequences=1000, seq_len=256))


@pytest.mark.parametrize(
    ("kwargs", "max_len", "needle"),
    [
        ({"num_sequences": 0}, None, "--calib-n 1 or more"),
        ({"seq_len": 1}, None, "--calib-len 2 or more"),
        ({"seq_len": 1024}, 512, "--calib-len 512 or less"),
    ],
)
def test_config_errors_come_before_reading(tmp_path, kwargs, max_len, needle):
    cfg = CalibrationConfig(str(tmp_path / "never-read.txt"), **kwargs)
    with pytest.raises(HiercompError) as exc:
        load_calibration(object(), cfg, max_len=max_len)
    assert needle in _one_line(exc)


# ------------------------------------------------------------------------------------------------ hub


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(HiercompError) as exc:
        load_calibration(object(), CalibrationConfig("hf:wikitext:wikitext-2-raw-v1:train", 4, 16))
    msg = _one_line(exc)
    assert "pip install 'hiercomp[data]'" in msg and ".jsonl" in msg


def test_hub_offline_and_columns(monkeypatch):
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        if name == "missing":
            raise ConnectionError("Couldn't reach 'missing' on the Hub (OfflineModeIsEnabled)")
        return _FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    with pytest.raises(HiercompError) as exc:
        documents_from_hub("hf:missing:train", "text")
    msg = _one_line(exc)
    assert "OfflineModeIsEnabled" in msg and "HF_HUB_OFFLINE" in msg and ".txt or .jsonl" in msg
    assert documents_from_hub("hf:allenai/c4:en:validation[:1000]", "text") == ["a", "b"]
    assert calls[-1] == ("allenai/c4", "en", "validation[:1000]")
    documents_from_hub("hf:wikitext:train", "text")
    assert calls[-1] == ("wikitext", None, "train")
    with pytest.raises(HiercompError) as exc:
        documents_from_hub("hf:wikitext:train", "content")
    assert "columns: text, id" in _one_line(exc) and "--calib-field" in str(exc.value)
    with pytest.raises(HiercompError, match=r"hf:<dataset>\[:<config>\]:<split>"):
        documents_from_hub("hf:only-a-name", "text")


def test_hub_real_datasets_offline(monkeypatch):
    pytest.importorskip("datasets", reason="the optional datasets package (hiercomp[data]) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HiercompError) as exc:
        documents_from_hub("hf:hiercomp-test/surely-not-cached:train", "text")
    msg = _one_line(exc)
    assert "surely-not-cached" in msg and "local .txt or .jsonl" in msg


class _FakeDataset:
    column_names = ["text", "id"]

    def __getitem__(self, key):
        return {"text": [" a ", "", None, "b"], "id": [1, 2, 3, 4]}[key]
