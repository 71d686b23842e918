"""A causal LM that scores text: per-token surprisal (self-information) given a condition.

Any Hugging Face causal LM works: a folder or hub id, a hiercomp compressed folder (through
:func:`hiercomp.api.load_any`), or an already loaded ``(model, tokenizer)``. Scores are in nats, computed in
float32 from ``log_softmax`` of the logits; the model runs in inference mode and never samples, so scores are
deterministic for a given input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hiercomp.errors import HiercompError
from hiercomp.eval.perplexity import model_context, model_device


@dataclass
class ScorerLM:
    model: torch.nn.Module
    tokenizer: Any
    name: str = "<in memory>"

    @property
    def start_id(self) -> int | None:
        """The token every scored sequence starts with (BOS, else EOS as GPT-2 uses it), so the first text token
        has a prediction too; None if the tokenizer has neither."""
        for attr in ("bos_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return None

    @property
    def window(self) -> int:
        return model_context(self.model) or 2048

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def surprisal(self, condition: list[int], ids: list[int]) -> torch.Tensor:
        """``-log p(ids[t] | start, condition, ids[:t])`` for every t, nats, float32 ``[len(ids)]``.

        The condition is cut from the left to fit the model's window. Without a start token and without a
        condition the first token has no prediction; it gets the largest surprisal of the others (kept first).
        """
        if not ids:
            return torch.zeros(0)
        start = [] if self.start_id is None else [self.start_id]
        half = max(1, (self.window - len(start)) // 2)
        if len(ids) > half:  # longer than half the window: score in halves, each after what precedes it
            head = self.surprisal(condition, ids[:half])
            return torch.cat([head, self.surprisal(condition + ids[:half], ids[half:])])
        room = self.window - len(ids) - len(start)
        condition = condition[len(condition) - room:] if len(condition) > room else condition
        full = start + condition + ids
        device = model_device(self.model)
        first = len(full) - len(ids)  # position of ids[0]
        # Only the logits that predict ``ids`` are needed: on a large vocabulary the output layer over the
        # condition's positions would cost as much as the model body.
        keep = len(ids) + (1 if first > 0 else 0)
        with torch.inference_mode():
            out = self._forward(torch.tensor([full], device=device), keep)
        logits = (out.logits if hasattr(out, "logits") else out[0])[0].float()
        if logits.shape[0] != len(full):  # pad the positions the model skipped so indices stay absolute
            logits = torch.cat([logits.new_zeros(len(full) - logits.shape[0], logits.shape[1]), logits])
        if first == 0:
            logp = torch.log_softmax(logits[:-1], dim=-1)
            rest = -logp.gather(1, torch.tensor(full[1:], device=logp.device)[:, None])[:, 0].cpu()
            head = rest.max() if rest.numel() else torch.zeros(())
            return torch.cat([head.reshape(1), rest])
        logp = torch.log_softmax(logits[first - 1:-1], dim=-1)
        target = torch.tensor(ids, device=logp.device)[:, None]
        return -logp.gather(1, target)[:, 0].cpu()

    def _forward(self, ids: torch.Tensor, keep: int) -> Any:
        try:
            return self.model(input_ids=ids, logits_to_keep=keep)
        except TypeError:  # a model without logits_to_keep computes them all
            return self.model(input_ids=ids)

    def mean_logprob(self, condition_text: str, text: str) -> float:
        """Mean log p(token) of ``text``'s tokens after ``condition_text`` (LongLLMLingua's question ranking)."""
        ids = self.encode(text)
        if not ids:
            return 0.0
        return -float(self.surprisal(self.encode(condition_text), ids).mean())


def as_scorer(model: Any, tokenizer: Any = None) -> ScorerLM:
    """A ScorerLM from a path, a loaded hiercomp/HF model object (with ``.model``/``.tokenizer``), or a module."""
    if isinstance(model, ScorerLM):
        return model
    if isinstance(model, (str, Path)):
        from hiercomp.api import load_any

        loaded = load_any(model)
        if loaded.is_encoder:
            raise HiercompError(f"{model} is an encoder; token scoring needs a causal LM (e.g. SmolLM2 or "
                                "stories260K)")
        scorer = as_scorer(loaded.model, loaded.tokenizer)
        scorer.name = str(model)
        return scorer
    if hasattr(model, "model") and isinstance(model.model, torch.nn.Module) and tokenizer is None \
            and hasattr(model, "tokenizer"):
        return as_scorer(model.model, model.tokenizer)
    if not isinstance(model, torch.nn.Module):
        raise HiercompError(f"cannot score with a {type(model).__name__}; pass a model folder or a causal LM")
    if tokenizer is None:
        raise HiercompError("the scorer model needs its tokenizer; save the tokenizer files next to the model")
    if not getattr(tokenizer, "is_fast", False):
        raise HiercompError("the scorer's tokenizer is a slow (Python) tokenizer; context compression needs a "
                            "fast tokenizer (tokenizer.json) for character offsets")
    model.eval()
    return ScorerLM(model, tokenizer, getattr(getattr(model, "config", None), "_name_or_path", "") or "<in memory>")


def load_tokenizer(ref: Any) -> Any:
    """A tokenizer object as is, or the tokenizer of a model folder (a hiercomp folder or a plain HF one)."""
    if ref is None or not isinstance(ref, (str, Path)):
        return ref
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ref))
    except Exception as err:
        raise HiercompError(f"cannot load a tokenizer from {ref} ({str(err).splitlines()[0]}); pass a model "
                            "folder with tokenizer files") from None
