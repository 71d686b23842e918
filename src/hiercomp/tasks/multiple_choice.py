"""Multiple choice by log-likelihood, scored the way lm-evaluation-harness scores it.

For each question with context c and choices x_1..x_k (continuation = target delimiter + choice text):

* tokens: as lm-eval's ``_encode_pair`` for causal models: trailing spaces of the context move to the
  continuation; ``whole = tok(c + cont)``, ``ctx = tok(c)`` (the tokenizer's own special tokens, e.g. BOS), and
  the continuation tokens are ``whole[len(ctx):]``;
* ``ll_i`` = Σ log P(continuation token | everything before it), float32 log-softmax, summed in float64;
* ``acc`` = [argmax_i ll_i == gold]; ``acc_norm`` = [argmax_i ll_i / len(x_i) == gold] where len is the number
  of *characters* of the choice text without the delimiter (lm-eval's ``completion_len``); ties go to the
  lower index (numpy argmax).

The shared prefix is computed once per question: one forward pass over the context fills a KV cache, the cache
is repeated k times and all k continuations run as one batch after it. Models that return no cache fall back to
one batch of the k full sequences (same numbers, up to float rounding).

A context + continuation longer than the model's window is cut from the left (lm-eval does the same); such
questions are counted in the result's ``truncated``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hiercomp.errors import HiercompError
from hiercomp.eval.perplexity import model_device


@dataclass(frozen=True)
class ChoiceScores:
    loglikelihoods: tuple[float, ...]
    greedy: tuple[bool, ...]  # whether every continuation token is the argmax (lm-eval's is_greedy)
    truncated: bool


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes a KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (None if the model keeps none)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: (context ids, continuation ids)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer(context + continuation)["input_ids"])
    ctx = list(tokenizer(context)["input_ids"])
    return ctx, whole[len(ctx):]


def predictions(loglikelihoods: list[float] | tuple[float, ...], choices: tuple[str, ...]) -> tuple[int, int]:
    """(argmax of ll, argmax of ll / character length of each choice): lm-eval's pred and pred_norm."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def _continuation_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = F.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked, log_probs.argmax(dim=-1) == targets


def score_choices(model: torch.nn.Module, context_ids: list[int], continuations: list[list[int]],
                  max_length: int | None) -> ChoiceScores:
    """Log-likelihood of each continuation after the context (one cached prefix, one batch of continuations)."""
    longest = max(len(c) for c in continuations)
    truncated = False
    if max_length is not None and len(context_ids) + longest > max_length:
        keep = max(1, max_length - longest)
        context_ids = context_ids[-keep:]
        continuations = [c[-(max_length - keep):] for c in continuations]
        longest = max(len(c) for c in continuations)
        truncated = True
    device = model_device(model)
    ctx = torch.tensor([context_ids], device=device)
    out = model(input_ids=ctx, use_cache=True)
    cache = returned_cache(out)
    k = len(continuations)
    padded = torch.zeros(k, longest, dtype=torch.long, device=device)
    for i, cont in enumerate(continuations):
        padded[i, :len(cont)] = torch.tensor(cont, device=device)
    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(k)
        first = out.logits[:, -1:].expand(k, 1, -1)
        if longest > 1:
            # Right padding: a padded position comes after every real token of its row, so causal attention keeps
            # it out of the real tokens' logits.
            rest = model(input_ids=padded[:, :-1], use_cache=True, **{cache_argument(model): cache}).logits
            logits = torch.cat([first, rest], dim=1)
        else:
            logits = first
    else:
        full = torch.cat([ctx.expand(k, -1), padded], dim=1)
        logits = model(input_ids=full[:, :-1]).logits[:, len(context_ids) - 1:]
    picked, is_greedy = _continuation_logprobs(logits, padded)
    lls, greedy = [], []
    for i, cont in enumerate(continuations):
        n = len(cont)
        lls.append(float(picked[i, :n].double().sum().item()))
        greedy.append(bool(is_greedy[i, :n].all().item()))
    return ChoiceScores(tuple(lls), tuple(greedy), truncated)


def score_question(model: torch.nn.Module, tokenizer: Any, context: str, choices: tuple[str, ...], delimiter: str,
                   max_length: int | None) -> ChoiceScores:
    encoded = [encode_pair(tokenizer, context, delimiter + choice) for choice in choices]
    context_ids = encoded[0][0]  # the same for every choice: the context string is encoded alone
    if any(not cont for _, cont in encoded):
        raise HiercompError(f"a choice of {context[-40:]!r} encodes to no tokens; give choices non-empty text")
    return score_choices(model, context_ids, [cont for _, cont in encoded], max_length)
