"""One memory budget across weights and KV cache (`hiercomp plan-memory`) on SmolLM2-135M → results/plan_memory.md.

    nice -n 10 python benchmarks/plan_memory.py

At context 8192 × batch 4 and three memory budgets: the split plan-memory chooses, beside weights-only compression
with a full cache (fp32 = the model's dtype, what generation stores by default; and fp16) and beside the KV-only
choice (original fp32 weights, the best ladder spec that fits the rest). Damage = teacher-forced continuation KL
(hiercomp.kv.evaluate) on WikiText-2 test windows (prefix 2048, 32 scored tokens, 3 windows); weight candidates are
GPTQ 2/3/4/8-bit group 32 built on 16 × 512 WikiText-2 *valid* tokens, allocated by the sensitivity-greedy search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine, markdown_table, peak_rss_mb  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "text" / "wikitext-2-raw"
MEMORIES = ("400MB", "700MB", "1.2GB")
CONTEXT, BATCH = 8192, 4
LEVELS = "gptq:bits=2,3,4,8:group_size=32"


def mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def kl(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def weights_label(choice: object) -> str:
    plan = choice.weights.plan  # type: ignore[attr-defined]
    return "original fp32" if plan is None else f"GPTQ mix {plan.cost['bits_per_weight']:.2f} bpw"


def row(memory: str, approach: str, choice: object | None, note: str = "") -> dict:
    if choice is None:
        return {"memory": memory, "approach": approach, "weights": note}
    return {"memory": memory, "approach": approach, "weights": weights_label(choice),
            "w_bytes": choice.weights.bytes, "kv": choice.kv.spec, "kv_bytes": choice.kv.bytes,  # type: ignore
            "overhead": choice.overhead, "total": choice.total_bytes, "w_kl": choice.weights.kl,  # type: ignore
            "kv_kl": choice.kv.kl, "predicted": choice.predicted_kl, "measured": choice.measured_kl}  # type: ignore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=3)
    parser.add_argument("--calib-n", type=int, default=16)
    parser.add_argument("--fitness-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hiercomp.budget.memory import (
        DEFAULT_KV_SPECS,
        MemoryChoice,
        build_setup,
        choose,
        decode_overhead_bytes,
        parse_memory,
    )
    from hiercomp.calibration import CalibrationConfig, load_calibration, read_documents, token_stream
    from hiercomp.errors import HiercompError
    from hiercomp.io.builtin import smollm2_dir
    from hiercomp.io.hf import load_hf_model

    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_hf_model(smollm2_dir())
    model, tok = loaded.model.eval(), loaded.tokenizer
    calibration = load_calibration(tok, CalibrationConfig(str(WIKI / "wiki.valid.raw"), args.calib_n, 512, seed=0))
    eval_ids = token_stream(tok, read_documents(WIKI / "wiki.test.raw")).tolist()
    setup = build_setup(model, "SmolLM2-135M-Instruct", calibration, eval_ids, prefix=args.prefix, continuation=32,
                        sequences=args.sequences, levels=LEVELS, search="greedy",
                        fitness_tokens=args.fitness_tokens, progress=True)
    timings["setup (references, prefills, GPTQ candidates)"] = time.perf_counter() - start
    setup16 = dataclasses.replace(setup, store_dtype=torch.float16, kv={})  # shares the weight search

    rows, pairs_by_memory = [], {}
    for memory in MEMORIES:
        t0 = time.perf_counter()
        memory_bytes = parse_memory(memory)
        chosen = choose(setup, memory_bytes, CONTEXT, BATCH, DEFAULT_KV_SPECS, verify=2)
        rows.append(row(memory, "**plan-memory**", chosen.choice))
        pairs_by_memory[memory] = chosen.candidates
        for label, base, verify in (("weights only, full fp32 cache", setup, 0),
                                    ("weights only, full fp16 cache", setup16, 1)):
            try:
                got = choose(base, memory_bytes, CONTEXT, BATCH, ("none",), verify=verify)
                rows.append(row(memory, label, got.choice))
            except HiercompError as err:
                least = str(err).split("the smallest reachable is ")[-1].split(" (")[0]
                rows.append(row(memory, label, None, f"does not fit (needs ≥ {least})"))
        original = setup.original_weights()
        overhead = decode_overhead_bytes(model, CONTEXT, BATCH)
        fitting = [setup.measure_kv(s, CONTEXT, BATCH) for s in DEFAULT_KV_SPECS]
        fitting = [o for o in fitting if original.bytes + o.bytes + overhead <= memory_bytes]
        if fitting:
            best = min(fitting, key=lambda o: (o.kl, o.bytes))
            rows.append(row(memory, "KV only (original weights)", MemoryChoice(original, best, overhead, best.kl,
                                                                               best.kl)))
        else:
            rows.append(row(memory, "KV only (original weights)", None,
                            f"does not fit (weights alone {mb(original.bytes)} MB + overhead)"))
        timings[f"memory {memory}"] = time.perf_counter() - t0

    kv_rows = [{"spec": o.spec, "bytes": o.bytes, "per_token": o.bytes_per_new_token, "kl": o.kl, "top1": o.top1,
                "formula": o.formula_prefix_bytes, "measured": o.measured_prefix_bytes}
               for o in (setup.measure_kv(s, CONTEXT, BATCH) for s in DEFAULT_KV_SPECS)]
    write(rows, kv_rows, pairs_by_memory, timings, args, overhead)
    (RESULTS / "plan_memory_raw.json").write_text(json.dumps(
        {"rows": rows, "kv": kv_rows, "pairs": {m: [c.row() for c in cs] for m, cs in pairs_by_memory.items()},
         "timings": timings}, indent=1, default=float) + "\n")


def write(rows: list[dict], kv_rows: list[dict], pairs_by_memory: dict, timings: dict,
          args: argparse.Namespace, overhead: int) -> None:
    main_table = markdown_table(rows, [
        ("memory", "memory", None), ("approach", "approach", None), ("weights", "weights", None),
        ("w_bytes", "weights MB", mb), ("kv", "KV spec", None), ("kv_bytes", "KV MB", mb),
        ("overhead", "overhead MB", mb), ("total", "total MB", mb), ("w_kl", "KL weights", kl),
        ("kv_kl", "KL KV", kl), ("predicted", "KL sum", kl), ("measured", "KL measured together", kl)])
    kv_table = markdown_table(kv_rows, [
        ("spec", "KV spec", None), ("bytes", f"MB at {CONTEXT} × {BATCH}", mb),
        ("per_token", "bytes per new token (batch)", lambda v: f"{v:.0f}"), ("kl", "KL (orig. weights)", kl),
        ("top1", "top-1", lambda v: f"{v:.3f}"), ("formula", f"formula at prefix {args.prefix} (B)",
                                                  lambda v: f"{v:.0f}"),
        ("measured", "held by a real cache (B)", lambda v: f"{v:.0f}")])
    add_rows = [{"memory": m, **c.row()} for m, cs in pairs_by_memory.items() for c in cs if c.measured_kl is not None]
    additivity = markdown_table(add_rows, [
        ("memory", "memory", None), ("kv", "KV spec", None), ("weights", "weights", lambda v: v[:60]),
        ("weights_kl", "KL weights", kl), ("kv_kl", "KL KV", kl), ("predicted_kl", "sum", kl),
        ("measured_kl", "measured together", kl)])
    pair_tables = []
    for memory, cands in pairs_by_memory.items():
        prow = [{"kv": c.kv.spec, "weights": weights_label(c), "w_bytes": c.weights.bytes, "kv_bytes": c.kv.bytes,
                 "w_kl": c.weights.kl, "kv_kl": c.kv.kl, "predicted": c.predicted_kl, "measured": c.measured_kl}
                for c in cands]
        pair_tables.append(f"**{memory}**\n\n" + markdown_table(prow, [
            ("kv", "KV spec", None), ("weights", "weights in the rest", None), ("w_bytes", "weights MB", mb),
            ("kv_bytes", "KV MB", mb), ("w_kl", "KL weights", kl), ("kv_kl", "KL KV", kl),
            ("predicted", "sum", kl), ("measured", "measured", kl)]))
    times = "\n".join(f"- {k}: {v:.0f} s" for k, v in timings.items())
    text = f"""# One memory budget across weights and KV cache (`hiercomp plan-memory`, issue #11 part 3)

SmolLM2-135M-Instruct (fp32 on CPU, 30 layers, 3 KV heads × 64), **context {CONTEXT} × batch {BATCH}**.
Script: `nice -n 10 python benchmarks/plan_memory.py`. Machine: {machine()}. Peak RSS {peak_rss_mb():.0f} MB.

Memory = weights (saved size of the plan: packed layers + fp32 embeddings/norms, tied once) + KV cache after a
prefill of {CONTEXT} tokens per sequence (the cache classes' accounting; full-precision tokens in the model's fp32)
+ decode overhead {mb(overhead)} MB (one layer's past decoded twice in fp32, one layer's attention scores, fp32
logits, one block's activations; the *prefill* peak is not counted — see hiercomp/budget/memory.py).
Damage = continuation KL (nats/token) to the original model with a full cache, teacher-forced, WikiText-2 test,
{args.sequences} windows of prefix {args.prefix} + 32 scored tokens (the cache is evaluated at {args.prefix}
tokens, not {CONTEXT}: a 2-core CPU cannot teacher-force 8k prefixes for every candidate).
Weight side: GPTQ 2/3/4/8-bit group 32 candidates ({args.calib_n} × 512 WikiText-2 valid tokens), greedy allocation
at each KV rung's remaining bytes (fitness on {args.fitness_tokens} tokens), layers assembled from the candidate
database (computed from the original activations; `compress --plan` runs the sequential engine, usually a little
better). Caveat: SmolLM2's linear weights come from a Q4_1 GGUF, so 4-bit group-32 quantization of it is nearly
lossless by construction — the weight side's 4-bit damage is flattered.

## The chosen split beside weights-only and KV-only

{main_table}

"KL measured together" runs the compressed weights *and* the compressed cache; plan-memory measures its two best
pairs by predicted sum that way and keeps the lower. Weights-only with an fp16 cache: the cache stores fp16 while
the model computes in fp32 (its KL measured the same way).

## Is the sum of KLs a usable combination rule?

{additivity}

## KV ladder (bytes at context × batch, damage with the original weights)

{kv_table}

The formula column is `KVLayer.bytes_for_tokens` at the evaluation prefix for one sequence; the last column is what
a real cache filled with that prefix holds (its tensors' storage).

## Every pair considered (fitting ones, by predicted sum)

{chr(10).join(pair_tables)}

## Time

{times}
"""
    (RESULTS / "plan_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
