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

A probe's verdict is the worst verdict among its metrics (worse < within noise < matches < better).

A difference outside the 5% can still be noise: 30 questions near chance move by several points between two
equally good models. So each task score's difference to the original gets a 95% interval — paired when both
models answered the same questions (a seeded bootstrap over the questions of the per-question differences),
else from each score's binomial variance — and a difference beyond 5% whose interval includes 0 is
**within noise**, not better or worse.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hiercomp.tasks.runner import COUNT_KEYS, PROBE_TASKS

MATCH_TOLERANCE = 0.05  # LLM-KICK's epsilon: within 5% of the dense model's score
PROBES: dict[str, tuple[tuple[str, str], ...]] = {
    "closed_book": (("squad_closed_book", "f1"), ("nq_open", "f1")),
    "open_book": (("squad", "f1"),),
    "in_context_retrieval": (("squad", "contains"),),
}
__all__ = ["CONFIDENCE", "MATCH_TOLERANCE", "PROBES", "PROBE_TASKS", "compare_to_reference", "difference_interval",
           "disagreements", "probe_verdicts", "task_intervals", "task_verdicts", "verdict"]
ORDER = {"worse": 0, "within noise": 1, "matches": 2, "better": 3}
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


def verdict(original: float, compressed: float, rel_tol: float = MATCH_TOLERANCE,
            higher_is_better: bool = True, interval: tuple[float, float] | None = None) -> str:
    """``"matches"`` when |compressed − original| ≤ rel_tol·|original|; else ``"within noise"`` when
    ``interval`` (of compressed − original) includes 0; else ``"better"`` or ``"worse"``.

    An original of 0 matches only an exact 0 (no relative slack around zero). For perplexity pass
    ``higher_is_better=False``.
    """
    diff = float(compressed) - float(original)
    # The tiny absolute slack absorbs float rounding of equal scores computed two ways.
    if abs(diff) <= rel_tol * abs(float(original)) + 1e-12:
        return "matches"
    if interval is not None and interval[0] <= 0.0 <= interval[1]:
        return "within noise"
    return "better" if (diff > 0) == higher_is_better else "worse"


def difference_interval(original: dict[str, Any], compressed: dict[str, Any], metric: str,
                        confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Interval of ``compressed[metric] − original[metric]`` (task results with ``n`` and, when run here,
    per-question ``items``); None when there is not enough to say.

    Paired when both hold per-question scores of the same length (the same questions): a percentile bootstrap
    (seeded, reproducible) of the mean per-question difference. Otherwise unpaired, normal approximation with
    each score's variance p(1−p)/n — exact for accuracies, an upper bound for scores in [0, 1] such as F1.
    """
    a = (original.get("items") or {}).get(metric)
    b = (compressed.get("items") or {}).get(metric)
    tail = (1.0 - confidence) / 2
    if a is not None and b is not None and len(a) == len(b) and len(a) > 0:
        diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
        rng = np.random.default_rng(0)
        means = diffs[rng.integers(0, len(diffs), size=(BOOTSTRAP_SAMPLES, len(diffs)))].mean(axis=1)
        lo, hi = np.quantile(means, [tail, 1.0 - tail])
        return float(lo), float(hi)
    n_a, n_b = original.get("n"), compressed.get("n")
    p_a, p_b = original.get(metric), compressed.get(metric)
    if not (n_a and n_b and p_a is not None and p_b is not None and 0 <= p_a <= 1 and 0 <= p_b <= 1):
        return None
    z = _normal_quantile(1.0 - tail)
    half = z * math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    return p_b - p_a - half, p_b - p_a + half


def _normal_quantile(q: float) -> float:
    """Inverse of the standard normal CDF (bisection on erf: exact enough, no scipy)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q else (lo, mid)
    return (lo + hi) / 2


def task_intervals(reference_tasks: dict[str, dict[str, Any]],
                   tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{task: {metric: [low, high]}}``: the interval of each difference (this − original) that can be given."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, scores in tasks.items():
        ref = reference_tasks.get(name, {})
        found = {metric: difference_interval(ref, scores, metric)
                 for metric in scores if metric not in COUNT_KEYS and metric in ref}
        out[name] = {metric: list(interval) for metric, interval in found.items() if interval is not None}
    return out


def task_verdicts(reference_tasks: dict[str, dict[str, Any]], tasks: dict[str, dict[str, Any]],
                  rel_tol: float = MATCH_TOLERANCE) -> dict[str, dict[str, str]]:
    """``{task: {metric: verdict}}`` for every metric both results have (counts such as ``n`` skipped)."""
    intervals = task_intervals(reference_tasks, tasks)
    out: dict[str, dict[str, str]] = {}
    for name, scores in tasks.items():
        ref = reference_tasks.get(name, {})
        out[name] = {metric: verdict(ref[metric], value, rel_tol, interval=intervals.get(name, {}).get(metric))
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
            "worse": "is worse than the original", "within noise": "is within noise of the original"}[v]


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
            elif ppl_verdict == "worse" and v in ("matches", "better"):
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
    return {"verdicts": verdicts, "intervals": task_intervals(reference_tasks, result.get("tasks", {})),
            "probes": probe_verdicts(verdicts),
            "disagreements": disagreements(verdicts, result.get("tasks"), reference_tasks, ppl, ref_ppl)}
