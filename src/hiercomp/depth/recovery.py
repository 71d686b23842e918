"""Short recovery distillation after removing units (HierarchicalPrune's PWP, on CPU, with a step budget).

Student = the model with units removed; teacher = the original, frozen. Only the blocks from the first
removed unit's block onwards are trained (their remaining weights: a block whose attention was removed
still trains its MLP); everything before it — embeddings and the earlier blocks — is frozen, because it
still computes exactly what the teacher computes ("progressive weight preservation"). What runs after the
blocks (final norm, output head) is trained too, as HierarchicalPrune does, except weights shared with the
input embeddings (a tied head), which belong to the frozen prefix.

Loss: KL(P_teacher ‖ P_student) of next-token distributions (causal LMs), or the MSE of the last hidden
states (encoders). Adam, constant learning rate, fixed seed; batches are drawn from the calibration windows
in a seeded order, so a run is deterministic on CPU. The loop is :func:`hiercomp.tune.distill`, shared with
the recovery tuning that runs after quantizing.

Recovery changes the dense weights of the later blocks, so it runs BEFORE quantizing or pruning them
(``hiercomp.compress`` orders it so): the compressed layers then encode the recovered weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hiercomp.depth.scoring import model_outputs
from hiercomp.depth.subblocks import removed_subblocks
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import walk


@dataclass(frozen=True)
class RecoveryConfig:
    steps: int = 50
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0


@dataclass(frozen=True)
class RecoveryReport:
    steps: int
    first_trained_block: int
    trained_params: int
    loss_first: float  # loss of the first step (before any update)
    loss_last: float  # loss of the last step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _after_blocks(model: nn.Module, hierarchy: Any, probe: torch.Tensor, encoder: bool) -> list[nn.Parameter]:
    """Parameters of the modules that run after the last block (final norm, head), found by call order."""
    calls: list[str] = []
    inside = hierarchy.blocks_name + "."
    leaves = [(n, m) for n, m in model.named_modules()
              if n and not n.startswith(inside) and next(m.children(), None) is None]
    handles = [m.register_forward_hook(lambda *_, n=n: calls.append(n)) for n, m in leaves]
    handles.append(hierarchy.blocks[-1].module.register_forward_hook(lambda *_: calls.append(inside)))
    try:
        with torch.no_grad():
            model_outputs(model, probe, encoder)
    finally:
        for h in handles:
            h.remove()
    after = calls[calls.index(inside) + 1:] if inside in calls else []
    embeddings = model.get_input_embeddings()
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    params = {id(p): p for n in dict.fromkeys(after) for p in model.get_submodule(n).parameters(recurse=False)}
    return [p for pid, p in params.items() if pid not in tied]


def recover(
    student: nn.Module,
    teacher: nn.Module,
    calibration: torch.Tensor,
    config: RecoveryConfig = RecoveryConfig(),
    *,
    encoder: bool = False,
    progress: bool = True,
) -> RecoveryReport:
    """Train the student's blocks after its first removed unit to match the teacher, in place."""
    if config.steps < 1:
        raise HiercompError(f"recovery needs at least 1 step, got {config.steps}")
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise HiercompError("recovery needs calibration token windows; pass --calib TEXT")
    hierarchy = walk(student)
    removed = set(removed_subblocks(student, hierarchy))
    first = next((b.index for b in hierarchy.blocks
                  if any(name == b.name or name.startswith(b.name + ".") for name in removed)), None)
    if first is None:
        raise HiercompError("nothing was removed from this model, so there is nothing to recover")
    trainable = [p for b in hierarchy.blocks[first:] for p in b.module.parameters()]
    trainable += _after_blocks(student, hierarchy, calibration[:1], encoder)
    if not trainable:
        raise HiercompError("nothing runs after the removed units that recovery could train; drop --recover-steps")
    from hiercomp.tune import distill  # (hiercomp.tune reads depth.scoring: imported here, not at the top)

    was_trainable = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        losses = distill(student, teacher, calibration, [{"params": trainable, "lr": config.lr}], steps=config.steps,
                         batch_size=config.batch_size, seed=config.seed, encoder=encoder, progress=progress,
                         desc="recovery distillation").losses
    finally:
        for p in student.parameters():
            p.requires_grad_(was_trainable[id(p)])
    return RecoveryReport(config.steps, first, sum(p.numel() for p in trainable), losses[0], losses[-1])
