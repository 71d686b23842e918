"""Perplexity of a causal LM on a text, with one stated protocol (stated in the README).

1. The whole text is tokenized once, without special tokens.
2. The tokens are cut into non-overlapping windows of ``seq_len`` (default ``min(2048, model context)``).
   If the tokenizer adds a BOS token of its own (Llama family), each window is BOS + ``seq_len - 1`` text
   tokens and every text token is predicted. Otherwise (GPT-2 family) each window is ``seq_len`` text tokens
   and the first token of each window is not predicted (it has no context).
3. A final partial window is dropped (it is shorter than ``seq_len``; at most ``seq_len - 1`` tokens are lost).
4. Perplexity = exp(mean negative log-likelihood over all predicted tokens), float32 log-softmax,
   summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hiercomp.errors import HiercompError

DEFAULT_MAX_SEQ_LEN = 2048
EOT_MARKER = "<|endoftext|>"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_mean: float  # nats per predicted token
    n_tokens: int  # predicted tokens
    n_windows: int
    seq_len: int  # tokens per window, BOS included
    bos: bool  # whether each window starts with the tokenizer's BOS token

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_eval_text(path: str | Path) -> str:
    """Read an evaluation text. Documents separated by ``<|endoftext|>`` lines are joined with a blank line.

    Each document is stripped of surrounding whitespace and empty documents are dropped, so
    ``a\\n<|endoftext|>\\nb\\n`` becomes ``a\\n\\nb``. A text without the marker is returned unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise HiercompError(f"evaluation text {path} does not exist; pass --text FILE (plain UTF-8 text)")
    text = path.read_text(encoding="utf-8")
    text = normalise_documents(text)
    if not text.strip():
        raise HiercompError(f"evaluation text {path} is empty; pass a file with held-out text")
    return text


def normalise_documents(text: str) -> str:
    """Join the documents of a text split by ``<|endoftext|>`` separators with ``"\\n\\n"``."""
    if EOT_MARKER not in text:
        return text
    docs = [d.strip() for d in text.split(EOT_MARKER)]
    return "\n\n".join(d for d in docs if d)


def default_bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts BOS in front of what it encodes (Llama family), else None (GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer we cannot probe: trust its declared BOS
        return int(bos)
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def model_context(model: torch.nn.Module) -> int | None:
    """The model's maximum number of positions, from its config, or None if it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(model: torch.nn.Module) -> int:
    ctx = model_context(model)
    return min(DEFAULT_MAX_SEQ_LEN, ctx) if ctx else DEFAULT_MAX_SEQ_LEN


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def token_windows(token_ids: list[int] | torch.Tensor, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """Cut tokens into non-overlapping windows of ``seq_len``: ``[n_windows, seq_len]`` int64.

    With ``bos_id`` each window is ``[bos_id] + seq_len - 1`` consecutive text tokens; without it each window
    is ``seq_len`` consecutive text tokens. A final partial window is dropped. Windows never overlap: every
    text token is in at most one window.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if seq_len < 2:
        raise HiercompError(f"seq_len must be at least 2 (got {seq_len})")
    chunk = seq_len - 1 if bos_id is not None else seq_len
    n = ids.numel() // chunk
    windows = ids[: n * chunk].reshape(n, chunk)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.long), windows], dim=1)
    return windows


def text_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None,
                 bos: bool | None = None) -> torch.Tensor:
    """Tokenize ``text`` once (no special tokens) and cut it into the windows the perplexity protocol uses.

    ``bos=None`` decides from the tokenizer (:func:`default_bos_id`). Raises HiercompError if the text does
    not fill one window.
    """
    bos_id = resolve_bos(tokenizer, bos)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = token_windows(ids, seq_len, bos_id)
    if windows.shape[0] == 0:
        need = seq_len - 1 if bos_id is not None else seq_len
        raise HiercompError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {need}; "
                            "pass a longer text or a smaller --seq-len")
    if max_windows is not None:
        if max_windows < 1:
            raise HiercompError(f"max_windows must be at least 1 (got {max_windows})")
        windows = windows[:max_windows]
    return windows


def resolve_bos(tokenizer: Any, bos: bool | None) -> int | None:
    if bos is None:
        return default_bos_id(tokenizer)
    if not bos:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise HiercompError("bos=True but the tokenizer has no BOS token")
    return int(bos_id)


def check_seq_len(model: torch.nn.Module, seq_len: int) -> None:
    ctx = model_context(model)
    if ctx is not None and seq_len > ctx:
        raise HiercompError(f"seq_len {seq_len} is longer than the model's context of {ctx} positions; "
                            f"use --seq-len {ctx} or less")


def batch_logits(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Logits of a batch of windows, on the model's device, as the model returns them."""
    ids = windows.to(model_device(model))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[:2] != ids.shape:
        raise HiercompError(f"the model returned logits of shape {tuple(logits.shape)} for input "
                            f"{tuple(ids.shape)}; it is not a causal LM")
    return logits


def windows_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
                progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Summed NLL (nats, float64) of tokens 1.. of every window given the ones before it, and their count."""
    total = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress,
                              unit="batch"):
                batch = windows[start:start + batch_size]
                logits = batch_logits(model, batch)[:, :-1].float()
                targets = batch[:, 1:].to(logits.device)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
                total += nll.double().sum().item()
                count += targets.numel()
    finally:
        model.train(was_training)
    return total, count


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    bos: bool | None = None,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` under the protocol in this module's docstring.

    ``max_windows`` keeps the first windows only (for quick checks). ``bos=None`` decides BOS from the
    tokenizer: True if it adds BOS itself when encoding. ``desc`` labels the progress bar (say which model).
    """
    seq_len = default_seq_len(model) if seq_len is None else int(seq_len)
    check_seq_len(model, seq_len)
    windows = text_windows(tokenizer, text, seq_len, max_windows, bos)
    has_bos = resolve_bos(tokenizer, bos) is not None
    total, count = windows_nll(model, windows, batch_size=batch_size, progress=progress, desc=desc)
    nll_mean = total / count
    return PerplexityResult(perplexity=math.exp(nll_mean), nll_mean=nll_mean, n_tokens=count,
                            n_windows=int(windows.shape[0]), seq_len=seq_len, bos=has_bos)
