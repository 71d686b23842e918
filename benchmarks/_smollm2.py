"""The SmolLM2-135M-Instruct protocol that quality.py and methods.py share (issue 15), so their rows compare.

- WikiText-2 *test* perplexity (the literature's protocol) on the first 16 windows of 512 tokens, KL(original ‖
  compressed) and top-1 agreement on the same positions;
- TinyStories perplexity and KL on 16 windows of 256 tokens of ``valid_sample.txt``;
- ARC-Easy (test), PIQA and COPA (validation), the first 100 questions each, zero-shot, with verdicts against
  the original's answers to the same questions (:mod:`hiercomp.tasks.probes`);
- calibration: 16 × 512 tokens of WikiText-2 *validation* (never evaluated).

A compressed model is evaluated with its layers' exact dequantized weights as dense matrices
(:func:`hiercomp.hierarchy.dequantize_layers`: the function the packed reference path computes, ~20× faster here).
"""

from __future__ import annotations

from typing import Any

import torch

from _common import SHARED, TINYSTORIES, markdown_table

WIKI_TEST = SHARED / "text" / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "text" / "wikitext-2-raw" / "wiki.valid.raw"
TASKS = ["arc_easy", "piqa", "copa"]
TASK_LIMIT = 100  # ±0.1 at 95%: enough to tell a broken model from a working one, not 2 points apart
ORIGINAL = "original (float32)"


class SmolProtocol:
    """Loads SmolLM2 once, scores the original once, then measures any compressed variant into one row."""

    def __init__(self) -> None:
        from hiercomp.calibration import CalibrationConfig, load_calibration
        from hiercomp.evaluation import evaluate
        from hiercomp.io.builtin import smollm2_dir
        from hiercomp.io.hf import load_hf_model

        self.path = str(smollm2_dir())
        self.tokenizer = load_hf_model(self.path).tokenizer
        self.calibration = load_calibration(self.tokenizer, CalibrationConfig(str(WIKI_VALID), 16, 512, seed=0))
        # evaluate() loads the original where it needs it (as the reference for KL and the tasks' verdicts).
        self.ref_wiki = evaluate(self.path, text=WIKI_TEST, tasks=TASKS, limit=TASK_LIMIT, seed=0,
                                 data_dir=SHARED / "tasks", seq_len=512, max_windows=16, progress=False)
        self.ref_tiny = evaluate(self.path, text=TINYSTORIES, seq_len=256, max_windows=16, progress=False)

    def original_row(self) -> dict[str, Any]:
        wiki = {**self.ref_wiki, "kl": 0.0, "top1_agreement": 1.0, "verdicts": {}}
        tiny = {**self.ref_tiny, "kl": 0.0, "top1_agreement": 1.0}
        return self._row(ORIGINAL, 32.0, None, wiki, tiny)

    def dense_model(self) -> Any:
        """The original as a :class:`hiercomp.CompressedModel` with nothing compressed: a peer rewrites its
        weights in place and :meth:`measure` scores it like any other variant."""
        from hiercomp.evaluation import load_any

        return load_any(self.path)

    def measure(self, name: str, cm: Any, bpw: float, seconds: float | None) -> dict[str, Any]:
        from hiercomp.evaluation import evaluate
        from hiercomp.hierarchy import dequantize_layers

        dequantize_layers(cm.model)  # exact dense weights: the same function, faster
        with torch.no_grad():
            wiki = evaluate(cm, text=WIKI_TEST, reference=self.path, reference_scores=self.ref_wiki, tasks=TASKS,
                            limit=TASK_LIMIT, seed=0, data_dir=SHARED / "tasks", seq_len=512, max_windows=16,
                            progress=False)
            tiny = evaluate(cm, text=TINYSTORIES, reference=self.path, reference_scores=self.ref_tiny, seq_len=256,
                            max_windows=16, progress=False)
        return self._row(name, bpw, seconds, wiki, tiny)

    @staticmethod
    def _row(name: str, bpw: float, seconds: float | None, wiki: dict, tiny: dict) -> dict[str, Any]:
        return {"config": name, "bpw": bpw, "seconds": seconds, "wiki_ppl": wiki["perplexity"],
                "wiki_kl": wiki["kl"], "wiki_top1": wiki["top1_agreement"], "tiny_ppl": tiny["perplexity"],
                "tiny_kl": tiny["kl"], "verdicts": wiki.get("verdicts", {}), "probes": wiki.get("probes", {}),
                "disagreements": wiki.get("disagreements", []),
                "tasks": {t: {k: v for k, v in res.items() if k != "items"} for t, res in wiki["tasks"].items()}}


def task_cell(row: dict[str, Any], task: str) -> str:
    """"0.490 ± 0.098 (matches)": accuracy, its 95% half-interval (normal approximation) and the verdict."""
    res = row.get("tasks", {}).get(task, {})
    acc, n = res.get("acc"), res.get("n", 0)
    if acc is None:
        return "–"
    verdict = ((row.get("verdicts") or {}).get(task) or {}).get("acc")
    half = 1.96 * (acc * (1 - acc) / n) ** 0.5 if n else float("nan")
    return f"{acc:.3f} ± {half:.3f}" + (f" ({verdict})" if verdict else "")


def smollm2_table(rows: list[dict[str, Any]], first: tuple[str, str] = ("config", "configuration")) -> str:
    """One Markdown table: bits, both texts' perplexity and KL, top-1, the three tasks, compression seconds."""
    f3, f4 = (lambda v: f"{v:.3f}"), (lambda v: f"{v:.4f}")
    flat = []
    for r in rows:
        out = {k: r.get(k) for k in (first[0], "bpw", "wiki_ppl", "wiki_kl", "wiki_top1", "tiny_ppl", "tiny_kl",
                                     "seconds")}
        out.update({task: task_cell(r, task) for task in TASKS})
        flat.append(out)
    return markdown_table(flat, [(first[0], first[1], None), ("bpw", "bits/weight", f3),
                                 ("wiki_ppl", "WikiText-2 ppl", f3), ("wiki_kl", "WikiText-2 KL", f4),
                                 ("wiki_top1", "top-1", f4), ("tiny_ppl", "TinyStories ppl", f3),
                                 ("tiny_kl", "TinyStories KL", f4)]
                         + [(t, t.replace("_", "-"), None) for t in TASKS]
                         + [("seconds", "compress s", lambda v: f"{v:.0f}")])
