"""Run LLMLingua / LongLLMLingua 0.2.2 (the anchor) in its own venv: ``/work/venvs/llmlingua/bin/python
benchmarks/peer_llmlingua.py IN.json OUT.json``. Called by ``benchmarks/context.py``; never imported by hiercomp.

IN.json: ``{"model": folder, "method": "llmlingua" | "longllmlingua", "iterative_size": 200, "items":
[{"context", "question", "target_token"}]}``. OUT.json: one ``{"text", "origin_tokens", "compressed_tokens",
"seconds"}`` per item.

Offline fixes, none of which changes the algorithm: ``tiktoken.encoding_for_model`` would download GPT-3.5's
vocabulary, and LLMLingua uses it only to *report* token counts, so it is replaced by the scorer's own tokenizer
(the reports are then in reader tokens, which is what we compare); the model runs on ``device_map="cpu"``.
The budget is requested as ``target_token`` (the documented way to ask for a token count, in the scorer's
tokens = the reader's here, both SmolLM2) with the question kept out of the output (``concate_question=False``).
LongLLMLingua uses its documented settings: ``rank_method="longllmlingua"``, ``condition_in_question=
"after_condition"``, ``condition_compare=True``, ``reorder_context="sort"``, ``dynamic_context_compression_ratio
=0.3``. LLMLingua-2 needs its trained classifier (``microsoft/llmlingua-2-*``), which cannot be downloaded here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def v4_view(folder: str) -> str:
    """The model folder as transformers 4.46 reads it: the same files (linked), but a tokenizer_config.json that
    names a 4.x tokenizer class (5.x writes ``TokenizersBackend``, which 4.46 does not know)."""
    view = tempfile.mkdtemp(prefix="llmlingua-view-")
    for name in os.listdir(folder):
        if name != "tokenizer_config.json":
            os.symlink(os.path.join(folder, name), os.path.join(view, name))
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    json.dump(config, open(os.path.join(view, "tokenizer_config.json"), "w"))
    return view


def main(src: str, dst: str) -> None:
    import tiktoken
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
    job = json.load(open(src))
    model = v4_view(job["model"])
    tokenizer = AutoTokenizer.from_pretrained(model)

    class ReaderTokens:  # what LLMLingua calls the OpenAI tokenizer; only its .encode is used
        def encode(self, text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

    tiktoken.encoding_for_model = lambda name: ReaderTokens()
    from llmlingua import PromptCompressor

    compressor = PromptCompressor(model_name=model, device_map="cpu")
    long = job["method"] == "longllmlingua"
    options = dict(rank_method="longllmlingua", condition_in_question="after_condition", condition_compare=True,
                   reorder_context="sort", dynamic_context_compression_ratio=0.3) if long else {}
    out = []
    for item in job["items"]:
        start = time.perf_counter()
        res = compressor.compress_prompt([item["context"]], question=item["question"] if long else "",
                                         target_token=item["target_token"], concate_question=False,
                                         iterative_size=job.get("iterative_size", 200), **options)
        out.append({"text": res["compressed_prompt"], "origin_tokens": res["origin_tokens"],
                    "compressed_tokens": res["compressed_tokens"], "seconds": time.perf_counter() - start})
    json.dump(out, open(dst, "w"))
    shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
