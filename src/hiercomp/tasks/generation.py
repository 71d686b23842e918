"""Generation tasks: greedy decoding, stop sequences, and answer metrics with a stated normalisation.

Decoding: greedy (argmax), at most ``max_new_tokens`` new tokens, stopping early at the end-of-sequence token or
once a stop sequence appears. The completion is the decoded new tokens with leading whitespace removed, cut at
the first stop sequence (so with ``stop: [" "]`` it is the first word). A prompt longer than the model's window
minus ``max_new_tokens`` is cut from the left and counted in ``truncated``.

Metrics, each the maximum over the accepted answers (SQuAD's rule):

* ``exact_match``: normalised prediction == normalised answer;
* ``f1``: token F1 between the normalised prediction and answer (bag of whitespace tokens);
* ``contains``: the normalised answer is a substring of the normalised prediction (LLM-KICK's lenient rule).

Normalisation ``squad`` (the official SQuAD v1.1 script): lower-case, drop ASCII punctuation, drop the
articles a/an/the, collapse whitespace. ``lower``: lower-case and collapse whitespace. ``none``: strip only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import torch

from hiercomp.eval.perplexity import model_device
from hiercomp.tasks.multiple_choice import cache_argument, returned_cache

PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str, how: str = "squad") -> str:
    if how == "none":
        return text.strip()
    text = text.lower()
    if how == "squad":
        text = "".join(ch for ch in text if ch not in PUNCTUATION)
        text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str], how: str = "squad") -> float:
    pred = normalise_answer(prediction, how)
    return float(any(pred == normalise_answer(a, how) for a in answers))


def token_f1(prediction: str, answer: str, how: str = "squad") -> float:
    pred = normalise_answer(prediction, how).split()
    gold = normalise_answer(answer, how).split()
    if not pred or not gold:
        return float(pred == gold)  # both empty: 1; one empty: 0 (the SQuAD script's rule)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: tuple[str, ...] | list[str], how: str = "squad") -> float:
    return max(token_f1(prediction, a, how) for a in answers)


def contains(prediction: str, answers: tuple[str, ...] | list[str], how: str = "squad") -> float:
    pred = normalise_answer(prediction, how)
    golds = [normalise_answer(a, how) for a in answers]
    return float(any(g and g in pred for g in golds))


METRICS = {"exact_match": exact_match, "f1": f1, "contains": contains}


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """(text up to the first stop sequence, whether one was found); leading whitespace is dropped first."""
    text = text.lstrip()
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def split_tokens(tokenizer: Any, prompt: str, split_at: int | None) -> tuple[list[int], int]:
    """The prompt's token ids (tokenized whole, as without a split) and how many of them lie before character
    ``split_at`` (0 when there is no split). Fast tokenizers place the cut by their offsets; slow ones by the
    length of the tokenized prefix."""
    if split_at is None:
        return list(tokenizer(prompt)["input_ids"]), 0
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        # special tokens (BOS) have empty spans at 0 and belong to the prefix
        before = sum(1 for start, end in offsets if start < split_at or (start == end == 0))
        return ids, before
    ids = list(tokenizer(prompt)["input_ids"])
    return ids, min(len(ids), len(tokenizer(prompt[:split_at])["input_ids"]))


def greedy_generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int,
                    stop: tuple[str, ...] | list[str], max_length: int | None,
                    split_at: int | None = None) -> tuple[str, bool]:
    """(completion cut at the stop sequences, whether the prompt was truncated). KV-cached, one token a step.

    ``split_at`` (a character offset): the prompt is read in two forwards, the text before it first and the rest
    through the cache that forward left — a compressing cache then compresses the first part (an open-book
    passage) before it reads the second (the question), as kvpress evaluates. The tokens are the same either way.
    """
    ids, before = split_tokens(tokenizer, prompt, split_at)
    truncated = False
    if max_length is not None and len(ids) + max_new_tokens > max_length:
        cut = len(ids) - max(1, max_length - max_new_tokens)
        ids, before = ids[cut:], max(0, before - cut)
        truncated = True
    device = model_device(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    new: list[int] = []
    cache = None
    cache_name = cache_argument(model)
    step_input = torch.tensor([ids], device=device)
    if 0 < before < len(ids):
        out = model(input_ids=torch.tensor([ids[:before]], device=device), use_cache=True, **{cache_name: None})
        cache = returned_cache(out)
        if cache is not None:
            step_input = torch.tensor([ids[before:]], device=device)
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, use_cache=True, **{cache_name: cache})
        cache = returned_cache(out)
        token = int(out.logits[0, -1].argmax().item())
        if eos is not None and token == eos:
            break
        new.append(token)
        if cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)[1]:
            break
        if cache is None:  # a model without a cache: feed the whole sequence again
            step_input = torch.tensor([ids + new], device=device)
        else:
            step_input = torch.tensor([[token]], device=device)
    completion, _ = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    return completion, truncated
