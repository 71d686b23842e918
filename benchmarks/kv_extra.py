"""KV-cache level, the two measurements kv.py leaves out (issue 11): CacheGen's entropy-coded prefix on disk
against 8-bit and fp16 storage of the same cache (SmolLM2-135M-Instruct, WikiText-2 prefixes, with the
continuation KL the decoded cache costs), and bytes / speed at 32k context on the random GQA Llama of kv.py.

    nice -n 10 python benchmarks/kv_extra.py      # writes benchmarks/results/kv_extra.md (about 10 min)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, ROOT, machine, markdown_table  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "text" / "wikitext-2-raw" / "wiki.test.raw"
PREFIXES = (512, 2048)
CONTINUATION = 32
MEMORY_CONTEXT = 32768
MEMORY_SPECS = ("dynamic", "kivi:bits=2", "snapkv:ratio=0.75", "snapkv:ratio=0.75+kivi:bits=2")


def continuation_kl(model, cache_a, cache_b, tokens: torch.Tensor) -> float:
    """Mean KL(a ‖ b) of next-token distributions over ``tokens`` fed one at a time through both caches."""
    from hiercomp.kv import adapter

    total = 0.0
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            step = tokens[:, i : i + 1]
            la = model(step, **adapter.cache_kwargs(cache_a)).logits[:, -1].float().log_softmax(-1)
            lb = model(step, **adapter.cache_kwargs(cache_b)).logits[:, -1].float().log_softmax(-1)
            total += float(F.kl_div(lb, la, log_target=True, reduction="sum"))
    return total / tokens.shape[1]


def cachegen_rows() -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from hiercomp.io.builtin import smollm2_dir
    from hiercomp.kv import adapter
    from hiercomp.kv.cachegen import load_prefix, reference_sizes, save_prefix

    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(WIKI.read_text()[:200_000], add_special_tokens=False, return_tensors="pt")["input_ids"]
    rows = []
    for prefix in PREFIXES:
        seq = ids[:, 10_000 : 10_000 + prefix + CONTINUATION]
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(seq[:, :prefix], **adapter.cache_kwargs(cache))
        refs = reference_sizes(cache)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            sizes = save_prefix(cache, Path(tmp) / "prefix.hkv")
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            decoded = load_prefix(Path(tmp) / "prefix.hkv", model)
            decode_s = time.perf_counter() - start
        kl = continuation_kl(model, copy.deepcopy(cache), decoded, seq[:, prefix:])
        rows.append({"prefix": prefix, "fp16": refs["fp16"], "int8": refs["int8"], "cachegen": sizes["total"],
                     "words": sizes["words"], "scales": sizes["scales"], "tables": sizes["tables"],
                     "vs_int8": refs["int8"] / sizes["total"], "vs_fp16": refs["fp16"] / sizes["total"],
                     "bits_per_value": 8 * sizes["total"] / (refs["fp16"] / 2), "kl": kl,
                     "encode_s": encode_s, "decode_s": decode_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_rows() -> list[dict]:
    rows = []
    for spec in MEMORY_SPECS:
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "kv.py"), "--memory-one", spec,
                              str(MEMORY_CONTEXT)], capture_output=True, text=True, timeout=1800)
        try:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            rows.append({"spec": spec, "context": MEMORY_CONTEXT,
                         "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def kb(value: float) -> str:
    return f"{value / 1e3:.1f}"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cg = cachegen_rows()
    mem = memory_rows()
    f0, f2, f3 = "{:.0f}".format, "{:.2f}".format, "{:.4f}".format
    text = f"""# KV cache: CacheGen on disk, and 32k context

Produced by `nice -n 10 python benchmarks/kv_extra.py` in {(time.perf_counter() - t0) / 60:.1f} min.
Machine: {machine()}.

## CacheGen: an entropy-coded prefix cache on disk (SmolLM2-135M-Instruct)

A WikiText-2 test prefix is prefilled into a DynamicCache (30 layers, 3 KV heads of 64), written with
`hiercomp.kv.cachegen.save_prefix` (symmetric quantization per layer/token/head to 32 levels in the first third of
the layers and 16 after, one probability table per layer/K-V/channel, range-coded with `constriction`; the file holds
the coded words, fp16 scales and the tables) and read back with `load_prefix`. fp16 = the same tensors at 2 bytes;
8-bit = one byte per value plus an fp16 scale per (token, head). KL = nats per token over the next {CONTINUATION}
tokens fed through the decoded cache vs the original cache. Sizes in KB (1000 bytes).

{markdown_table(cg, [("prefix", "prefix tokens", None), ("fp16", "fp16 KB", kb), ("int8", "8-bit KB", kb),
                      ("cachegen", "CacheGen KB", kb), ("words", "coded words KB", kb), ("scales", "scales KB", kb),
                      ("tables", "tables KB", kb), ("vs_int8", "× smaller than 8-bit", f2),
                      ("vs_fp16", "× smaller than fp16", f2), ("bits_per_value", "bits / value", f2),
                      ("kl", "continuation KL", f3), ("encode_s", "encode s", f2), ("decode_s", "decode s", f2)])}

## 32k context: bytes held, fill and decode (random GQA Llama, as in kv.md)

Same harness as kv.md's memory table (`kv.py --memory-one`): hidden 2048, 16 heads, 4 KV heads of 128, 2 layers,
cache filled by replaying a {MEMORY_CONTEXT}-token prefill, then 4 timed decode steps; each row its own process.

{markdown_table(mem, [("context", "context", None), ("spec", "cache", None), ("held_mb", "MB held", f2),
                       ("fill_s", "fill s", f2), ("decode_tok_s", "decode tok/s", f2),
                       ("peak_rss_mb", "peak RSS MB", f0), ("error", "error", None)])}
"""
    (RESULTS / "kv_extra.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
