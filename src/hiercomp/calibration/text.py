"""Calibration data: random windows of a token stream, as GPTQ samples them.

Methods such as GPTQ, SparseGPT and Wanda need a few sequences of real text to measure the inputs
of each layer. The protocol here is the one of the GPTQ reference code (``get_wikitext2`` / ``get_c4``
there), made deterministic and explicit:

1. **Documents.** A ``.txt`` file (or WikiText's ``.raw``) is split into documents on lines that
   are exactly ``<|endoftext|>`` (surrounding whitespace ignored), or, when the file has no such line,
   on blank lines (one or more lines holding only whitespace). A ``.jsonl`` file holds one JSON object
   a line; the document is its ``field`` (``"text"`` by default). ``hf:<dataset>[:<config>]:<split>``
   reads the ``field`` column of a dataset with the optional ``datasets`` package
   (``pip install 'hiercomp[data]'``). Documents are stripped; empty ones are dropped.
2. **Token stream.** Each document is tokenized without special tokens (in one batched call, which a
   fast tokenizer runs in parallel), and the documents are concatenated in file order with the
   tokenizer's EOS id between consecutive documents (nothing when it has none), so the stream looks
   like the pre-training stream: a document boundary is an EOS, not a glued-on sentence.
3. **Windows.** A ``torch.Generator`` seeded with ``seed`` draws ``num_sequences`` start offsets
   uniformly (with replacement) from the ``n - T + 1`` valid ones, where ``T`` is the number of text
   tokens in a window. With ``add_bos`` and a tokenizer that has a BOS token (else [CLS], for
   encoders), each row is that token
   followed by ``T = seq_len - 1`` stream tokens (what the model sees at position 0 in use);
   otherwise ``T = seq_len``. Windows may cross document boundaries, as in GPTQ. The result is an
   ``(num_sequences, seq_len)`` int64 tensor, identical for identical inputs and seed.

When ``num_sequences * T`` exceeds the stream, the windows necessarily overlap: a warning says so and
sampling proceeds. Every error is a :class:`~hiercomp.errors.HiercompError` whose one-line message
says what to do.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hiercomp.errors import HiercompError

__all__ = [
    "DEFAULT_NUM_SEQUENCES",
    "DEFAULT_SEQ_LEN",
    "CalibrationConfig",
    "calibration_tokens",
    "EOT_MARKER",
    "HUB_PREFIX",
    "TEXT_ALIASES",
    "documents_from_hub",
    "load_calibration",
    "read_documents",
    "token_stream",
]

EOT_MARKER = "<|endoftext|>"
HUB_PREFIX = "hf:"
# Read as plain text too: WikiText's wiki.{train,valid,test}.raw, the usual GPTQ calibration files.
TEXT_ALIASES = (".raw",)

# A line that is exactly the end-of-text marker (whitespace around it ignored).
_EOT_LINE = re.compile(r"^[ \t]*" + re.escape(EOT_MARKER) + r"[ \t]*$", re.MULTILINE)
# One or more blank (whitespace-only) lines between two lines of text.
_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")
# hf:<dataset>[:<config>]:<split>, where a split may carry a slice such as train[:1000].
_HUB_SPEC = re.compile(r"([^:\[\]]+)(?::([^:\[\]]+))?:([^:\[\]]+(?:\[[^\]]*\])?)")


# The one calibration default, for every route to a model (compress, search, compress --budget): 128 windows of
# min(512, model context) tokens.
DEFAULT_NUM_SEQUENCES = 128
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class CalibrationConfig:
    """Where the calibration text comes from and how many windows of what length to draw from it."""

    source: str  # path to .txt / .jsonl, or "hf:<dataset>[:<config>]:<split>" for online users
    num_sequences: int = DEFAULT_NUM_SEQUENCES
    seq_len: int | None = None  # None: min(DEFAULT_SEQ_LEN, the model's context)
    seed: int = 0
    field: str = "text"  # JSONL (or dataset) field holding the text
    add_bos: bool = True  # prepend the tokenizer's BOS when it has one


# --------------------------------------------------------------------------------------------- reading


def _split_txt(text: str) -> list[str]:
    parts = _EOT_LINE.split(text) if _EOT_LINE.search(text) else _BLANK_LINES.split(text)
    return [p.strip() for p in parts if p.strip()]


def _read_jsonl(path: Path, text: str, field: str) -> list[str]:
    docs: list[str] = []
    hint = f"each line must be one JSON object with a string field '{field}' (choose the field with --calib-field)"
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HiercompError(f"{path}:{lineno}: not valid JSON ({exc.msg}); {hint}") from None
        if not isinstance(obj, dict):
            raise HiercompError(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object; {hint}")
        fields = ", ".join(map(str, obj)) or "none"
        if field not in obj:
            raise HiercompError(
                f"{path}:{lineno}: no field '{field}' (available fields: {fields}); pick one with --calib-field"
            )
        value = obj[field]
        if not isinstance(value, str):
            raise HiercompError(
                f"{path}:{lineno}: field '{field}' is a JSON {type(value).__name__}, not a string "
                f"(available fields: {fields}); pick a text field with --calib-field"
            )
        if value.strip():
            docs.append(value.strip())
    return docs


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """The non-empty, stripped documents of a ``.txt`` or ``.jsonl`` file (see the module docstring).

    Raises :class:`HiercompError` for a missing or unreadable file, another extension, a bad JSONL
    line, or a file without any text, so the returned list is never empty.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise HiercompError(f"calibration file {p} does not exist: pass an existing .txt or .jsonl file to --calib")
    if not p.is_file():
        raise HiercompError(f"calibration source {p} is not a file: pass a .txt or .jsonl file to --calib")
    ext = p.suffix.lower()
    if ext in TEXT_ALIASES:
        ext = ".txt"
    if ext not in (".txt", ".jsonl"):
        raise HiercompError(
            f"calibration file {p} has extension '{p.suffix or '(none)'}': use a .txt file (plain text, documents "
            f"separated by {EOT_MARKER} lines or blank lines) or a .jsonl file (one JSON object a line)"
        )
    try:
        text = p.read_text(encoding="utf-8-sig")  # universal newlines; a leading BOM is dropped
    except UnicodeDecodeError as exc:
        raise HiercompError(f"calibration file {p} is not UTF-8 text (byte {exc.start}): convert it to UTF-8") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise HiercompError(f"cannot read calibration file {p} ({reason}): check its permissions") from None
    docs = _split_txt(text) if ext == ".txt" else _read_jsonl(p, text, field)
    if not docs:
        what = "text" if ext == ".txt" else f"non-empty '{field}' values"
        raise HiercompError(f"calibration file {p} has no {what}: pass a file with text in it")
    return docs


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    rest = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    m = _HUB_SPEC.fullmatch(rest.strip())
    if m is None:
        raise HiercompError(
            f"bad dataset source '{spec}': write hf:<dataset>[:<config>]:<split>, "
            "e.g. hf:wikitext:wikitext-2-raw-v1:train or hf:allenai/c4:en:validation[:1000]"
        )
    name, config, split = m.group(1), m.group(2), m.group(3)
    return name, config, split


def documents_from_hub(spec: str, field: str) -> list[str]:
    """The non-empty, stripped ``field`` values of ``hf:<dataset>[:<config>]:<split>``.

    Uses the ``datasets`` package (``pip install 'hiercomp[data]'``) and its cache; offline
    (``HF_HUB_OFFLINE=1``) only already-cached datasets load. Every failure is a one-line
    :class:`HiercompError` that suggests a local ``.txt`` / ``.jsonl`` file instead.
    """
    name, config, split = _parse_hub_spec(spec)
    try:
        import datasets
    except ImportError:
        raise HiercompError(
            f"reading '{spec}' needs the datasets package: pip install 'hiercomp[data]', "
            "or pass a local .txt or .jsonl file to --calib"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, offline mode, unknown dataset/config/split: all end the same way
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise HiercompError(
            f"cannot load dataset '{spec}' ({type(exc).__name__}: {detail}); check the name, config and split, "
            "and when offline (HF_HUB_OFFLINE=1) pass a local .txt or .jsonl file to --calib instead"
        ) from None
    columns = list(getattr(ds, "column_names", None) or [])
    if field not in columns:
        raise HiercompError(
            f"dataset '{spec}' has no column '{field}' (columns: {', '.join(columns) or 'none'}); "
            "pick one with --calib-field"
        )
    docs = [v.strip() for v in ds[field] if isinstance(v, str) and v.strip()]
    if not docs:
        raise HiercompError(f"dataset '{spec}' has no text in column '{field}': pick a text column with --calib-field")
    return docs


# ------------------------------------------------------------------------------------------- sampling


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def token_stream(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """The 1-D int64 stream: each document tokenized without special tokens, EOS between documents."""
    if not documents:
        return torch.empty(0, dtype=torch.int64)
    encoded = tokenizer(list(documents), add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids: list[list[int]] = encoded["input_ids"]
    eos = _special_id(tokenizer, "eos_token_id")
    flat: list[int] = []
    for i, doc_ids in enumerate(ids):
        if i and eos is not None:
            flat.append(eos)
        flat.extend(doc_ids)
    return torch.tensor(flat, dtype=torch.int64)


def _check_config(config: CalibrationConfig, max_len: int | None) -> None:
    n, length = config.num_sequences, config.seq_len
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HiercompError(f"calibration needs at least 1 sequence, got {n!r}: pass --calib-n 1 or more")
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise HiercompError(f"calibration sequences need at least 2 tokens, got {length!r}: pass --calib-len 2 or more")
    if max_len is not None and length > max_len:
        raise HiercompError(
            f"calibration length {length} exceeds the model context of {max_len} tokens: "
            f"pass --calib-len {max_len} or less"
        )


def load_calibration(tokenizer: Any, config: CalibrationConfig, max_len: int | None = None) -> torch.Tensor:
    """``(num_sequences, seq_len)`` int64 input ids: seeded random windows of the source's token stream.

    ``max_len`` is the model context; a longer ``seq_len`` is an error. See the module docstring for
    the protocol.
    """
    if config.seq_len is None:
        config = replace(config, seq_len=min(DEFAULT_SEQ_LEN, max_len or DEFAULT_SEQ_LEN))
    _check_config(config, max_len)
    source = str(config.source)
    if source.startswith(HUB_PREFIX):
        documents = documents_from_hub(source, config.field)
    else:
        documents = read_documents(source, config.field)

    stream = token_stream(tokenizer, documents)
    bos = None
    if config.add_bos:
        # Encoders (BERT) have no BOS but always see [CLS] first in real use: start windows with it.
        bos = _special_id(tokenizer, "bos_token_id")
        bos = _special_id(tokenizer, "cls_token_id") if bos is None else bos
    n_rows, length = config.num_sequences, config.seq_len
    width = length - 1 if bos is not None else length  # text tokens in a window
    total = int(stream.numel())
    if total < width:
        raise HiercompError(
            f"calibration text {source} has {total} tokens, fewer than one window of {width} "
            f"(--calib-len {length}{' with BOS' if bos is not None else ''}): pass more text or a smaller "
            f"--calib-len (at most {total + (bos is not None)})"
        )
    if n_rows * width > total:
        warnings.warn(
            f"calibration text {source} has {total} tokens but {n_rows} windows of {width} need "
            f"{n_rows * width}: the windows overlap (pass more text, or a smaller --calib-n / --calib-len)",
            stacklevel=2,
        )
    generator = torch.Generator().manual_seed(int(config.seed))
    starts = torch.randint(0, total - width + 1, (n_rows,), generator=generator, dtype=torch.int64)
    windows = stream[starts[:, None] + torch.arange(width, dtype=torch.int64)]
    if bos is not None:
        windows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows.contiguous()


def calibration_tokens(tokenizer: Any, calibration: Any, context: int | None) -> torch.Tensor | None:
    """Token windows from whatever the caller has: ``None``, a ``(N, L)`` tensor (used as is), a
    :class:`CalibrationConfig`, or a path / ``hf:`` spec (read with the defaults). ``context`` is the model's."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, (str, Path)):
        calibration = CalibrationConfig(str(calibration))
    if not isinstance(calibration, CalibrationConfig):
        raise HiercompError(f"calibration must be a text file, a CalibrationConfig or a token tensor, got "
                            f"{type(calibration).__name__}")
    if tokenizer is None:
        raise HiercompError("calibration text needs the model's tokenizer; pass tokenizer=... or a model folder "
                            "that has one")
    return load_calibration(tokenizer, calibration, max_len=context)
