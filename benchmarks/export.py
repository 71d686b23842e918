"""The export matrix: which method x bits x group exports exactly to which format, measured.

For each compressed model (stories260K and SmolLM2-135M-Instruct) and each format:
- compressed-tensors: layers stored packed / dense, largest weight difference read back by the library, and the
  perplexity of the exported folder loaded by transformers (symmetric: plain from_pretrained; asymmetric: the
  library's own decompressor, since transformers cannot build asymmetric packed zeros on the meta device);
- GGUF (exact and compact): block types, largest weight difference read back by gguf.quants.dequantize, and the
  perplexity of the file run by llama.cpp itself (llama-cpp-python in its own venv, fed the same token windows);
- greedy text: llama.cpp and hiercomp from the same prompts, tokens equal before the first divergence;
- llama.cpp decode speed on SmolLM2's Q4_0 and Q8_0 exports (batch 1, 128-token prompt, 128 new tokens,
  2 threads), also written to results/llamacpp_speed.json for the runtime benchmark.

Run: nice -n 10 python benchmarks/export.py   (about 15 min on 2 shared cores; llama.cpp: /work/venvs/llamacpp)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, STORIES, machine, markdown_table, require_shared, stories_split  # noqa: E402

LLAMACPP_PYTHON = Path(os.environ.get("LLAMACPP_VENV", "/work/venvs/llamacpp")) / "bin" / "python"
WIKITEXT = STORIES.parents[2] / "text" / "wikitext-2-raw" / "wiki.test.raw"
THREADS = 2

# method, params; the group of 172-wide stories260K MLP layers never divides: they go dense / F32 (exact)
STORIES_SCHEMES = [
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("rtn", {"bits": 4, "group_size": 32}),
    ("gptq", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("rtn", {"bits": 3, "group_size": 32, "symmetric": True}),
    ("rtn", {"bits": 8, "group_size": None, "symmetric": True}),
    ("gptq", {"bits": 8, "group_size": 32}),
    ("hqq", {"bits": 4, "group_size": 32}),
    ("rtn", {"bits": 4, "group_size": 16, "symmetric": True}),
    ("magnitude", {"pattern": "2:4"}),
]
SMOL_SCHEMES = [  # the two the speed section needs (Q4_0, Q8_0); each costs minutes on a shared machine
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("rtn", {"bits": 8, "group_size": 32, "symmetric": True}),
]

WORKER = r'''
import json, sys, time, math
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
out = {}
llm = Llama(model_path=job["model"], n_ctx=job.get("n_ctx", 512), n_batch=512, n_threads=job["threads"],
            n_threads_batch=job["threads"], logits_all=True, verbose=False)
if "windows" in job:
    total, count = 0.0, 0
    for w in job["windows"]:
        llm.reset(); llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum()); count += len(w) - 1
    out["nll"], out["count"] = total, count
if "prompts" in job:
    gens = []
    for p in job["prompts"]:
        llm.reset(); llm.eval(p); ids = []
        for _ in range(job["new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1])); ids.append(nxt); llm.eval([nxt])
        gens.append(ids)
    out["greedy"] = gens
if "text" in job:
    out["tokens"] = llm.tokenize(job["text"].encode(), add_bos=False, special=False)
if "speed_prompt" in job:
    llm2 = Llama(model_path=job["model"], n_ctx=512, n_batch=512, n_threads=job["threads"],
                 n_threads_batch=job["threads"], logits_all=False, verbose=False)
    runs = []
    for _ in range(job.get("repeats", 2)):
        llm2.reset(); t0 = time.perf_counter(); llm2.eval(job["speed_prompt"]); t1 = time.perf_counter()
        nxt = int(np.argmax(llm2.scores[llm2.n_tokens - 1]))
        for _ in range(job["speed_new"]):
            llm2.eval([nxt]); nxt = int(np.argmax(llm2.scores[llm2.n_tokens - 1]))
        t2 = time.perf_counter()
        runs.append({"prefill_tok_s": len(job["speed_prompt"]) / (t1 - t0),
                     "decode_tok_s": job["speed_new"] / (t2 - t1)})
    out["speed"] = max(runs, key=lambda r: r["decode_tok_s"])
print(json.dumps(out))
'''


def llamacpp(job: dict) -> dict:
    """Run the llama.cpp worker in its own venv; {} with an 'error' key when it is not installed or fails."""
    if not LLAMACPP_PYTHON.is_file():
        return {"error": f"llama-cpp-python venv not found at {LLAMACPP_PYTHON}"}
    proc = subprocess.run([str(LLAMACPP_PYTHON), "-c", WORKER], input=json.dumps(job), capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scheme_label(method: str, params: dict) -> str:
    if "pattern" in params:
        return f"{method} {params['pattern']}"
    g = params.get("group_size")
    return (f"{method} {params['bits']}-bit {'ch' if g is None else f'g{g}'} "
            f"{'sym' if params.get('symmetric') else 'asym'}")


def nll_torch(model: torch.nn.Module, windows: torch.Tensor) -> float:
    from hiercomp.eval.perplexity import windows_nll

    total, count = windows_nll(model, windows, batch_size=4, progress=False)
    return math.exp(total / count)


def reference_model(folder: Path) -> torch.nn.Module:
    """hiercomp's model on its reference path (each compressed layer as the dense weight it stores exactly)."""
    from hiercomp.hierarchy import compressed_layers, set_module
    from hiercomp.io.export_ct import load_stored

    model = load_stored(folder).model
    for name, layer in compressed_layers(model).items():
        set_module(model, name, layer.to_linear())
    return model


def summarize_types(result) -> str:
    from collections import Counter

    kinds = Counter(how.split(" ")[0] for how in {**result.exact, **result.requantized, **result.dense}.values())
    return ", ".join(f"{k}×{n}" for k, n in kinds.most_common())


def row_for(model_name: str, method: str, params: dict, src: str, windows: torch.Tensor, calibration,
            work: Path, prompts: list[list[int]]) -> list[dict]:
    import hiercomp
    from hiercomp.errors import HiercompError
    from hiercomp.io.export_ct import export_compressed_tensors, load_with_library
    from hiercomp.io.gguf_export import export_gguf
    from hiercomp.recipe import Recipe

    label = scheme_label(method, params)
    folder = work / f"{model_name}-{label.replace(' ', '_')}"
    t0 = time.perf_counter()
    if not (folder / "hiercomp.json").is_file():  # compressed models are kept between runs (seeded, deterministic)
        calib = calibration if method in ("gptq",) else None
        hiercomp.compress(src, Recipe.single(method, **params), calib, progress=False).save(folder, force=True)
    own = reference_model(folder)
    bpw = json.loads((folder / "hiercomp.json").read_text())["report"]["bits_per_weight"]
    ppl_own = nll_torch(own, windows)
    greedy_own = [own.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
                  for p in prompts]
    base = {"model": model_name, "scheme": label, "bpw": bpw, "ppl_hiercomp": ppl_own}
    rows = []
    # compressed-tensors
    ct_row = dict(base, format="compressed-tensors")
    try:
        res = export_compressed_tensors(folder, work / "ct", force=True)
        ct_row.update(stored=f"packed×{len(res.exact)}, dense×{len(res.dense)}",
                      max_err=max(res.max_abs_error.values()))
        if params.get("symmetric"):
            from transformers import AutoModelForCausalLM

            loaded, how = AutoModelForCausalLM.from_pretrained(work / "ct"), "from_pretrained"
        else:
            loaded, how = load_with_library(work / "ct"), "library reader"
        ct_row.update(ppl_export=nll_torch(loaded, windows), runtime=f"transformers ({how})")
    except HiercompError as err:
        ct_row.update(stored=f"refused: {err}")
    rows.append(ct_row)
    # GGUF, exact and (asymmetric / HQQ) compact
    # compact differs from exact only for integer-zero asymmetric grids of 2-5 bits (HQQ is Q4_1 either way)
    prefers = ["exact", "compact"] if method in ("rtn", "gptq") and not params.get("symmetric") \
        and params.get("bits", 8) <= 5 else ["exact"]
    for prefer in prefers:
        g_row = dict(base, format=f"gguf ({prefer})")
        out = work / f"{folder.name}-{prefer}.gguf"
        res = export_gguf(folder, out, force=True, prefer=prefer)
        g_row.update(stored=summarize_types(res), max_err=max(res.max_abs_error.values()),
                     size_mb=out.stat().st_size / 1e6)
        job = {"model": str(out), "threads": THREADS, "n_ctx": int(windows.shape[1]) + 32,
               "windows": windows.tolist(), "prompts": prompts, "new_tokens": 24}
        lc = llamacpp(job)
        if "error" in lc:
            g_row.update(runtime=f"llama.cpp: {lc['error']}")
        else:
            same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                    for x, y in zip(lc["greedy"], greedy_own)]
            g_row.update(ppl_export=math.exp(lc["nll"] / lc["count"]), runtime="llama.cpp",
                         greedy_same=f"{sum(s == 24 for s in same)}/{len(same)} ({'/'.join(map(str, same))})")
        rows.append(g_row)
    print(f"{model_name} {label}: {time.perf_counter() - t0:.0f}s", flush=True)
    return rows


def main() -> None:
    require_shared()
    torch.set_num_threads(THREADS)
    from hiercomp.eval.perplexity import text_windows
    from hiercomp.io.builtin import SMOLLM2_CAVEAT, cache_root, smollm2_dir
    from hiercomp.io.gguf_export import export_gguf
    from hiercomp.io.hf import load_hf_model

    work = cache_root() / "export-bench"  # compressed inputs are reused; exports are rewritten each run
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    facts: dict = {}
    # stories260K: TinyStories held-out half, 16 windows of 256
    tok = load_hf_model(STORIES).tokenizer
    eval_text, calibration = stories_split(tok, 32)
    win = text_windows(tok, eval_text, 256, 16, None)
    prompts = [win[i, :32].tolist() for i in range(3)]
    base = load_hf_model(STORIES).model
    facts["stories_fp32_ppl"] = nll_torch(base, win)
    for method, params in STORIES_SCHEMES:
        rows += row_for("stories260K", method, params, str(STORIES), win, calibration, work, prompts)
    # SmolLM2-135M-Instruct: wikitext-2 test, 8 windows of 512
    smol = str(smollm2_dir())
    loaded = load_hf_model(smol)
    text = WIKITEXT.read_text()[:200_000]
    swin = text_windows(loaded.tokenizer, text, 512, 8, None)
    sprompts = [swin[i, :48].tolist() for i in range(3)]
    facts["smol_fp32_ppl"] = nll_torch(loaded.model, swin)
    _, scal = stories_split(loaded.tokenizer, 16)
    for method, params in SMOL_SCHEMES:
        rows += row_for("SmolLM2-135M", method, params, smol, swin, scal, work, sprompts)
    # tokenizer agreement: llama.cpp's tokenizer from our GGUF metadata vs the Hugging Face tokenizer
    sample = text[:4000]
    for name, folder in (("stories260K", "stories260K-rtn_4-bit_g32_sym-exact.gguf"),
                         ("SmolLM2-135M", "SmolLM2-135M-rtn_4-bit_g32_sym-exact.gguf")):
        hf_tok = tok if name == "stories260K" else loaded.tokenizer
        lc = llamacpp({"model": str(work / folder), "threads": 1, "text": sample})
        ours = hf_tok(sample, add_special_tokens=False)["input_ids"]
        facts[f"tokenizer_{name}"] = ("llama.cpp: " + lc["error"]) if "error" in lc else (
            f"{'identical' if lc['tokens'] == ours else 'DIFFERENT'} on {len(ours)} tokens of wikitext")
    # llama.cpp decode speed on SmolLM2's Q4_0 and Q8_0 exports, as exported (F32 embedding, like hiercomp's
    # model) and with the embedding in Q8_0 (as llama.cpp's own quantized files store it)
    speed: dict = {"machine": machine(), "threads": THREADS, "prompt_tokens": 128, "new_tokens": 128, "rows": []}
    prompt = swin[0, :128].tolist()
    for label, params in (("Q4_0", {"bits": 4, "group_size": 32, "symmetric": True}),
                          ("Q8_0", {"bits": 8, "group_size": 32, "symmetric": True})):
        folder = work / f"SmolLM2-135M-{scheme_label('rtn', params).replace(' ', '_')}"
        for embed in ("F32", "Q8_0"):
            out = work / f"smol-{label}-embed{embed}.gguf"
            export_gguf(folder, out, force=True, embed_type=embed)
            lc = llamacpp({"model": str(out), "threads": THREADS, "speed_prompt": prompt, "speed_new": 128,
                           "repeats": 3})
            speed["rows"].append({"weights": label, "embedding": embed, "file_mb": out.stat().st_size / 1e6,
                                  **(lc.get("speed") or {"error": lc.get("error")})})
            print(speed["rows"][-1], flush=True)
    (RESULTS / "llamacpp_speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    write_report(rows, facts, speed, SMOLLM2_CAVEAT)


def fmt_err(x: float) -> str:
    return "0 (exact)" if x == 0 else f"{x:.2g}"


def write_report(rows: list[dict], facts: dict, speed: dict, caveat: str) -> None:
    table = markdown_table(rows, [
        ("model", "model", None), ("scheme", "method · bits · group", None), ("bpw", "bpw", lambda v: f"{v:.2f}"),
        ("format", "format", None), ("stored", "stored as", None), ("max_err", "max abs weight error", fmt_err),
        ("ppl_hiercomp", "ppl hiercomp", lambda v: f"{v:.4f}"), ("ppl_export", "ppl exported", lambda v: f"{v:.4f}"),
        ("runtime", "exported model run by", None), ("greedy_same", "greedy 24 tokens equal", None)])
    speed_table = markdown_table(speed["rows"], [
        ("weights", "linear layers", None), ("embedding", "embedding / output", None),
        ("file_mb", "file MB", lambda v: f"{v:.1f}"), ("prefill_tok_s", "prefill tok/s", lambda v: f"{v:.0f}"),
        ("decode_tok_s", "decode tok/s", lambda v: f"{v:.1f}"), ("error", "error", None)])
    text = f"""# Export matrix: compressed-tensors (vLLM) and GGUF (llama.cpp)

`nice -n 10 python benchmarks/export.py` · {machine()}

Reference perplexities (original fp32 model, same windows): stories260K {facts['stories_fp32_ppl']:.4f}
(TinyStories held-out half, 16 windows of 256 tokens); SmolLM2-135M-Instruct {facts['smol_fp32_ppl']:.4f}
(wikitext-2 test, 8 windows of 512). Caveat: {caveat}.

**How to read it.** "max abs weight error" is measured by the other side's reader: compressed-tensors' own
decompressor, `gguf.quants.dequantize` for GGUF — 0 means bit-identical weights. "ppl exported" is the exported
artefact run by its consumer on the same token windows as "ppl hiercomp": transformers for compressed-tensors,
llama.cpp (llama-cpp-python, CPU, {THREADS} threads) for GGUF. llama.cpp multiplies Q4_0/Q5_0/Q8_0 weights
with activations it quantizes to 8 bits on the fly and keeps its KV cache in float16, so even a bit-exact GGUF
gives slightly different logits there; the transformers GGUF loader (tested in `tests/io`) reproduces hiercomp's
logits exactly. "greedy 24 tokens equal": prompts (3 per model) whose 24 greedy tokens from llama.cpp equal
hiercomp's, and per prompt the tokens equal before the first divergence.

Exact mappings (proved per layer in `tests/io/test_export.py`): compressed-tensors holds every integer grid
(2-8 bits, sym/asym, group or channel) exactly, q' = q - 2^(b-1), z' = z - 2^(b-1), scales in the model's
float32; GGUF: code - zero within -8..7 → Q4_0 (symmetric 2-4-bit), within -16..15 → Q5_0 (symmetric
5-bit, asymmetric 2-4-bit), within -128..127 → Q8_0 (symmetric 6-8-bit, asymmetric 5-7-bit), for groups that are
multiples of 32. `--prefer compact` stores asymmetric 2-5-bit as Q4_1/Q5_1 (0.5 bit/weight less) with the
minimum -s·z rounded to float16: that is the small nonzero error in the compact rows. Requantized (error
reported): asymmetric 8-bit (code - zero exceeds int8), groups that are not multiples of 32 (g16), HQQ's float
zeros (Q4_1). Dense: what neither format has a type for (2:4 sparse → compressed-tensors dense, GGUF F32), and
stories260K's 172-wide MLP input (GGUF blocks need multiples of 32; compressed-tensors needs whole groups).
compressed-tensors' asymmetric rows are read by the library's decompressor: transformers 5.24 with
compressed-tensors 0.20.1 fails to load asymmetric pack-quantized folders (it shapes the packed zero points on the
meta device wrongly; vllm-project/llm-compressor#1618). vLLM itself was not run (no GPU here).

{table}

Tokenizer metadata: stories260K {facts.get('tokenizer_stories260K')}; SmolLM2 {facts.get('tokenizer_SmolLM2-135M')}
(llama.cpp's tokenizer built from our GGUF's metadata vs the Hugging Face tokenizer, no special tokens).

## llama.cpp decode speed (cited by runtime.md)

SmolLM2-135M-Instruct exported by `hiercomp export --format gguf` from RTN 4-bit g32 symmetric (→ Q4_0, exact)
and RTN 8-bit g32 symmetric (→ Q8_0, exact); batch 1, 128-token prompt, then 128 greedy tokens one at a time,
{speed['threads']} threads, best of 3; llama-cpp-python built from source here with `GGML_NATIVE=ON`. "F32"
keeps the embedding / tied output matrix in float32 as hiercomp's own model does (the output projection then
reads 113 MB per token); "Q8_0" stores it as llama.cpp's quantized files do (`--embed-type Q8_0`). JSON:
`benchmarks/results/llamacpp_speed.json`.

{speed_table}
"""
    (RESULTS / "export.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
