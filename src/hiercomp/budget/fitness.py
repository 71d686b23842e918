"""Fitness: how far a model assembled from candidate layers is from the original, on one batch of tokens.

Causal LMs: mean KL(P_original ‖ Q_assembled) per predicted position (float32 log-softmax, teacher as target,
as EvoPress does). Encoders: mean over tokens of 1 − cos(original hidden state, assembled hidden state) at the
last layer. Lower is better; 0 for the original itself.

:meth:`Fitness.__call__` is a pure function of ``(assignment, removed, batch)``: the original model and the
candidate database never change, the working copy it swaps layers into is rebuilt to exactly the requested
assignment before each forward pass, and the reference outputs it keeps are a cache of the original model's
outputs on the same batch. Nothing depends on which calls came before, so candidates of one selection stage
can be scored by several workers, each holding its own :class:`Fitness` (the database is read-only on disk),
and the results gathered in order — the search would be unchanged.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hiercomp.budget.levels import Candidate
from hiercomp.depth import remove_subblocks
from hiercomp.hierarchy import set_module

REFERENCE_CACHE = 4  # batches whose original outputs are kept (a selection stage reuses one batch)


@dataclass(frozen=True)
class TokenBatch:
    indices: tuple[int, ...]  # which calibration sequences
    ids: torch.Tensor  # [n, L] token ids

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


class Fitness:
    def __init__(self, original: nn.Module, candidates: list[dict[str, Candidate]], *, encoder: bool,
                 batch_size: int = 8) -> None:
        self.original = original.eval()
        self.candidates = candidates
        self.encoder = encoder
        self.batch_size = batch_size
        self._reference: OrderedDict[tuple[int, ...], list[torch.Tensor]] = OrderedDict()
        self._work: nn.Module | None = None
        self._work_removed: frozenset[str] | None = None
        self._work_state: dict[str, int | None] = {}
        self.layer_names = list(candidates[0]) if candidates else []
        self._original_modules = {name: original.get_submodule(name) for name in self.layer_names}
        self._dense: dict[tuple[int, str], nn.Module] = {}

    def _module(self, level: int, name: str) -> nn.Module:
        """The candidate as a plain dense layer holding its exact dequantized weight: the same outputs as the
        packed module, without unpacking codes on every forward pass (made once, on first use)."""
        key = (level, name)
        if key not in self._dense:
            self._dense[key] = self.candidates[level][name].layer.to_linear().eval()
        return self._dense[key]

    # -- assembling -------------------------------------------------------------------------------
    def assemble(self, assignment: Mapping[str, int], removed: frozenset[str] = frozenset()) -> nn.Module:
        """The working copy with ``assignment`` (layer -> level index; absent = original) and ``removed`` sub-blocks.

        Only layers whose level changed since the last call are swapped (the EvoPress repo tracks the same).
        """
        if self._work is None or self._work_removed != removed:
            self._work = copy.deepcopy(self.original)
            if removed:
                remove_subblocks(self._work, sorted(removed))
            self._work_removed = removed
            self._work_state = dict.fromkeys(self.layer_names)
        gone = tuple(f"{name}." for name in removed)
        for name in self.layer_names:
            if (name + ".").startswith(gone):
                continue
            want = assignment.get(name)
            if self._work_state[name] != want:
                module = self._original_modules[name] if want is None else self._module(want, name)
                set_module(self._work, name, module)
                self._work_state[name] = want
        return self._work

    # -- scoring ----------------------------------------------------------------------------------
    def _outputs(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        if self.encoder:
            out = model(input_ids=ids, attention_mask=mask)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return hidden.float()
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        return F.log_softmax(out.logits[:, :-1].float(), dim=-1)

    def reference(self, batch: TokenBatch) -> list[torch.Tensor]:
        if batch.indices not in self._reference:
            with torch.inference_mode():
                chunks = [self._outputs(self.original, batch.ids[s:s + self.batch_size])
                          for s in range(0, batch.ids.shape[0], self.batch_size)]
            self._reference[batch.indices] = chunks
            while len(self._reference) > REFERENCE_CACHE:
                self._reference.popitem(last=False)
        self._reference.move_to_end(batch.indices)
        return self._reference[batch.indices]

    def __call__(self, assignment: Mapping[str, int], removed: frozenset[str], batch: TokenBatch) -> float:
        reference = self.reference(batch)
        model = self.assemble(assignment, removed)
        total, count = 0.0, 0
        with torch.inference_mode():
            for k, start in enumerate(range(0, batch.ids.shape[0], self.batch_size)):
                out = self._outputs(model, batch.ids[start:start + self.batch_size])
                ref = reference[k]
                if self.encoder:
                    per_token = 1.0 - F.cosine_similarity(ref, out, dim=-1)
                else:
                    terms = ref.exp() * (ref - out)
                    per_token = torch.where(torch.isneginf(ref), torch.zeros_like(terms), terms).sum(dim=-1)
                total += per_token.double().sum().item()
                count += per_token.numel()
        return total / max(count, 1)
