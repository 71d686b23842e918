"""Evaluation: perplexity, KL / top-1 agreement against a reference, encoder cosine and retrieval recall@1.

The protocols are stated in the README ("How quality is measured").
"""

from hiercomp.eval.distribution import DistributionResult, compare_distributions, windows_from_text
from hiercomp.eval.encoder import embed, embedding_cosine, mean_cosine, recall_at_1, retrieval_recall_at_1
from hiercomp.eval.perplexity import (
    PerplexityResult,
    default_bos_id,
    load_eval_text,
    normalise_documents,
    perplexity,
    text_windows,
    token_windows,
)
from hiercomp.eval.squad import load_squad_pairs, squad_retrieval_sets

__all__ = [
    "DistributionResult",
    "PerplexityResult",
    "compare_distributions",
    "default_bos_id",
    "embed",
    "embedding_cosine",
    "load_eval_text",
    "load_squad_pairs",
    "mean_cosine",
    "normalise_documents",
    "perplexity",
    "recall_at_1",
    "retrieval_recall_at_1",
    "squad_retrieval_sets",
    "text_windows",
    "token_windows",
    "windows_from_text",
]
