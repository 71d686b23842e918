"""llm-compressor's GPTQ on the same random 25M Llama as speed.py, for a side-by-side time and memory.

Run with the Python of an environment where `pip install llmcompressor` was done (it brings its own
transformers version, so a separate venv is best):  LLMC_PYTHON=/path/to/venv/bin/python python speed.py
Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def main(calib_n: int, calib_len: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (calib_n, calib_len))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])  # int4, g128, symmetric
    # The data is already tokenized; llm-compressor still asks for a processor, any tokenizer will do.
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[3])
    # llm-compressor re-reads the config from the model's folder: give it one.
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    model.config._name_or_path = folder
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, processor=tokenizer, max_seq_length=calib_len,
            num_calibration_samples=calib_n)
    seconds = time.perf_counter() - start
    import llmcompressor

    print(json.dumps({"case": f"llm-compressor {llmcompressor.__version__} GPTQ W4A16 (g128, symmetric), same model",
                      "seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "bpw": None}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
