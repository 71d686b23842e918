"""The budget search spread over Ray workers (#15 part 3): 1 process vs 1 and 2 Ray workers, and a 7B estimate.

For each model the candidate database is built once (not timed), then the same evo search (same seed) runs
in this process and on local Ray clusters of 1 and 2 workers, every one computing with 1 torch thread (so the
floats, and therefore the plans, can be compared bit for bit). Measured: the allocator's wall time, evaluations
per second, the cluster's start-up, and whether plan, fitness and history are identical to the serial run. Then
one fitness evaluation is timed alone at a fixed batch size, giving seconds per evaluation per token and per
token-parameter, from which benchmarks/results/scale.md estimates a 7B search on N nodes.

    nice -n 10 python benchmarks/scale_ray.py [--skip-smollm2] [--only stories260K] [--render]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, STORIES, machine, markdown_table, require_shared, stories_split  # noqa: E402

OUT = RESULTS / "scale.md"
RAW = RESULTS / "scale.json"


@dataclass(frozen=True)
class Setup:
    name: str
    path: str
    budget: str
    levels: str
    calib_n: int
    calib_len: int
    evo: dict[str, Any]


def setups(skip_smollm2: bool) -> list[Setup]:
    out = [Setup("stories260K", str(STORIES), "3.0bpw", "gptq:bits=2,3,4:group_size=128;rtn:bits=8:group_size=128",
                 32, 256, {"generations": 20, "offspring": 16, "stages": ((4, 1024), (1, 4096))})]
    if not skip_smollm2:
        from hiercomp.io.builtin import smollm2_dir

        # RTN levels (the Q4_1 source makes 4-bit g32 near-lossless by construction; the search works between
        # 2 and 4 bits). No greedy start: its single-layer table is 210 layers x 3 levels, an hour on 2 cores.
        out.append(Setup("SmolLM2-135M", str(smollm2_dir()), "3.0bpw", "rtn:bits=2,3,4:group_size=32", 16, 128,
                         {"generations": 3, "offspring": 8, "stages": ((2, 256), (1, 512)), "initial_random": 2,
                          "start_from_greedy": False}))
    return out


def plan_key(plan: Any) -> str:
    return json.dumps([{k: v.label for k, v in sorted(plan.layers.items())}, plan.removed, plan.fitness["value"],
                       plan.history], default=str)


def run_model(setup: Setup) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from hiercomp.budget import parse_budget, parse_levels
    from hiercomp.budget.evo import EvoConfig
    from hiercomp.budget.search import prepare_problem, run_allocator
    from hiercomp.distributed import ClusterConfig, RayExecutor
    from hiercomp.io.hf import load_hf_model

    loaded = load_hf_model(setup.path)
    tokenizer = AutoTokenizer.from_pretrained(setup.path)
    _, calibration = stories_split(tokenizer, setup.calib_n, setup.calib_len)
    budget = parse_budget(setup.budget)
    levels, _ = parse_levels(setup.levels)
    start = time.perf_counter()
    problem = prepare_problem(loaded.model, budget, levels, calibration, encoder=False, progress=False)
    build_s = time.perf_counter() - start
    config = EvoConfig(seed=0, **setup.evo)
    params = sum(p.numel() for p in loaded.model.parameters())
    rows: list[dict[str, Any]] = []
    reference, steady_ref = None, None
    steady = 32 if params < 10e6 else 8
    for label, workers in (("1 process", None), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
        executor, startup, load = None, None, os.getloadavg()[0]
        if workers is not None:
            begin = time.perf_counter()
            executor = RayExecutor(ClusterConfig(workers=workers, threads=1))
            startup = time.perf_counter() - begin
        problem.executor, problem._shared = executor, None
        for table in ("single", "removal"):  # measured again by each run: the problem keeps them per batch
            problem.notes.pop(table, None)
        before = problem.evaluations
        begin = time.perf_counter()
        plan, _, _ = run_allocator(problem, budget, "evo", evo=config, progress=False)
        seconds = time.perf_counter() - begin
        evaluations = problem.evaluations - before
        # Steady state: the same workers, now warm (model, candidates and this batch's reference outputs held),
        # scoring one stage of `steady` genomes at once.
        batch = problem.sample_batch(config.stages[-1][1], random.Random(1))
        genomes = [problem.space.uniform_fill(random.Random(k)) for k in range(steady)]
        problem.fitness_many(genomes[:4], batch)
        begin = time.perf_counter()
        steady_values = problem.fitness_many(genomes, batch)
        steady_s = (time.perf_counter() - begin) / steady
        steady_ref = steady_ref or steady_values
        if executor is not None:
            executor.close()
        problem.executor, problem._shared = None, None
        key = plan_key(plan)
        reference = reference or key
        rows.append({"model": setup.name, "run": label, "seconds": seconds, "startup": startup, "load": load,
                     "evaluations": evaluations, "per_s": evaluations / seconds, "identical": key == reference,
                     "steady_per_s": 1 / steady_s, "steady_identical": steady_values == steady_ref,
                     "steady_n": steady,
                     "fitness": plan.fitness["value"], "bpw": plan.cost["bits_per_weight"]})
        print(f"{setup.name} {label}: {seconds:.1f} s, {evaluations} evaluations, identical {key == reference}",
              file=sys.stderr)
    # One evaluation alone (warm: reference outputs and dense candidates already made), at the last stage's size.
    tokens = config.stages[-1][1]
    batch = problem.sample_batch(tokens, random.Random(1))
    genome = problem.space.uniform_fill(random.Random(2))
    problem.fitness(genome, batch)
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        problem.fitness(genome, batch)
        times.append(time.perf_counter() - begin)
    per_eval = statistics.median(times)
    cost = {"model": setup.name, "params": params, "tokens": batch.n_tokens, "per_eval_s": per_eval,
            "per_token_s": per_eval / batch.n_tokens, "per_token_param_s": per_eval / batch.n_tokens / params,
            "candidates_build_s": build_s, "layers": problem.space.n_layers, "levels": len(levels)}
    return {"rows": rows, "cost": cost, "setup": {**setup.__dict__, "evo": {**setup.evo}}, "machine": machine()}


def estimate_7b(cost: dict[str, Any]) -> list[dict[str, Any]]:
    """EvoPress-default search on a Llama-2-7B shape, from the measured seconds per token-parameter."""
    params = 6.74e9
    layers, levels = 32 * 7, 12  # 7 linears per block; the default ladder: gptq bits 2,3,4,5,6,8 x group 32,128
    generations, offspring, survivors = 60, 16, 4
    tokens1, tokens2 = 1024, 4096
    per_tok = cost["per_token_param_s"] * params  # seconds per token of one evaluation on one worker (1 thread)
    t1, t2 = per_tok * tokens1, per_tok * tokens2
    single = layers * levels  # the greedy start's table, at the last stage's size
    rows = []
    for nodes in (1, 4, 16, 64):
        workers = nodes * 16  # 16 single-thread workers per node (a 16-core node; memory permitting, see notes)
        # Every worker computes the original's outputs once per new batch: one more forward pass per stage.
        stage1 = (-(-offspring // workers) + 1) * t1
        stage2 = (-(-(survivors + 1) // workers) + 1) * t2
        table = (-(-single // workers) + 1) * t2
        total = table + generations * (stage1 + stage2)
        rows.append({"nodes": nodes, "workers": workers, "hours": total / 3600, "table_h": table / 3600,
                     "gen_min": (stage1 + stage2) / 60})
    return rows


def write(results: list[dict[str, Any]]) -> None:
    rows = [r for res in results for r in res["rows"]]
    costs = [res["cost"] for res in results]
    measured_on = results[-1].get("machine") or machine()
    lines = ["# Search fan-out on Ray (#15 part 3)", "",
             f"Machine: {measured_on}. Every run computes with 1 torch thread (driver and each worker), so the floats "
             "are comparable bit for bit. Other benchmarks shared the 2 cores (2-3 other processes ran "
             "throughout): read the load average; every number below is slower, and the speed-ups lower, than on "
             "an idle machine. The Ray workers run at this process's priority (the clusters hiercomp starts set "
             "RAY_worker_niceness to 0; Ray's default of +15 would hand their cores to the other processes).", "",
             "Larger-than-memory (streaming) compression is measured in [streaming.md](streaming.md).", "",
             "## 1 process vs Ray workers: the same search, the same seed", "",
             "Candidates are built once before the timed runs (the database on disk is then shared). Time is the "
             "allocator alone (uniform levels, greedy table where used, evo), including each worker's first build "
             "of its Fitness from the object store; the cluster start-up (Ray and its worker processes running) "
             "is the separate column.", "",
             markdown_table(rows, [("model", "model", None), ("run", "run", None),
                                   ("seconds", "search (s)", lambda v: f"{v:.1f}"),
                                   ("startup", "cluster start (s)", lambda v: f"{v:.1f}"),
                                   ("load", "load average before", lambda v: f"{v:.1f}"),
                                   ("evaluations", "evaluations", None),
                                   ("per_s", "evaluations/s", lambda v: f"{v:.2f}"),
                                   ("fitness", "plan KL", lambda v: f"{v:.6f}"),
                                   ("identical", "plan, KL and history identical to 1 process",
                                    lambda v: "yes" if v else "NO"),
                                   ("steady_per_s", "warm evaluations/s", lambda v: f"{v:.2f}")]), "",
             "*warm evaluations/s*: after the search, the same workers (model, candidates and the batch's reference "
             "outputs already held) score one stage of 32 (stories260K) or 8 (SmolLM2) genomes on the last stage's "
             "batch: the throughput without start-up, small stages and per-worker reference outputs; every score "
             "identical to the 1-process scores: "
             + ", ".join(f"{r['model']} {r['run']} {'yes' if r.get('steady_identical') else 'NO'}" for r in rows)
             + ".", ""]
    for res in results:
        by = {r["run"]: r for r in res["rows"]}
        if "Ray, 2 workers" in by:
            speed = by["1 process"]["seconds"] / by["Ray, 2 workers"]["seconds"]
            one = by["1 process"]["seconds"] / by["Ray, 1 worker"]["seconds"]
            warm = by["Ray, 2 workers"].get("steady_per_s", 0) / by["1 process"].get("steady_per_s", 1)
            lines.append(f"- {res['cost']['model']}: the whole search on 2 Ray workers runs at {speed:.2f}x the speed "
                         f"of 1 process (1 Ray worker: {one:.2f}x, the price of each worker's cold start and own "
                         f"reference outputs and of the hand-over); warm, 2 workers score {warm:.2f}x as many "
                         "evaluations per second.")
    warm = {res["cost"]["model"]: {r["run"]: r.get("steady_per_s") for r in res["rows"]} for res in results}
    gains = ", ".join(f"{model} {w['Ray, 2 workers'] / w['1 process']:.2f}x" for model, w in warm.items()
                      if w.get("Ray, 2 workers") and w.get("1 process"))
    lines += ["", "**Reading.** The plan, its KL and the fitness history are identical in every run, and so is "
              "every warm score: the fan-out changes where evaluations run, not what they compute. The speed-up is "
              "not shown convincingly here: 2 cores shared with 2-3 other benchmark processes (load average 4-6) "
              "leave each of our 2 workers well under a core, and the warm throughput of 2 workers over 1 process "
              f"was {gains}. No idle multi-core machine was available to this measurement; the estimate below "
              "assumes that the evaluations of one stage scale linearly over workers, which these numbers do not "
              "demonstrate (they do not contradict it for stories260K; for SmolLM2, whose workers each hold "
              "~3.4 GB, they show no gain on this machine)."]
    lines += ["", "Settings: " + "; ".join(f"{res['cost']['model']}: {res['setup']['budget']}, levels "
                                            f"`{res['setup']['levels']}`, calibration {res['setup']['calib_n']}x"
                                            f"{res['setup']['calib_len']}, evo {res['setup']['evo']}"
                                            for res in results), "",
              "## Measured cost of one fitness evaluation (1 thread, warm)", "",
              markdown_table(costs, [("model", "model", None), ("params", "parameters", lambda v: f"{v / 1e6:.2f}M"),
                                     ("tokens", "tokens", None), ("per_eval_s", "s / evaluation", lambda v: f"{v:.3f}"),
                                     ("per_token_s", "s / token", lambda v: f"{v:.2e}"),
                                     ("per_token_param_s", "s / (token x parameter)", lambda v: f"{v:.2e}"),
                                     ("candidates_build_s", "candidate build (s, not timed above)",
                                      lambda v: f"{v:.1f}")]), ""]
    big = max(costs, key=lambda c: c["params"])
    est = estimate_7b(big)
    lines += ["## Estimate: a 7B search on N nodes", "",
              f"From {big['model']}'s measured {big['per_token_param_s']:.2e} s per token-parameter (the larger "
              "model: the tiny one is dominated by per-call overhead). Assumptions, each stated because the "
              "estimate stands on it:", "",
              "- a Llama-2-7B shape: 6.74e9 parameters, 32 blocks x 7 linears = 224 layers, and `hiercomp "
              "search`'s default ladder (gptq bits 2,3,4,5,6,8 x group 32,128: 12 levels);",
              "- `hiercomp search`'s defaults: 60 generations, 16 offspring, stages (4 survivors at 1024 tokens, "
              "then 1 of those 4 + the parent at 4096), plus the greedy start's single-layer table (224 x 12 "
              "evaluations at 4096 tokens); candidate building (GPTQ per level) is not counted;",
              "- an evaluation costs the measured seconds per token-parameter x 6.74e9 x tokens (the forward pass is "
              "linear in both; attention's quadratic part is small at these sequence lengths); each worker also "
              "computes the original's outputs once per new batch, one more forward per stage (counted);",
              "- nodes like this machine's cores, 16 single-thread workers per node; no speed-up from more threads "
              "per worker is assumed (a GPU node would be one to two orders faster per evaluation);",
              "- parallelism is capped by the search itself: one stage's evaluations run at once (16, then 5), "
              "generations run one after another, so beyond 16 workers only the single-layer table gains;",
              "- memory: each worker holds the original and a working copy (2 x 27 GB in fp32) plus the dense "
              "copies of the candidates it has used (up to 12 x 27 GB): today's Fitness needs 100-380 GB per "
              "worker at 7B, so 16 workers per node is not reachable without bf16 working copies or packed kernels; "
              "read the node counts as worker counts / 16;",
              "- Ray's per-request overhead (measured above as the 1-worker vs 1-process gap) is negligible next to "
              "evaluations of minutes;",
              "- the cost per token-parameter was measured on the shared, loaded machine above (load average in "
              "the first line): on an idle core it is lower, so read the hours as an upper bound for such nodes.",
              "",
              markdown_table(est, [("nodes", "nodes", None), ("workers", "workers", None),
                                   ("table_h", "greedy table (h)", lambda v: f"{v:.1f}"),
                                   ("gen_min", "one generation (min)", lambda v: f"{v:.1f}"),
                                   ("hours", "whole search (h)", lambda v: f"{v:.1f}")]), "",
              "The generations do not parallelise beyond one stage's 16 (then 5) evaluations: with 16 or more "
              "workers a generation is one stage-1 evaluation plus one stage-2 evaluation, whatever N; only the "
              "greedy table keeps gaining. Raising the offspring count is how a larger cluster would be used.", ""]
    OUT.write_text("\n".join(lines))
    RAW.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--only", default=None, help="Measure this model only; keep the others' rows from scale.json.")
    parser.add_argument("--render", action="store_true", help="Only rewrite scale.md from scale.json.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver's count is what each worker copies: 1 thread everywhere
    if args.render:
        write(json.loads(RAW.read_text()))
        return
    require_shared()
    chosen = [s for s in setups(args.skip_smollm2) if args.only in (None, s.name)]
    kept = [r for r in json.loads(RAW.read_text()) if r["cost"]["model"] != args.only] if args.only else []
    fresh = {s.name: run_model(s) for s in chosen}
    order = [s.name for s in setups(args.skip_smollm2)]
    results = kept + list(fresh.values())
    write(sorted(results, key=lambda r: order.index(r["cost"]["model"]) if r["cost"]["model"] in order else 99))


if __name__ == "__main__":
    main()
