"""The context level: compress the *input* to a budget in the target model's tokens, and score compressors.

* :class:`TokenPruner`: drops low-information words (LLMLingua family), question-aware, exact budget;
* :class:`SentenceSelector`: keeps the sentences that matter (RECOMP extractive, selective: may keep nothing);
* :class:`DocumentFilter`: keeps whole passages of a multi-document prompt; :class:`Cascade` runs a coarse
  compressor then a finer one (documents -> sentences -> words);
* :class:`Truncation` and :class:`RandomWords`: the baselines, fitted to the same exact budget;
* :func:`mutual_information`: He et al.'s Monte-Carlo estimate of I(X; Z | Q) for any compressor.
"""

from hiercomp.context.baselines import RandomWords, Truncation
from hiercomp.context.cascade import Cascade
from hiercomp.context.extractive import DocumentFilter, SentenceSelector
from hiercomp.context.information import MutualInformation, mutual_information, score_compressor
from hiercomp.context.result import CompressionResult, TokenBudget, parse_token_budget
from hiercomp.context.scorer import ScorerLM, as_scorer
from hiercomp.context.tokens import TokenPruner

__all__ = ["Cascade", "CompressionResult", "DocumentFilter", "MutualInformation", "RandomWords", "ScorerLM",
           "SentenceSelector", "TokenBudget", "TokenPruner", "Truncation", "as_scorer", "mutual_information",
           "parse_token_budget", "score_compressor"]
