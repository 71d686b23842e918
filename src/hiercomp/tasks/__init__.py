"""Task suite from small YAML specs (multiple choice by log-likelihood, greedy generation), LLM-KICK-style
knowledge probes with a "matches the original" verdict, and a bridge to lm-evaluation-harness.

See the README, "Tasks and knowledge probes".
"""

from hiercomp.tasks.data import DATA_DIR_ENV, Example, load_examples
from hiercomp.tasks.probes import (
    CONFIDENCE,
    MATCH_TOLERANCE,
    PROBE_TASKS,
    PROBES,
    compare_to_reference,
    difference_interval,
    disagreements,
    probe_verdicts,
    task_intervals,
    task_verdicts,
    verdict,
)
from hiercomp.tasks.runner import COUNT_KEYS, PreparedTask, prepare_tasks, run_tasks
from hiercomp.tasks.spec import TaskSpec, TaskSpecError, load_spec, resolve_spec, shipped_names

__all__ = [
    "CONFIDENCE",
    "COUNT_KEYS",
    "DATA_DIR_ENV",
    "MATCH_TOLERANCE",
    "PROBES",
    "PROBE_TASKS",
    "Example",
    "PreparedTask",
    "TaskSpec",
    "TaskSpecError",
    "compare_to_reference",
    "difference_interval",
    "disagreements",
    "load_examples",
    "load_spec",
    "prepare_tasks",
    "probe_verdicts",
    "resolve_spec",
    "run_tasks",
    "shipped_names",
    "task_intervals",
    "task_verdicts",
    "verdict",
]
