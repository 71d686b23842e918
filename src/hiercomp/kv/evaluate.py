"""Evaluating a KV cache: teacher-forced continuation quality and a passkey (needle) test from local text.

Continuation protocol (``continuation_quality``): each sequence is a prefix of ``prefix_len`` tokens followed by a
continuation. The prefix is prefilled into the cache under test (which compresses it), then the continuation is fed
one token at a time (teacher forcing) through that cache. Each continuation position's next-token distribution Q is
compared with P from the uncompressed model on the whole sequence: KL(P ‖ Q) in nats, perplexity of Q on the true
tokens, top-1 agreement. The prefill's own last logit is exact for every cache and is not scored. Bytes held are
measured from the cache's tensors right after the prefix (the compressed context) and at the end.

Prefill replay (``capture_prefill`` + ``replay_prefill``): the uncompressed prefill is run once per sequence with
hooks that record each attention's input hidden states and key/value states; any KVCache is then filled by replaying
those into its layers — exactly what a prefill through that cache does (a prefill step attends to its own exact
keys; compression applies to what is stored), at a fraction of the cost when many caches share a prefix.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hiercomp.errors import HiercompError
from hiercomp.kv import adapter


@dataclass
class Prefill:
    """What one uncompressed prefill leaves behind: per layer (hidden, position_embeddings, keys, values)."""

    layers: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]]
    modules: list[torch.nn.Module]
    last_logits: torch.Tensor


def capture_prefill(model: torch.nn.Module, ids: torch.Tensor) -> Prefill:
    """Run ``ids`` [1, P] through the model once (DynamicCache) and record every attention's inputs and K/V."""
    from transformers import DynamicCache

    records: dict[int, list[Any]] = {}
    handles = []
    for idx, attn in adapter.attention_modules(model):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            records[idx] = [module, hidden.detach(), kwargs["position_embeddings"]]
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    cache = DynamicCache()
    try:
        with torch.no_grad():
            logits = model(ids, **adapter.cache_kwargs(cache)).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    layers, modules = [], []
    for idx in sorted(records):
        module, hidden, pos = records[idx]
        layers.append((hidden, pos, cache.layers[idx].keys, cache.layers[idx].values))
        modules.append(module)
    return Prefill(layers, modules, logits)


def replay_prefill(cache: Any, prefill: Prefill) -> Any:
    """Fill a fresh ``KVCache`` (or any transformers cache) as if the captured prefix had been prefilled into it."""
    with torch.no_grad():
        for idx, (hidden, pos, keys, values) in enumerate(prefill.layers):
            if hasattr(cache, "observe"):
                cache.observe(idx, prefill.modules[idx], hidden, pos)
            cache.update(keys, values, idx)
    return cache


@dataclass(frozen=True)
class ContinuationResult:
    kl: float  # mean KL(P_full ‖ Q_cache) per continuation position, nats
    perplexity: float  # of the cache's distributions on the true continuation
    perplexity_full: float  # the uncompressed model's, same positions
    top1_agreement: float
    n_positions: int
    bytes_after_prefix: float  # mean over sequences, measured from tensor storage
    bytes_full_prefix: float  # an uncompressed cache of the same prefix in the same dtype

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensor_bytes(obj: Any, float_bytes: int | None = None) -> float:
    """Bytes of every tensor reachable in ``obj`` (tensor subclasses such as quanto's through their inner tensors,
    tuples, lists, dicts). ``float_bytes`` counts floating tensors at that many bytes per element (2: the 16-bit
    equivalent, for caches of a model that runs in fp32 on CPU); integer codes count as stored."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), float_bytes) for n in names)
        if float_bytes is not None and obj.is_floating_point():
            return float(obj.numel() * float_bytes)
        return float(obj.untyped_storage().nbytes())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x, float_bytes) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, float_bytes) for x in obj.values())
    return 0.0


def cache_bytes(cache: Any, float_bytes: int | None = None) -> float:
    """Bytes a cache holds: ``held_bytes()`` for a KVCache (measured from storage), else every tensor its layers
    hold (DynamicCache, QuantizedCache), with ``float_bytes`` as in ``tensor_bytes``."""
    if hasattr(cache, "held_bytes"):
        return float(cache.held_bytes())
    return sum(tensor_bytes(vars(layer), float_bytes) for layer in cache.layers)


def reference_logprobs(model: torch.nn.Module, sequences: torch.Tensor, prefix_len: int) -> list[torch.Tensor]:
    """The uncompressed model's log-probabilities at the scored continuation positions, one [L - P - 1, V] each."""
    with torch.no_grad():
        return [model(seq[None]).logits[0, prefix_len:-1].float().log_softmax(-1) for seq in sequences]


def continuation_quality(model: torch.nn.Module, make: Callable[[], Any], sequences: torch.Tensor, prefix_len: int,
                         prefills: list[Prefill] | None = None,
                         references: list[torch.Tensor] | None = None,
                         float_bytes: int | None = None) -> ContinuationResult:
    """Teacher-forced quality of the caches ``make()`` builds, on ``sequences`` [N, L] (see the module docstring).
    ``prefills`` (``capture_prefill`` of each prefix) and ``references`` (``reference_logprobs``) let many caches
    share one prefill and one reference pass. ``float_bytes=2`` counts floating tensors of caches that are not a
    KVCache, and the uncompressed reference, at 16 bits (see ``tensor_bytes``)."""
    if sequences.dim() != 2 or not 0 < prefix_len < sequences.shape[1] - 1:
        raise HiercompError(f"sequences must be [N, L] with 0 < prefix_len < L - 1 (got {tuple(sequences.shape)}, "
                            f"prefix_len {prefix_len})")
    kl = nll = nll_full = 0.0
    agree = count = 0
    bytes_prefix = bytes_full = 0.0
    for row, seq in enumerate(sequences):
        seq = seq.unsqueeze(0)
        if references is not None:
            ref = references[row]
        else:
            ref = reference_logprobs(model, seq, prefix_len)[0]
        prefill = prefills[row] if prefills is not None else capture_prefill(model, seq[:, :prefix_len])
        cache = replay_prefill(make(), prefill)
        bytes_prefix += cache_bytes(cache, float_bytes)
        bytes_full += sum(k.numel() * (float_bytes or k.element_size()) * 2 for _, _, k, _ in prefill.layers)
        steps = []
        with torch.no_grad():
            for t in range(prefix_len, seq.shape[1] - 1):
                out = model(seq[:, t:t + 1], **adapter.cache_kwargs(cache))
                steps.append(out.logits[0, -1].float().log_softmax(-1))
        got = torch.stack(steps)
        target = seq[0, prefix_len + 1:]
        kl += F.kl_div(got, ref, log_target=True, reduction="sum").double().item()
        nll -= got.gather(1, target[:, None]).double().sum().item()
        nll_full -= ref.gather(1, target[:, None]).double().sum().item()
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        count += target.numel()
    n = sequences.shape[0]
    return ContinuationResult(kl / count, math.exp(nll / count), math.exp(nll_full / count), agree / count, count,
                              bytes_prefix / n, bytes_full / n)


# --- passkey / needle in a haystack ----------------------------------------------------------------------------------

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    context_ids: torch.Tensor  # [1, n] haystack with the needle, BOS first when the tokenizer has one
    question_ids: torch.Tensor  # [1, q]
    key: str
    length: int
    depth: float


def load_haystack(path: str | Path) -> str:
    """Plain prose from a WikiText raw file: headings and blank lines dropped, " @-@ " artefacts undone."""
    text = Path(path).read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")]
    return re.sub(r" @(.)@ ", r"\1", " ".join(lines))


def passkey_cases(tokenizer: Any, haystack: str, lengths: list[int], depths: list[float], keys_per_cell: int = 1,
                  seed: int = 0) -> list[PasskeyCase]:
    """A depth × length grid: each case is ``length`` tokens of filler with the needle at ``depth`` (0 = start,
    1 = end), cut at a sentence boundary, then the question. Filler windows differ per case (seeded)."""
    rng = random.Random(seed)
    sentences = re.split(r"(?<=[.!?]) ", haystack)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(keys_per_cell):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
                intro = tokenizer(INTRO, add_special_tokens=False)["input_ids"]
                budget = length - len(bos) - len(needle) - len(intro)
                start = rng.randrange(0, max(len(sentences) - 2000, 1))
                filler: list[list[int]] = []
                total = 0
                for sentence in sentences[start:]:
                    ids = tokenizer(sentence + " ", add_special_tokens=False)["input_ids"]
                    if total + len(ids) > budget:
                        break
                    filler.append(ids)
                    total += len(ids)
                cut = round(depth * len(filler))
                before = [t for s in filler[:cut] for t in s]
                after = [t for s in filler[cut:] for t in s]
                context = bos + intro + before + needle + after
                cases.append(PasskeyCase(torch.tensor([context]), torch.tensor([question]), key, length, depth))
    return cases


def passkey_answer(model: torch.nn.Module, cache: Any, case: PasskeyCase, tokenizer: Any,
                   max_new_tokens: int = 8) -> str:
    """Feed the question token by token through the (already filled) cache, then decode greedily; returns the text.
    Token-by-token keeps caches with per-layer lengths (kvpress PyramidKV) valid under transformers' shared mask."""
    generated = []
    with torch.no_grad():
        logits = None
        for t in range(case.question_ids.shape[1]):
            logits = model(case.question_ids[:, t:t + 1], **adapter.cache_kwargs(cache)).logits[:, -1]
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            generated.append(int(nxt))
            if nxt.item() == tokenizer.eos_token_id:
                break
            logits = model(nxt, **adapter.cache_kwargs(cache)).logits[:, -1]
    return tokenizer.decode(generated)


def passkey_correct(answer: str, key: str) -> bool:
    """The first number in the answer equals the key."""
    found = re.search(r"\d+", answer)
    return bool(found) and found.group(0) == key
