"""Context level: SQuAD open-book with SmolLM2-135M-Instruct as reader, every compressor at 2x/4x/10x beside
LLMLingua / LongLLMLingua 0.2.2, truncation and random words; the MI estimate against F1; TinyStories
continuation KL; compression cost against the reader's prefill saved. Writes benchmarks/results/context.md.

    nice -n 10 python benchmarks/context.py            # resumes from benchmarks/results/context_raw.json

Sized for a shared 2-core CPU: N_SQUAD questions, MI over MI_N distinct passages, KL_N stories.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, SHARED, STORIES, TINYSTORIES, machine, markdown_table, require_shared  # noqa: E402

N_SQUAD = int(os.environ.get("N_SQUAD", 100))
MI_N = int(os.environ.get("MI_N", 16))
MI_RATIOS = (0.25, 0.1)  # MI is N² predictor passes per row: the 2x rows (longest outputs) are left out
KL_N = int(os.environ.get("KL_N", 6))
READ_THREADS = int(os.environ.get("READ_THREADS", 2))
PREFILL_N = 20  # prompts whose prefill is timed alone
RATIOS = (0.5, 0.25, 0.1)
MAX_NEW_TOKENS = 12
PEER_PYTHON = Path(os.environ.get("LLMLINGUA_PYTHON", "/work/venvs/llmlingua/bin/python"))
PEER_DIR = Path(tempfile.gettempdir()) / "hiercomp_context_peers"
OUT = Path(os.environ.get("CONTEXT_OUT", RESULTS))  # a smoke run writes elsewhere
RAW = OUT / "context_raw.json"
OURS = ("tokens", "sentences", "cascade", "truncate", "random")
# name: (LLMLingua method, iterative_size); 200 is the shipped default, 32 the smaller window its issues advise
PEERS = {"llmlingua": ("llmlingua", 200), "longllmlingua": ("longllmlingua", 200),
         "longllmlingua-it32": ("longllmlingua", 32)}


def load_raw() -> dict:
    return json.loads(RAW.read_text()) if RAW.is_file() else {}


def save_raw(raw: dict) -> None:
    tmp = RAW.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=0))
    tmp.rename(RAW)


class PeerRun:
    """One LLMLingua subprocess over every (question, ratio), in a folder named by a hash of its input, so a rerun
    finds a finished run's output, or waits for one still running (its pid file), instead of starting again."""

    def __init__(self, name: str, model_dir: str, rows: list[dict], count) -> None:
        method, iterative_size = PEERS[name]
        items = []
        for ratio in RATIOS:
            for row in rows:
                items.append({"context": row["context"], "question": row["question"], "ratio": ratio,
                              "target_token": max(1, round(ratio * count(row["context"])))})
        payload = json.dumps({"model": model_dir, "method": method, "iterative_size": iterative_size,
                              "items": items})
        self.name = name
        self.folder = PEER_DIR / f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"
        self.out, self.log, self.pid_file = self.folder / "out.json", self.folder / "log.txt", self.folder / "pid"
        self.proc = None
        if self.out.is_file() or self.running():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "in.json").write_text(payload)
        self.proc = subprocess.Popen(["nice", "-n", "10", str(PEER_PYTHON), str(ROOT / "benchmarks" /
                                      "peer_llmlingua.py"), str(self.folder / "in.json"), str(self.out)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        self.pid_file.write_text(str(self.proc.pid))

    def running(self) -> bool:
        return self.pid_file.is_file() and Path(f"/proc/{self.pid_file.read_text().strip()}").exists()

    def wait(self) -> list[dict] | None:
        """The run's output, or None (its log printed) if it failed."""
        if self.proc is not None:
            self.proc.wait()
        while self.running() and not self.out.is_file():
            time.sleep(10)
        if not self.out.is_file():
            print(f"{self.name} failed: {self.log.read_text()[-2000:] if self.log.is_file() else 'no log'}",
                  flush=True)
            return None
        return json.loads(self.out.read_text())


def main() -> None:
    require_shared()
    torch.set_num_threads(1)
    from hiercomp.api import load_any
    from hiercomp.context import as_scorer, mutual_information
    from hiercomp.context.build import build_compressor
    from hiercomp.context.tasks import compressed_examples, parse_context_option
    from hiercomp.io.builtin import SMOLLM2_CAVEAT, smollm2_dir
    from hiercomp.tasks.data import load_examples
    from hiercomp.tasks.generation import METRICS, greedy_generate, normalise_answer
    from hiercomp.tasks.spec import resolve_spec

    raw = load_raw()
    model_dir = str(smollm2_dir())
    reader = load_any(model_dir)
    model, tok = reader.model, reader.tokenizer
    scorer = as_scorer(model, tok)
    scorer.name = "SmolLM2-135M-Instruct"

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    data_dir = SHARED / "tasks"
    spec = replace(resolve_spec("squad"), max_new_tokens=MAX_NEW_TOKENS)
    rows = [json.loads(line) for line in (data_dir / spec.data).read_text().splitlines() if line.strip()][:N_SQUAD]

    peers = {}
    for method in PEERS:
        if not all(f"{method}@{r}" in raw for r in RATIOS) and PEER_PYTHON.is_file():
            peers[method] = PeerRun(method, model_dir, rows, count)

    # --- compress with ours (each compressor built once; the reader model scores, its tokenizer counts) -----
    compressors = {m: build_compressor(m, target=tok, scorer=scorer) for m in OURS}
    for method in OURS:
        for ratio in RATIOS:
            key = f"{method}@{ratio}"
            if key in raw:
                continue
            results = []

            def recording(text, question=None, budget=None, _c=compressors[method], _out=results):
                start = time.perf_counter()
                res = _c(text, question=question, budget=budget)
                _out.append({"text": res.text, "kept": res.kept_tokens, "budget": res.budget_tokens,
                             "original": res.original_tokens, "seconds": time.perf_counter() - start})
                return res

            option = parse_context_option(f"{method}:budget={ratio}x")
            examples, stats = compressed_examples(spec, option, model, tok, data_dir=data_dir, limit=N_SQUAD,
                                                  progress=False, compressor=recording)
            raw[key] = {"method": method, "ratio": ratio, "items": results, "prompts": [e.context for e in examples]}
            save_raw(raw)
            print(f"compressed {key}: achieved {stats['achieved_ratio']:.3f}, exact {stats['exact']}/{stats['n']}",
                  flush=True)

    full_examples = load_examples(spec, data_dir, N_SQUAD)
    if "full" not in raw:
        raw["full"] = {"method": "full", "ratio": 1.0, "prompts": [e.context for e in full_examples],
                       "items": [{"text": r["context"], "kept": count(r["context"]), "budget": count(r["context"]),
                                  "original": count(r["context"]), "seconds": 0.0} for r in rows]}

    # --- reader: EM / F1 / answer retention; prefill time -----------------------------------------------
    def read_all() -> None:
        # The compressors are done (their cost measured on one thread); reading and MI may use every core.
        torch.set_num_threads(READ_THREADS)
        for key, entry in raw.items():
            if not isinstance(entry, dict) or "prompts" not in entry or "f1_items" in entry:
                continue
            em = kept_answer = 0.0
            f1s = []
            prefill = 0.0
            timed = entry["method"] in ("full", "tokens")  # prefill grows with tokens alike for every compressor
            for prompt, item, row in zip(entry["prompts"], entry["items"], rows):
                with torch.inference_mode():
                    if timed:
                        ids = torch.tensor([tok(prompt)["input_ids"]])
                        start = time.perf_counter()
                        model(input_ids=ids)
                        prefill += time.perf_counter() - start
                    completion, _ = greedy_generate(model, tok, prompt, spec.max_new_tokens, spec.stop, None)
                em += METRICS["exact_match"](completion, row["answers"])
                f1s.append(METRICS["f1"](completion, row["answers"]))
                text = normalise_answer(item["text"])
                kept_answer += any(normalise_answer(a) in text for a in row["answers"])
            n = len(entry["prompts"])
            entry.update(em=em / n, f1=sum(f1s) / n, f1_items=f1s, answer_kept=kept_answer / n,
                         prefill_s=prefill / n if timed else None)
            save_raw(raw)
            print(f"read {key}: F1 {entry['f1']:.3f}", flush=True)

    read_all()  # ours and the full context, while the peers may still run

    # --- peers: collect, render their prompts with the same template ------------------------------------
    for method, run in peers.items():
        out = run.wait()
        if out is None:
            continue
        for k, ratio in enumerate(RATIOS):
            part = out[k * len(rows):(k + 1) * len(rows)]
            items = [{"text": o["text"], "kept": count(o["text"]), "budget": max(1, round(ratio * count(r["context"]))),
                      "original": count(r["context"]), "seconds": o["seconds"]} for o, r in zip(part, rows)]
            prompts = [spec.template.format(**{**r, "context": o["text"]}) for o, r in zip(part, rows)]
            raw[f"{method}@{ratio}"] = {"method": method, "ratio": ratio, "items": items, "prompts": prompts}
        save_raw(raw)
    read_all()

    # --- MI (He et al.) over MI_N distinct passages, predictor = SmolLM2 ----------------------------------
    distinct = []
    for i, row in enumerate(rows):
        if row["context"] not in {rows[j]["context"] for j in distinct}:
            distinct.append(i)
    distinct = distinct[:MI_N]
    for key, entry in raw.items():
        if not isinstance(entry, dict) or "items" not in entry or "mi" in entry or entry["ratio"] not in MI_RATIOS:
            continue
        contexts = [rows[i]["context"] for i in distinct]
        outputs = [[entry["items"][i]["text"]] for i in distinct]
        questions = [rows[i]["question"] for i in distinct]
        est = mutual_information(contexts, outputs, scorer, questions, batch_size=16)
        entry["mi"] = est.as_dict()
        save_raw(raw)
        print(f"MI {key}: {est.bits:.2f} bits", flush=True)

    # --- TinyStories continuation KL ------------------------------------------------------------------
    if "kl" not in raw:
        raw["kl"] = tinystories_kl(model, tok, "SmolLM2-135M-Instruct")
        stories = load_any(str(STORIES))
        raw["kl"].update(tinystories_kl(stories.model, stories.tokenizer, "stories260K"))
        save_raw(raw)

    # --- the reader's prefill, timed alone: one thread, nothing else running, best of 3 per prompt -------------
    if "prefill" not in raw:
        torch.set_num_threads(1)
        raw["prefill"] = {}
        for key in ("full", "tokens@0.5", "tokens@0.25", "tokens@0.1"):
            total = 0.0
            for prompt in raw[key]["prompts"][:PREFILL_N]:
                ids = torch.tensor([tok(prompt)["input_ids"]])
                best = math.inf
                for _ in range(3):
                    with torch.inference_mode():
                        start = time.perf_counter()
                        model(input_ids=ids)
                        best = min(best, time.perf_counter() - start)
                total += best
            raw["prefill"][key] = total / PREFILL_N
        save_raw(raw)

    write_report(raw, rows, distinct, SMOLLM2_CAVEAT)


def tinystories_kl(model, tok, name: str) -> dict:
    """Mean KL(P(next | full prefix) || P(next | compressed prefix)) over 32 continuation tokens (teacher-forced
    on the true continuation), for KL_N stories, prefix = the story's first 128 tokens, at 0.25x."""
    from hiercomp.context import as_scorer
    from hiercomp.context.build import build_compressor

    scorer = as_scorer(model, tok)
    docs = [d.strip() for d in TINYSTORIES.read_text().split("<|endoftext|>") if d.strip()][1:]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    picked = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        if len(ids) >= 160 + 32:
            picked.append(ids)
        if len(picked) == KL_N:
            break
    out = {}
    for method in ("tokens", "truncate", "random"):
        compressor = build_compressor(method, target=tok, scorer=scorer)
        total, n = 0.0, 0
        for ids in picked:
            prefix_text = tok.decode(ids[:160])
            cont = ids[160:192]
            short = compressor(prefix_text, budget="0.25x").text
            logp = []
            for text in (prefix_text, short):
                p_ids = bos + tok(text, add_special_tokens=False)["input_ids"]
                with torch.inference_mode():
                    logits = model(input_ids=torch.tensor([p_ids + cont])).logits[0].float()
                logp.append(F.log_softmax(logits[len(p_ids) - 1:-1], dim=-1))
            total += float((logp[0].exp() * (logp[0] - logp[1])).sum(-1).sum())
            n += len(cont)
        out[f"{name}/{method}"] = total / n
    return out


def standard_error(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def write_report(raw: dict, rows: list[dict], distinct: list[int], caveat: str) -> None:
    table = []
    full = raw["full"]
    for key, entry in raw.items():
        if not isinstance(entry, dict) or "f1" not in entry:
            continue
        items = entry["items"]
        original = sum(i["original"] for i in items)
        kept = sum(i["kept"] for i in items)
        seconds = sum(i["seconds"] for i in items)
        exact = sum(i["kept"] == i["budget"] for i in items)
        table.append({
            "method": entry["method"], "requested": entry["ratio"], "achieved": kept / original,
            "exact": f"{exact}/{len(items)}" if entry["method"] != "full" else "–",
            "em": entry["em"], "f1": entry["f1"], "f1_se": standard_error(entry["f1_items"]),
            "retention": entry["f1"] / full["f1"] if full.get("f1") else None,
            "answer_kept": entry["answer_kept"],
            "mi": entry.get("mi", {}).get("bits"), "mi_tok": entry.get("mi", {}).get("bits_per_token"),
            "at_cap": entry.get("mi", {}).get("at_cap"),
            "cost": 1000 * seconds / original if entry["method"] != "full" else None,
            "prefill_ms": (1000 * raw["prefill"][key] if key in raw.get("prefill", {}) else None),
        })
    order = {m: i for i, m in enumerate(("full", *OURS, *PEERS))}
    table.sort(key=lambda r: (order.get(r["method"], 99), -r["requested"]))
    f3 = "{:.3f}".format
    cols = [("method", "compressor", None), ("requested", "requested ratio", f3),
            ("achieved", "achieved ratio (reader tokens)", f3), ("exact", "budget met exactly", None),
            ("em", "EM", f3), ("f1", "F1", f3), ("f1_se", "± se", f3), ("retention", "F1 / full", f3),
            ("answer_kept", "answer span kept", f3), ("mi", "MI bits", "{:.2f}".format),
            ("mi_tok", "MI bits/token", "{:.3f}".format), ("at_cap", "at cap", "{:.2f}".format),
            ("cost", "compress s / 1k tok", "{:.2f}".format), ("prefill_ms", "reader prefill ms", "{:.0f}".format)]
    with_mi = [r for r in table if r["mi"] is not None and r["method"] != "full"]
    rho = spearman([r["mi"] for r in with_mi], [r["f1"] for r in with_mi]) if len(with_mi) > 2 else float("nan")
    rho_tok = (spearman([r["mi_tok"] for r in with_mi], [r["f1"] for r in with_mi])
               if len(with_mi) > 2 else float("nan"))
    rho_span = (spearman([r["mi"] for r in with_mi], [r["answer_kept"] for r in with_mi])
                if len(with_mi) > 2 else float("nan"))
    paired = paired_rows(raw, 0.25)
    kl = raw.get("kl", {})
    kl_rows = [{"model": k.split("/")[0], "method": k.split("/")[1], "kl": v} for k, v in kl.items()]
    n = len(rows)
    cap = math.log2(len(distinct))
    text = f"""# Context compression: SQuAD open-book, MI, TinyStories KL, cost

Produced by `nice -n 10 python benchmarks/context.py` (raw numbers in `context_raw.json`, which a rerun resumes).
Machine: {machine()}.

Reader and scorer: SmolLM2-135M-Instruct (every LM-based compressor, ours and LLMLingua's, scores with it; the
budget counts its tokens of the passage alone). {caveat} (it matters for weights, not here).
SQuAD v1.1 validation, the first **n = {n}** questions of `squad_validation_olmes1000.jsonl`, the shipped `squad`
template (title, passage, question), greedy, at most {MAX_NEW_TOKENS} new tokens, cut at a newline; only the
passage is compressed. The standard error of a mean F1 over n questions is printed beside each row ("F1 ± se",
over questions); two rows whose F1 differ by less than about twice that are not distinguishable here.

* `tokens`: hiercomp TokenPruner (self-information segment by segment after the kept prefix, plus the
  contrastive question term, whole words, exact budget).
* `sentences`: SentenceSelector, MiniLM cosine to the question, at or under the budget (no threshold here).
* `cascade`: the best sentences (MiniLM) until they cover 1.25x the budget (the `coarse` option), then tokens
  to the budget exactly.
* `truncate`, `random`: first / random whole words, fitted to the same exact budget.
* `llmlingua`, `longllmlingua`: LLMLingua 0.2.2 in its own venv (transformers 4.46.3), SmolLM2 as its small
  LM, budget asked as `target_token` = our budget; LongLLMLingua with its documented question-aware settings.
  LLMLingua-2 is not run: its trained classifier (`microsoft/llmlingua-2-*`) cannot be downloaded offline.

## SQuAD open-book

{markdown_table(table, cols)}

"achieved ratio" = kept / original reader tokens of the passages, summed over the n questions. "answer span
kept" = a gold answer (SQuAD-normalised) is still a substring of the compressed passage. "compress s / 1k tok" =
compression seconds per 1000 passage tokens (LLMLingua's measured inside its subprocess; its model load is not
counted); "reader prefill ms" = one forward pass over the whole prompt on one thread with nothing else running
(best of 3), mean over the first {PREFILL_N} questions.

## At the requested 4x: ours against each LLMLingua variant, question by question

Paired over the same n questions: ΔF1 = ours − peer (mean ± its standard error), and each side's achieved ratio
in reader tokens ("equal or fewer tokens" holds where ours ≤ the peer's).

{markdown_table(paired, PAIRED_COLUMNS)}

## The compressor–predictor claim (He et al.)

MI = Monte-Carlo I(X; Z | Q) with SmolLM2 as predictor over N = {len(distinct)} distinct passages (their own
questions), M = 1 (deterministic compressors), for the rows at the requested {" and ".join(map(str, MI_RATIOS))}
(the N² predictor passes of the 2x rows did not fit this run); the estimate is capped at log2 N = {cap:.2f} bits.
"at cap" = share of passages whose own context takes >= 90% of the posterior. Spearman correlation across the
{len(with_mi)} compressor x ratio rows: MI bits against F1 **rho = {rho:.2f}**, MI bits per output token against
F1 **{rho_tok:.2f}**, MI bits against "answer span kept" (which needs no reader) **{rho_span:.2f}**.

## TinyStories continuation KL

KL(P(next | full prefix) || P(next | prefix compressed to 0.25x)), nats per token, averaged over 32 teacher-forced
continuation tokens of {KL_N} stories (prefix = each story's first 160 tokens of the model's tokenizer; the model
scores its own prefix). Lower is better.

{markdown_table(kl_rows, KL_COLUMNS)}

## Reading

{READING}
"""
    (OUT / "context.md").write_text(text)
    print(f"wrote {OUT / 'context.md'}")


def paired_rows(raw: dict, ratio: float) -> list[dict]:
    """Each of our compressors against each peer at one requested ratio: the per-question F1 difference."""
    out = []
    ours = [e for e in raw.values() if isinstance(e, dict) and e.get("method") in OURS and e.get("ratio") == ratio
            and "f1_items" in e]
    peers = [e for e in raw.values() if isinstance(e, dict) and e.get("method") in PEERS
             and e.get("ratio") == ratio and "f1_items" in e]
    for a in ours:
        for b in peers:
            diff = [x - y for x, y in zip(a["f1_items"], b["f1_items"])]

            def achieved(e: dict) -> float:
                return sum(i["kept"] for i in e["items"]) / sum(i["original"] for i in e["items"])

            out.append({"ours": a["method"], "peer": b["method"], "delta": sum(diff) / len(diff),
                        "se": standard_error(diff), "ours_ratio": achieved(a), "peer_ratio": achieved(b)})
    return out


PAIRED_COLUMNS = [("ours", "ours", None), ("peer", "peer", None), ("delta", "ΔF1", "{:+.3f}".format),
                  ("se", "± se", "{:.3f}".format), ("ours_ratio", "ours: achieved ratio", "{:.3f}".format),
                  ("peer_ratio", "peer: achieved ratio", "{:.3f}".format)]
KL_COLUMNS = [("model", "model", None), ("method", "compressor", None), ("kl", "KL (nats/token)", "{:.3f}".format)]
READING = """\
Measured against the issue's goals (n = 100 questions; one question moves F1 by up to 0.01, and each row's
standard error is 0.012-0.026, so only differences beyond about 0.05 are clear):

* **Exact budget: met.** tokens, cascade and truncate hit the requested ratio exactly in the reader's tokens in
  98-100 of 100 passages (random in 97-98: whole words cannot always sum to the budget; it then stops one short).
  The sentence selector stays *under* the budget by design (whole sentences, never over). LLMLingua /
  LongLLMLingua 0.2.2 met it in 0-5 of 100: asked for 0.25 they kept 0.67 and 0.62 of the tokens, asked for 0.10
  they kept 0.61 and 0.55; their documented `iterative_size=32` setting gets closer (0.33 and 0.20).
* **F1 retention at 4x against LongLLMLingua at equal or fewer tokens: met on the point estimates, not beyond
  noise.** Full passage F1 0.117. At the requested 0.25, our cascade keeps exactly 0.250 of the tokens and F1
  0.116 (retention 0.99); LongLLMLingua keeps 0.624 of the tokens for F1 0.100 (0.85), and with iterative_size
  32, 0.331 of the tokens for 0.077 (0.66). Question by question (table above) cascade − LongLLMLingua =
  +0.016 ± 0.026 and cascade − LongLLMLingua-it32 = +0.039 ± 0.027: ahead with fewer tokens, but within two
  standard errors. The reader is the limit: SmolLM2-135M answers 3 of 100 exactly with the whole passage.
  The measure that needs no reader agrees: at 0.25 the cascade keeps the gold answer in 46% of passages,
  LongLLMLingua-it32 in 26% at 0.33 of the tokens (the default LongLLMLingua 67% at 0.62, LLMLingua 70% at 0.67).
  Our token pruner alone is the weakest LM-based row (F1 0.064 at 0.25, answer kept 25%): word-level deletion
  breaks multi-word answers, which is why the cascade now lets sentences cover only 1.25x the budget (chosen on
  held-out questions 500-559: answer kept 52% against 40% at 2x).
* **Compressor-predictor claim: does not hold here, because the estimate saturates.** Spearman rho between MI
  and F1 is 0.13 (0.05 per output token) across the 16 rows. 12 of them sit at the log2 16 = 4.00-bit cap
  (each passage's own compressed context takes >= 90% of the predictor's posterior), so MI cannot rank them;
  where it is below the cap (sentences 2.10 and 0.46 bits at 0.25 and 0.1, random 3.36 and tokens 3.83 at 0.1)
  it tracks what compression removed: MI against answer-span retention gives rho 0.65. A fair test needs N
  large enough to stay below the cap (the cost grows as N²: 64 passages is 16x this run) and a reader that
  answers more than 3 in 100.
* **TinyStories continuation: token pruning is the best compressor at 0.25x on both models**: stories260K KL
  0.503 nats/token against truncation 0.928 and random 0.789; SmolLM2 1.199 against 1.237 and 1.327 (there
  only 3% ahead of truncation).
* **Cost: on a 135M reader, LM-scored compression costs more than the prefill it saves.** Passages average 176
  reader tokens. Token pruning with SmolLM2 as scorer costs 11.6-21.1 s per 1k passage tokens (2.3 s per
  passage at 0.25), the cascade 3.9-11.4 s (1.2 s), LLMLingua 18-27 s, LongLLMLingua 47-75 s, its iterative
  setting 18-120 s; the reader's prefill falls from 636 ms (full) to 270 ms at 0.25, so 0.37 s is saved per
  question. The MiniLM sentence selector (0.6-0.7 s / 1k tokens, 0.11 s per passage) and truncation pay for
  themselves; LM scoring pays off only with a reader several times larger than the scorer, or a context
  reused across many questions.
"""

if __name__ == "__main__":
    main()
