"""Load a Hugging Face model folder (or a hub id, when online) with one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.hierarchy import TESTED_MODEL_TYPES

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    is_encoder: bool
    source: str


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / "hiercomp.json").is_file()


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def load_config(ref: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HiercompError(f"{ref} is a file; pass the model's folder (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise HiercompError(f"{ref} has no config.json; pass a Hugging Face model folder (config.json + weights)")
        try:
            json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HiercompError(f"{path / 'config.json'} is not valid JSON ({getattr(err, 'msg', err)}); "
                                "restore the model folder") from None
    elif not _looks_like_hub_id(ref):
        raise HiercompError(f"model folder {ref} does not exist; pass a local folder or a hub id like 'org/name'")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else ref, trust_remote_code=trust_remote_code)
    except ValueError as err:
        msg = str(err).splitlines()[0]
        if "trust_remote_code" in msg:
            raise HiercompError(f"{ref} needs custom code; rerun with --trust-remote-code if you trust it") from None
        raise HiercompError(
            f"{ref}: unsupported architecture ({msg}); supported families: {', '.join(TESTED_MODEL_TYPES)}"
        ) from None
    except OSError as err:
        raise HiercompError(f"cannot load {ref}: {str(err).splitlines()[0]} (offline? use a local folder)") from None


ENCODER_ONLY_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "mpnet")


def is_encoder_config(config: Any) -> bool:
    """Encoder (embedding model) or causal LM: by the saved architecture name, else by the model type."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.model_type in ENCODER_ONLY_TYPES


def check_finite(model: nn.Module, source: str) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise HiercompError(f"{source}: weight {name} contains NaN or Inf; the model file is damaged — "
                                "re-download or re-export it")


# Buffer names of hiercomp's packed layers (hiercomp.layers): weights stored under these names are a compressed
# folder's, which only hiercomp.load reads (with its hiercomp.json).
PACKED_SUFFIXES = (".qweight", ".qzeros", ".fzeros", ".bitplanes", ".bitstream", ".mask_bits", ".plane_scales",
                   ".a_factor", ".b_factor", ".col_scale", ".signs")


def _matches_any(name: str, patterns: Any) -> bool:
    return any(re.search(p, name) for p in (patterns or ()))


def check_weights_match(model: nn.Module, loading: dict[str, Any], ref: str) -> None:
    """Refuse a model whose weights file lacks tensors the class needs (transformers would initialise them at
    random and say nothing an exit code shows) or holds tensors it does not know (a config of another architecture,
    a compressed folder without its hiercomp.json). Keys the class re-creates itself are not counted: tied
    weights and buffers are never reported missing, and the class's own ignore lists are honoured."""
    missing = [k for k in loading.get("missing_keys", ())
               if not _matches_any(k, getattr(model, "_keys_to_ignore_on_load_missing", None))]
    unexpected = [k for k in loading.get("unexpected_keys", ())
                  if not _matches_any(k, getattr(model, "_keys_to_ignore_on_load_unexpected", None))]
    mismatched = list(loading.get("mismatched_keys", ()))
    if any(k.endswith(PACKED_SUFFIXES) for k in unexpected):
        raise HiercompError(f"{ref} holds hiercomp's packed weights but no hiercomp.json (the metadata is missing); "
                            "restore hiercomp.json or compress the model again")
    if missing or unexpected or mismatched:
        what = [f"{label} {len(v)}, e.g. {sorted(v)[0] if isinstance(v[0], str) else v[0]}"
                for label, v in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if v]
        raise HiercompError(f"{ref}: the weights do not match config.json ({'; '.join(what)}); "
                            f"a weights file is incomplete or config.json is another model's — restore the folder")


def load_hf_model(
    ref: str | os.PathLike, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a causal LM or an encoder with its tokenizer. Weights stay in the dtype they were saved in."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # hiercomp shows its own progress; keep stderr for what matters
    hf_logging.set_verbosity_error()
    ref = str(ref)
    if ref.lower().endswith(".gguf"):  # a GGUF file: transformers' own GGUF loading, dequantized to float
        from hiercomp.io.gguf_input import load_gguf_model

        return load_gguf_model(ref, dtype=dtype)
    config = load_config(ref, trust_remote_code)
    path = Path(ref).expanduser()
    if path.exists() and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise HiercompError(f"{ref} has a config but no weights (model.safetensors or pytorch_model.bin)")
    encoder = is_encoder_config(config)
    auto = AutoModel if encoder else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, loading = auto.from_pretrained(str(path) if path.exists() else ref, output_loading_info=True, **kwargs)
    except ValueError as err:
        raise HiercompError(f"{ref}: unsupported architecture ({str(err).splitlines()[0]}); supported families: "
                            f"{', '.join(TESTED_MODEL_TYPES)}") from None
    except Exception as err:  # corrupt or truncated weight files surface as many exception types
        raise HiercompError(f"cannot read the weights in {ref} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); the files are damaged — "
                            "re-download them") from None
    check_weights_match(model, loading, ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else ref,
                                                  trust_remote_code=trust_remote_code)
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in msg:
            raise HiercompError(f"the tokenizer of {ref} needs custom code; rerun with --trust-remote-code if you "
                                "trust it") from None
        raise HiercompError(f"cannot load the tokenizer of {ref}: {msg}") from None
    check_finite(model, ref)
    model.eval()
    return LoadedModel(model, tokenizer, encoder, ref)


def as_loaded(model_or_path: Any, tokenizer: Any = None, trust_remote_code: bool = False) -> LoadedModel:
    """A :class:`LoadedModel` from a folder / hub id (loaded), an ``nn.Module`` (wrapped) or a LoadedModel."""
    if isinstance(model_or_path, LoadedModel):
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        return LoadedModel(model_or_path, tokenizer, is_encoder_config(model_or_path.config),
                           getattr(model_or_path.config, "_name_or_path", "") or "<in memory>")
    return load_hf_model(model_or_path, trust_remote_code=trust_remote_code)
