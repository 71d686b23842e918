"""A GGUF file as the model to compress or evaluate, through transformers' own GGUF loading.

transformers reads the GGUF's metadata into a config and tokenizer and dequantizes every tensor to float (for
the architectures it knows: llama, mistral, qwen2, ...). It then marks the model as "quantized by GGUF"; the
weights are plain floats by then, so we drop that marker and the model behaves (and saves) like any other.
Corrupt or truncated files are caught by reading the header with the ``gguf`` library first: one line, not a
traceback from deep inside the loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from hiercomp.errors import HiercompError

GGUF_MAGIC = b"GGUF"


def is_gguf_ref(ref: Any) -> bool:
    return str(ref).lower().endswith(".gguf")


def check_gguf_file(path: Path) -> str:
    """Validate the header and tensor table; return the architecture name. One-line errors."""
    if not path.is_file():
        raise HiercompError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise HiercompError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                            "re-download or re-export it")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise HiercompError(f"loading a GGUF needs the '{needed}' package: pip install gguf accelerate")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        size = path.stat().st_size
        for tensor in reader.tensors:  # a truncated file has a tensor table pointing past its end
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except HiercompError:
        raise
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HiercompError(f"{path} is a damaged GGUF file ({detail}); re-download or re-export it") from None
    return str(arch)


def strip_gguf_quantizer(model: torch.nn.Module) -> torch.nn.Module:
    """The weights are already dequantized floats: drop transformers' GGUF 'quantizer' so the model saves plainly."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf_model(ref: str | Path, dtype: torch.dtype | None = None) -> Any:
    """A :class:`hiercomp.io.hf.LoadedModel` from a ``.gguf`` file (weights dequantized to float32 by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hiercomp.io.hf import LoadedModel, check_finite

    path = Path(ref).expanduser()
    arch = check_gguf_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype or torch.float32)
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HiercompError(f"transformers cannot load the GGUF {path} (architecture '{arch}': {detail}); "
                            "convert it with llama.cpp's tools or use a Hugging Face folder") from None
    strip_gguf_quantizer(model)
    check_finite(model, str(path))
    model.eval()
    return LoadedModel(model, tokenizer, False, str(path))
