"""How far a compressed causal LM's next-token distributions are from the original's, on the same windows.

For every predicted position (logits at positions 0 .. L-2 of each window, the ones perplexity scores):

* KL(P_ref ‖ Q) = Σ_v P_ref(v) (log P_ref(v) − log Q(v)), in nats, from float32 log-softmax; the mean over all
  positions is reported (summed in float64).
* top-1 agreement: the fraction of positions where argmax P_ref == argmax Q.

Both models run batch by batch; no logits are kept beyond one batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hiercomp.errors import HiercompError
from hiercomp.eval.perplexity import batch_logits, token_windows


@dataclass(frozen=True)
class DistributionResult:
    kl: float  # mean KL(P_ref ‖ Q) per predicted position, nats
    top1_agreement: float  # fraction of positions whose argmax tokens agree
    n_positions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows_from_text(tokenizer: Any, text: str, seq_len: int, bos_id: int | None,
                      max_windows: int | None = None) -> torch.Tensor:
    """Windows for :func:`compare_distributions` with an explicit BOS id (None: no BOS); see token_windows.

    :func:`hiercomp.eval.text_windows` does the same with BOS decided from the tokenizer, as perplexity does.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = token_windows(ids, seq_len, bos_id)
    if windows.shape[0] == 0:
        raise HiercompError(f"the evaluation text has {len(ids)} tokens, less than one window of {seq_len}; "
                            "pass a longer text or a smaller --seq-len")
    return windows if max_windows is None else windows[:max_windows]


def compare_distributions(
    reference_model: torch.nn.Module,
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "KL / top-1",
) -> DistributionResult:
    """Mean KL(P_ref ‖ Q) and top-1 agreement over the predicted positions of ``windows`` ([n, L] token ids);
    ``desc`` labels the progress bar."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise HiercompError(f"windows must be a non-empty [n, L>=2] tensor of token ids (got {tuple(windows.shape)})")
    kl_sum = 0.0
    agree = 0
    count = 0
    modes = (reference_model.training, model.training)
    reference_model.eval()
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress,
                              unit="batch"):
                batch = windows[start:start + batch_size]
                log_p = F.log_softmax(batch_logits(reference_model, batch)[:, :-1].float(), dim=-1)
                q_logits = batch_logits(model, batch)[:, :-1].float().to(log_p.device)
                if q_logits.shape != log_p.shape:
                    raise HiercompError(f"the models disagree on the vocabulary: logits {tuple(log_p.shape)} "
                                        f"(reference) vs {tuple(q_logits.shape)}; compare models of one family")
                log_q = F.log_softmax(q_logits, dim=-1)
                # 0 · log 0 = 0 where the reference gives a token no mass at all (logit -inf).
                terms = log_p.exp() * (log_p - log_q)
                kl = torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(dim=-1)
                kl_sum += kl.double().sum().item()
                agree += int((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum().item())
                count += kl.numel()
    finally:
        reference_model.train(modes[0])
        model.train(modes[1])
    return DistributionResult(kl=kl_sum / count, top1_agreement=agree / count, n_positions=count)
