"""Knowledge probes in the LLM-KICK style, the "matches the original" verdict, and when perplexity disagrees.

LLM-KICK (Jaiswal et al., ICLR 2024) calls a compressed model *matching* when its score is within 5% (relative)
of its own dense parent's, with the same prompts and greedy decoding. Its finding: perplexity stays close while
knowledge-intensive tasks collapse, so a perplexity verdict alone hides damage.

The probes are named groups of task metrics, all over the same questions where that matters:

* ``closed_book``: SQuAD questions *without* their passage (``squad_closed_book``) and NQ-open, F1 — what the
  weights know;
* ``open_book``: the same SQuAD questions *with* the passage (``squad``), F1 — reading comprehension;
* ``in_context_retrieval``: on the open-book prompts, whether the output contains the gold answer span, which
  is copied from the passage (``squad`` ``contains``) — finding and copying a span in the context.

A probe's verdict is the worst verdict among its metrics (worse < matches < better).
"""

from __future__ import annotations

from typing import Any

from hiercomp.tasks.runner import COUNT_KEYS, PROBE_TASKS

MATCH_TOLERANCE = 0.05  # LLM-KICK's epsilon: within 5% of the dense model's score
PROBES: dict[str, tuple[tuple[str, str], ...]] = {
    "closed_book": (("squad_closed_book", "f1"), ("nq_open", "f1")),
    "open_book": (("squad", "f1"),),
    "in_context_retrieval": (("squad", "contains"),),
}
__all__ = ["MATCH_TOLERANCE", "PROBES", "PROBE_TASKS", "compare_to_reference", "disagreements", "probe_verdicts",
           "task_verdicts", "verdict"]
ORDER = {"worse": 0, "matches": 1, "better": 2}


def verdict(original: float, compressed: float, rel_tol: float = MATCH_TOLERANCE,
            higher_is_better: bool = True) -> str:
    """``"matches"`` when |compressed − original| ≤ rel_tol·|original|, else ``"better"`` or ``"worse"``.

    An original of 0 matches only an exact 0 (no relative slack around zero). For perplexity pass
    ``higher_is_better=False``.
    """
    diff = float(compressed) - float(original)
    # The tiny absolute slack absorbs float rounding of equal scores computed two ways.
    if abs(diff) <= rel_tol * abs(float(original)) + 1e-12:
        return "matches"
    return "better" if (diff > 0) == higher_is_better else "worse"


def task_verdicts(reference_tasks: dict[str, dict[str, Any]], tasks: dict[str, dict[str, Any]],
                  rel_tol: float = MATCH_TOLERANCE) -> dict[str, dict[str, str]]:
    """``{task: {metric: verdict}}`` for every metric both results have (counts such as ``n`` skipped)."""
    out: dict[str, dict[str, str]] = {}
    for name, scores in tasks.items():
        ref = reference_tasks.get(name, {})
        out[name] = {metric: verdict(ref[metric], value, rel_tol)
                     for metric, value in scores.items() if metric not in COUNT_KEYS and metric in ref}
    return out


def probe_verdicts(verdicts: dict[str, Any]) -> dict[str, str]:
    """Worst verdict of each probe whose metrics were all run."""
    out = {}
    for probe, parts in PROBES.items():
        found = [verdicts.get(task, {}).get(metric) for task, metric in parts]
        if all(found):
            out[probe] = min(found, key=ORDER.__getitem__)
    return out


def _phrase(v: str) -> str:
    return {"matches": "matches the original", "better": "is better than the original",
            "worse": "is worse than the original"}[v]


def disagreements(verdicts: dict[str, Any], tasks: dict[str, dict[str, Any]] | None = None,
                  reference_tasks: dict[str, dict[str, Any]] | None = None, perplexity: float | None = None,
                  reference_perplexity: float | None = None) -> list[str]:
    """Sentences saying where the perplexity verdict and the task verdicts disagree (empty when they agree).

    * perplexity matches (or is better) but a task metric is worse: damage perplexity hides, one sentence each;
    * perplexity is worse but task metrics match or are better: one sentence listing them.

    Metrics where both models score exactly 0 are left out (a floor says nothing either way).
    """
    ppl_verdict = verdicts.get("perplexity")
    if ppl_verdict is None:
        return []
    tasks = tasks or {}
    reference_tasks = reference_tasks or {}
    ppl_text = f"perplexity {_phrase(ppl_verdict)}"
    if perplexity is not None and reference_perplexity is not None:
        ppl_text += f" ({perplexity:.3f} vs {reference_perplexity:.3f})"

    def numbers(task: str, metric: str) -> str:
        this, ref = tasks.get(task, {}).get(metric), reference_tasks.get(task, {}).get(metric)
        return "" if this is None or ref is None else f" ({this:.3f} vs {ref:.3f})"

    out = []
    holding = []
    for task, metrics in verdicts.items():
        if task == "perplexity" or not isinstance(metrics, dict):
            continue
        for metric, v in metrics.items():
            this, ref = tasks.get(task, {}).get(metric), reference_tasks.get(task, {}).get(metric)
            if this == 0 and ref == 0:
                continue  # both at the floor: no signal either way
            if ppl_verdict != "worse" and v == "worse":
                out.append(f"{ppl_text} but {task} {metric} {_phrase(v)}{numbers(task, metric)}: "
                           "perplexity hides this damage")
            elif ppl_verdict == "worse" and v != "worse":
                holding.append(f"{task} {metric}{numbers(task, metric)}")
    if holding:
        out.append(f"{ppl_text} but these task scores hold up (match or beat the original): {', '.join(holding)}")
    return out


def compare_to_reference(result: dict[str, Any], reference_tasks: dict[str, dict[str, Any]],
                         rel_tol: float = MATCH_TOLERANCE) -> dict[str, Any]:
    """Verdicts, probe verdicts and disagreements for an evaluation result that holds ``tasks`` and, for causal
    LMs, ``perplexity`` and ``reference_perplexity``."""
    verdicts: dict[str, Any] = {}
    ppl, ref_ppl = result.get("perplexity"), result.get("reference_perplexity")
    if ppl is not None and ref_ppl is not None:
        verdicts["perplexity"] = verdict(ref_ppl, ppl, rel_tol, higher_is_better=False)
    verdicts.update(task_verdicts(reference_tasks, result.get("tasks", {}), rel_tol))
    return {"verdicts": verdicts, "probes": probe_verdicts(verdicts),
            "disagreements": disagreements(verdicts, result.get("tasks"), reference_tasks, ppl, ref_ppl)}
