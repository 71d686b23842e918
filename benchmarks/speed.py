"""Speed and memory of GPTQ and SparseGPT on CPU: single layers of realistic shapes and a whole model.

Each case runs in its own subprocess so that its peak resident memory is its own.
Writes benchmarks/results/speed.md.

    python benchmarks/speed.py            # all cases (about 10-20 minutes on 2 cores)
    python benchmarks/speed.py --quick    # small shapes only, to check the script
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine, markdown_table, peak_rss_mb  # noqa: E402


def layer_case(method: str, out_f: int, in_f: int, tokens: int) -> dict:
    import torch

    from hiercomp.methods import LayerStats, make_method

    torch.manual_seed(0)
    # Correlated activations, as in a real layer: a random mixing of a lower-dimensional signal plus noise.
    basis = torch.randn(in_f // 4, in_f) / (in_f // 4) ** 0.5
    x = torch.randn(tokens, in_f // 4) @ basis + 0.1 * torch.randn(tokens, in_f)
    hessian = x.t() @ x / tokens
    stats = LayerStats(channel_sq_mean=hessian.diagonal().clone(), n_tokens=tokens, hessian=hessian)
    weight = torch.randn(out_f, in_f) / in_f**0.5
    del x
    params = {"bits": 4, "group_size": 128} if method == "gptq" else {"sparsity": 0.5}
    m = make_method(method, **params)
    start = time.perf_counter()
    layer = m.compress(weight, None, stats, f"{out_f}x{in_f}", "linear")
    seconds = time.perf_counter() - start
    return {"case": f"{method} {out_f}×{in_f}", "seconds": seconds, "peak_mb": peak_rss_mb(),
            "bpw": layer.bits_per_weight()}


def model_case(method: str, calib_n: int, calib_len: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hiercomp
    from hiercomp.io.hf import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    calibration = torch.randint(0, config.vocab_size, (calib_n, calib_len))
    params = {"bits": 4, "group_size": 128} if method == "gptq" else {"sparsity": 0.5}
    before = peak_rss_mb()
    start = time.perf_counter()
    cm = hiercomp.compress(LoadedModel(model, None, False, "random-llama-25M"),
                           hiercomp.Recipe.single(method, **params), calibration, progress=False)
    seconds = time.perf_counter() - start
    return {"case": f"{method} whole model, {block_params / 1e6:.1f}M block params, {calib_n}×{calib_len} tokens",
            "seconds": seconds, "peak_mb": peak_rss_mb(), "model_mb": before, "bpw": cm.bits_per_weight}


def run_isolated(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", kind, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", nargs="*")
    args = parser.parse_args()
    if args.case:
        kind, *rest = args.case
        if kind == "layer":
            print(json.dumps(layer_case(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))))
        else:
            print(json.dumps(model_case(rest[0], int(rest[1]), int(rest[2]))))
        return

    shapes = [(512, 512), (1024, 2048)] if args.quick else [(4096, 4096), (4096, 11008)]
    rows = []
    for method in ("gptq", "sparsegpt"):
        for out_f, in_f in shapes:
            rows.append(run_isolated("layer", method, str(out_f), str(in_f), "2048"))
            print(rows[-1], flush=True)
    calib = ("16", "128") if args.quick else ("128", "512")
    for method in ("gptq", "sparsegpt"):
        rows.append(run_isolated("model", method, *calib))
        print(rows[-1], flush=True)
    peer = llmcompressor_row(calib)
    if peer:
        rows.append(peer)

    table = markdown_table(rows, [("case", "case", None), ("seconds", "wall time (s)", lambda v: f"{v:.1f}"),
                                  ("peak_mb", "peak RSS (MB)", lambda v: f"{v:.0f}"),
                                  ("bpw", "bits/weight", lambda v: f"{v:.3f}")])
    text = f"""# Speed and memory (CPU)

Machine: {machine()}. Produced by `python benchmarks/speed.py{' --quick' if args.quick else ''}`.

Single layers: weight (out × in) with random correlated calibration activations (2048 tokens), GPTQ 4-bit
g128 asymmetric (damp 0.01, block 128) and SparseGPT 50% unstructured. The time covers the Hessian
preparation (damping, Cholesky inverse) and the column loop; the Hessian itself is given. Peak RSS is the
whole process's (Python, torch and the test inputs included).

Whole model: a random Llama of 8 blocks, hidden 512, MLP 1408 (25.7M block parameters), compressed block by
block through the engine with sequential stages, statistics by hooks and per-layer error measurement.

{table}
"""
    if not peer:
        text += ("\nllm-compressor's GPTQ was not run: `llmcompressor` is not importable in this environment "
                 "(install it with `pip install llmcompressor`, ideally in its own venv, and rerun).\n")
    (RESULTS / ("speed_quick.md" if args.quick else "speed.md")).write_text(text)
    print(text)


def llmcompressor_row(calib: tuple[str, str]) -> dict | None:
    """llm-compressor's GPTQ on the same random model, in the venv given by LLMC_PYTHON (optional)."""
    import os

    python = os.environ.get("LLMC_PYTHON")
    if not python:
        return None
    script = Path(__file__).resolve().parent / "peer_llmcompressor.py"
    try:
        from _common import STORIES

        out = subprocess.run([python, str(script), *calib, str(STORIES)], capture_output=True, text=True,
                             check=True)
    except subprocess.CalledProcessError as err:
        print("llm-compressor run failed:", err.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
