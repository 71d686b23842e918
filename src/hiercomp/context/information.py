"""How much a compression says about its source: He et al.'s Monte-Carlo estimate of I(X; Z | Q).

For N contexts x_i (with their questions q_i) and M compressions z_ij of each, a predictor LM scores every
compression under every context, ``S[i,j,l] = log p(z_ij | prompt(x_l, q_i))``, and

    Î = mean_ij [ S[i,j,i] - (logsumexp_l S[i,j,l] - log N) ]      (nats; / ln 2 for bits)

The question is held at q_i while the context varies, so the marginal p(z | q) averages over contexts for the
same question: the estimate is conditional on Q. The true context is inside the average, so every term is at
most log N and **Î <= log2 N bits** (the cap; InfoNCE's bound): read an estimate close to the cap as "at
least this much", and raise N to see more. ``at_cap`` is the share of samples whose own context takes 90% or
more of the posterior over the N contexts.

Deterministic compressors (every compressor in this package) have M = 1: their density p(z | x) is a point
mass, so, as in the paper's proxy-scorer recipe, the predictor LM supplies the density of z given each context.
The prompt is identical across contexts except for the context itself (``Text: {x}\\n``, then
``Question: {q}\\nShortened text:``, then `` z`` and EOS). z is tokenized once and the same ids are scored under
every context. Cost: N prefills of the contexts, then N batched passes over the N·M (question, z) continuations
reusing each context's KV cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hiercomp.context.scorer import ScorerLM, as_scorer
from hiercomp.errors import HiercompError
from hiercomp.eval.perplexity import model_device
from hiercomp.tasks.multiple_choice import cache_argument, returned_cache

CONTEXT_PROMPT = "Text: {context}\n"
QUESTION_PROMPT = "Question: {question}\nShortened text:"
PLAIN_PROMPT = "Shortened text:"
POSTERIOR_AT_CAP = 0.9


@dataclass(frozen=True)
class MutualInformation:
    bits: float  # Î in bits
    stderr_bits: float  # standard error of the mean over the N·M samples
    bits_per_token: float  # Î / mean predictor tokens of z (EOS not counted); 0 when every z is empty
    mean_output_tokens: float
    n: int  # contexts
    samples: int  # M compressions per context
    cap_bits: float  # log2 N: no estimate can exceed it
    at_cap: float  # share of samples whose own context takes >= 90% of the posterior
    predictor: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"I(X;Z|Q) ≈ {self.bits:.3f} ± {self.stderr_bits:.3f} bits ({self.bits_per_token:.4f} bits per "
                f"output token, {self.mean_output_tokens:.1f} tokens) from N={self.n} contexts x M={self.samples}; "
                f"cap log2 N = {self.cap_bits:.2f} bits, {100 * self.at_cap:.0f}% of samples at the cap; "
                f"predictor {self.predictor}")


def log_likelihoods(predictor: ScorerLM, contexts: list[str], continuations: list[list[int]],
                    scored: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """``S[r, l] = Σ log p(scored[r] | prompt(contexts[l]), continuations[r])`` in float64, ``[R, L]``.

    Each context is prefilled once; its KV cache is repeated over a batch of rows, and each row feeds its
    continuation (not scored) then its scored ids, right-padded.
    """
    model, device = predictor.model, model_device(predictor.model)
    start = [] if predictor.start_id is None else [predictor.start_id]
    rows = [c + s for c, s in zip(continuations, scored)]
    cache_name = cache_argument(model)
    out = torch.zeros(len(rows), len(contexts), dtype=torch.float64)
    with torch.inference_mode():
        for l, context in enumerate(contexts):
            prefix = start + predictor.encode(CONTEXT_PROMPT.format(context=context))
            room = predictor.window - max(len(r) for r in rows)
            if len(prefix) > room:
                raise HiercompError(f"context {l} has {len(prefix)} predictor tokens; with its longest "
                                    f"continuation it does not fit the predictor's window of {predictor.window}")
            first = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            for b in range(0, len(rows), batch_size):
                batch = rows[b:b + batch_size]
                width = max(len(r) for r in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), len(prefix) + width, dtype=torch.long)
                mask[:, :len(prefix)] = 1
                for k, r in enumerate(batch):
                    ids[k, :len(r)] = torch.tensor(r)
                    mask[k, len(prefix):len(prefix) + len(r)] = 1
                cache = copy.deepcopy(returned_cache(first))
                if cache is None:
                    raise HiercompError("the predictor returns no KV cache; the MI estimate needs a causal LM "
                                        "with a cache (any Hugging Face decoder)")
                cache.batch_repeat_interleave(len(batch))
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                               **{cache_name: cache}).logits.float()
                # Logits predicting row position t come from position t-1 (position 0 from the prefix's last).
                prev = first.logits[0, -1].float().expand(len(batch), 1, -1)
                logp = torch.log_softmax(torch.cat([prev, logits[:, :-1]], dim=1), dim=-1)
                for k, r in enumerate(batch):
                    c = len(continuations[b + k])
                    targets = torch.tensor(r[c:], device=logp.device)
                    out[b + k, l] = logp[k, c:len(r)].gather(1, targets[:, None]).double().sum().cpu()
    return out


def mutual_information(contexts: list[str], outputs: list[list[str]], predictor: Any,
                       questions: list[str] | None = None, batch_size: int = 16) -> MutualInformation:
    """Î(X; Z | Q) from ``outputs[i]`` = the M compressions of ``contexts[i]`` (with ``questions[i]``)."""
    n = len(contexts)
    if n < 2:
        raise HiercompError(f"the mutual-information estimate needs at least 2 contexts (got {n}); its cap is "
                            "log2 N bits")
    if len(outputs) != n or (questions is not None and len(questions) != n):
        raise HiercompError("give one list of compressions (and one question) per context")
    m = len(outputs[0])
    if m < 1 or any(len(o) != m for o in outputs):
        raise HiercompError("every context needs the same number (>= 1) of compressions")
    predictor = as_scorer(predictor)
    eos = getattr(predictor.tokenizer, "eos_token_id", None)
    continuations, scored = [], []
    for i in range(n):
        query = QUESTION_PROMPT.format(question=questions[i].strip()) if questions else PLAIN_PROMPT
        query_ids = predictor.encode(query)
        for z in outputs[i]:
            z_ids = predictor.encode(" " + z.strip()) if z.strip() else []
            continuations.append(query_ids)
            scored.append(z_ids + ([] if eos is None else [int(eos)]))
    if any(not s for s in scored):
        raise HiercompError("an empty compression cannot be scored by a predictor without an EOS token")
    table = log_likelihoods(predictor, contexts, continuations, scored, batch_size)  # [N*M, N]
    own = torch.tensor([i for i in range(n) for _ in range(m)])
    own_ll = table[torch.arange(n * m), own]
    marginal = torch.logsumexp(table, dim=1) - math.log(n)
    pmi = own_ll - marginal
    posterior_own = torch.exp(own_ll - torch.logsumexp(table, dim=1))
    lengths = [len(s) - (eos is not None) for s in scored]
    mean_len = sum(lengths) / len(lengths)
    bits = float(pmi.mean()) / math.log(2)
    stderr = float(pmi.std(unbiased=True)) / math.sqrt(len(pmi)) / math.log(2) if len(pmi) > 1 else 0.0
    return MutualInformation(bits, stderr, bits / mean_len if mean_len else 0.0, mean_len, n, m, math.log2(n),
                             float((posterior_own >= POSTERIOR_AT_CAP).double().mean()), predictor.name)


def score_compressor(compressor: Any, contexts: list[str], predictor: Any, questions: list[str] | None = None,
                     budget: Any = "0.25x", batch_size: int = 16) -> MutualInformation:
    """Compress each context with ``compressor(text, question=..., budget=...)`` and estimate Î(X; Z | Q)."""
    qs = questions if questions is not None else [None] * len(contexts)
    outputs = [[compressor(x, question=q, budget=budget).text] for x, q in zip(contexts, qs)]
    return mutual_information(contexts, outputs, predictor, questions, batch_size)
