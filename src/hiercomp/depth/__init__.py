"""Depth pruning: remove attention / MLP sub-blocks or whole blocks, score removals, recover by distillation."""

from hiercomp.depth.apply import apply_removals
from hiercomp.depth.recovery import RecoveryConfig, RecoveryReport, recover
from hiercomp.depth.scoring import RULES, UNITS, RemovalScore, choose_removals, score_removals, units_of_kind
from hiercomp.depth.subblocks import (
    SubBlock,
    describe_removals,
    list_subblocks,
    remove_subblocks,
    removed_subblocks,
    temporarily_removed,
)

__all__ = [
    "RULES", "UNITS", "RecoveryConfig", "RecoveryReport", "RemovalScore", "SubBlock", "apply_removals",
    "choose_removals", "describe_removals", "list_subblocks", "recover", "remove_subblocks", "removed_subblocks",
    "score_removals", "temporarily_removed", "units_of_kind",
]
