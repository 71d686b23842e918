"""Encoder quality: sentence-embedding cosine to the original, and retrieval recall@1.

Sentence embedding = mean of the last hidden states over the non-padding tokens (attention mask), L2-normalised
(the sentence-transformers recipe of all-MiniLM-L6-v2). Texts are truncated to ``max_length`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from hiercomp.eval.perplexity import model_device


def embed(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = True,
    desc: str = "embed",
) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings, ``[len(texts), hidden]`` float32 on the CPU, in input order.
    ``desc`` labels the progress bar (say which model and which texts).

    Texts are batched by length (less padding); padding does not change an embedding since padded positions
    are masked in attention and excluded from the mean.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("embed needs at least one text")
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[torch.Tensor | None] = [None] * len(texts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                ids = enc["input_ids"].to(device)
                mask = enc["attention_mask"].to(device)
                result = model(input_ids=ids, attention_mask=mask)
                hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
                m = mask.unsqueeze(-1).to(torch.float32)
                pooled = (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu()
                for row, i in enumerate(idx):
                    out[i] = pooled[row]
    finally:
        model.train(was_training)
    return torch.stack(out)  # type: ignore[arg-type]


def embedding_cosine(
    reference_model: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = True,
) -> float:
    """Mean over ``texts`` of cos(reference embedding, model embedding) of the same text (1.0 = unchanged)."""
    ref = embed(reference_model, tokenizer, texts, batch_size, max_length, progress, desc="original: embed")
    emb = embed(model, tokenizer, texts, batch_size, max_length, progress, desc="model: embed")
    return mean_cosine(ref, emb)


def mean_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine between rows of two L2-normalised embedding matrices of the same texts."""
    return float((reference.double() * embeddings.double()).sum(dim=-1).mean().item())


def retrieval_recall_at_1(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: list[str],
    contexts: list[str],
    gold: list[int],
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = True,
) -> float:
    """Fraction of questions whose most cosine-similar context is their own (``contexts[gold[i]]``).

    Duplicate contexts are merged first (a question whose passage appears twice is not penalised for picking
    the copy). Ties go to the lower index.
    """
    if len(questions) != len(gold):
        raise ValueError(f"{len(questions)} questions but {len(gold)} gold indices")
    if not questions or not contexts:
        raise ValueError("retrieval needs at least one question and one context")
    if min(gold) < 0 or max(gold) >= len(contexts):
        raise ValueError("a gold index is outside the list of contexts")
    unique: dict[str, int] = {}
    remap = [unique.setdefault(c, len(unique)) for c in contexts]
    q = embed(model, tokenizer, questions, batch_size, max_length, progress, desc="embed questions")
    c = embed(model, tokenizer, list(unique), batch_size, max_length, progress, desc="embed passages")
    return recall_at_1(q, c, [remap[g] for g in gold])


def recall_at_1(questions: torch.Tensor, contexts: torch.Tensor, gold: list[int]) -> float:
    """Fraction of question embeddings whose most similar context embedding is ``contexts[gold[i]]`` (contexts
    distinct; ties go to the lower index)."""
    top = (questions @ contexts.T).argmax(dim=-1)
    return float((top == torch.tensor(gold)).double().mean().item())
