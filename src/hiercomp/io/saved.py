"""The saved form of a compressed model and the way back.

A folder holds:
- ``model.safetensors``: the model's ``state_dict`` — dense parameters as they were, compressed layers as
  their packed buffers (uint8 codes, float16 scales, ...); tensors shared by tied weights stored once;
- ``config.json`` (+ tokenizer files): the original Hugging Face config, so the skeleton can be rebuilt;
- ``hiercomp.json``: format version, model class, each compressed layer's config, the compression report,
  and ``removed``: the sub-blocks / blocks removed by depth pruning (re-applied before loading the state);
- ``plan.yaml``: what was done to every layer (a :class:`~hiercomp.plan.Plan`), and ``recipe.yaml`` when a
  recipe made it: readable and re-usable.
Loading rebuilds the skeleton from the config, swaps in empty compressed layers of the saved shapes and
loads the state dict: the logits are bit-identical to the compressed model that was saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers, set_module
from hiercomp.io.atomic import atomic_dir
from hiercomp.io.integrity import HASH, file_digest, read_regular, structure_digest, verify_files, verify_structure
from hiercomp.io.resume import kill_point
from hiercomp.layers import build_layer

FORMAT_NAME = "hiercomp"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "hiercomp.json"
MAX_META_BYTES = 64 * 2**20  # a few hundred KB for a 135M model's layers, report and plan; never a device's stream
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
# One key only: safetensors writes its metadata map in a per-process hash order, so two keys made two identical
# runs' files differ byte for byte. The producer is in hiercomp.json.
SAFETENSORS_METADATA = {"format": "pt"}


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without duplicate storage (tied weights): tensors to write, and alias -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.storage_offset())
        key = key if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def save_compressed(
    model: nn.Module, out: str | Path, *, tokenizer: Any = None, files: dict[str, str] | None = None,
    meta: dict[str, Any] | None = None, force: bool = False,
) -> Path:
    """Write ``model`` (with its compressed layers) to ``out`` atomically. Returns the folder."""
    tensors, aliases = _unique_state(model)
    info = folder_info(model, aliases, meta)
    with atomic_dir(out, force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=SAFETENSORS_METADATA)
        kill_point("save")  # test hook ($HIERCOMP_TEST_KILL_AT=save): a hard kill mid-save, for --resume's tests
        finish_folder(tmp, model, info, tokenizer, files)
    return Path(out)


def folder_info(model: nn.Module, aliases: dict[str, str], meta: dict[str, Any] | None) -> dict[str, Any]:
    """hiercomp.json's content but the files' digests: format, model class, dtype, each compressed layer's config,
    tied-weight aliases and ``meta``. Reads only modules and dtypes, so a skeleton on ``meta`` (the streaming
    path, :mod:`hiercomp.stream`) gives what the filled model gives."""
    layers = {name: layer.full_config() for name, layer in compressed_layers(model).items()}
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": layers,
        "aliases": aliases,
    }
    info.update(meta or {})
    if "removed" not in info:  # units removed by hand (hiercomp.depth.remove_subblocks): load must re-apply them
        from hiercomp.depth.standins import RemovedSubBlock

        if any(isinstance(m, RemovedSubBlock) for m in model.modules()):
            from hiercomp.depth import removed_subblocks

            info["removed"] = [{"name": name} for name in removed_subblocks(model)]
    return info


def finish_folder(tmp: Path, model: nn.Module, info: dict[str, Any], tokenizer: Any,
                  files: dict[str, str] | None) -> None:
    """Everything of a saved folder after its weights file (already in ``tmp``): config, tokenizer, extra files
    and hiercomp.json with the weights' digest."""
    model.config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for filename, text in (files or {}).items():  # plan.yaml, recipe.yaml: inside the atomic write
        (tmp / filename).write_text(text)
    info["files"] = {WEIGHTS_FILE: file_digest(tmp / WEIGHTS_FILE)}  # checked at load: parts stay together
    info["structure_" + HASH] = structure_digest(json.loads(json.dumps(info, default=str)))
    (tmp / META_FILE).write_text(json.dumps(info, indent=1, default=str))


def read_meta(path: str | Path) -> dict[str, Any]:
    """``hiercomp.json``, read from a regular file of bounded size, with one-line errors for a damaged one."""
    meta_path = Path(path) / META_FILE
    try:
        info = json.loads(read_regular(meta_path, MAX_META_BYTES, "metadata file"))
    except FileNotFoundError:
        raise HiercompError(f"{path} is not a hiercomp folder (no {META_FILE}); "
                            "compress a model into it first") from None
    except json.JSONDecodeError as err:
        raise HiercompError(f"{meta_path} is damaged ({err.msg}); compress the model again") from None
    except UnicodeDecodeError:
        raise HiercompError(f"{meta_path} is damaged (not UTF-8 text); compress the model again") from None
    if not isinstance(info, dict):
        raise HiercompError(f"{meta_path} is damaged (not a JSON object); compress the model again")
    version = info.get("format_version", 0)
    if info.get("format") != FORMAT_NAME or not isinstance(version, int) or version > FORMAT_VERSION:
        raise HiercompError(f"{meta_path} has format version {info.get('format_version')}; this hiercomp reads "
                            f"version {FORMAT_VERSION} — upgrade hiercomp")
    for key, kind in (("layers", dict), ("aliases", dict), ("removed", list), ("files", dict)):
        if not isinstance(info.get(key, kind()), kind):
            raise HiercompError(f"{meta_path} is damaged ('{key}' is not a {kind.__name__}); compress the model again")
    return info


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside create their parameters on the ``meta`` device: no memory and no random init.

    Buffers stay real: the non-persistent ones (rotary frequencies) are not in the saved state, so they must be
    computed as usual. The same trick as accelerate's ``init_empty_weights(include_buffers=False)``.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(path: str | Path, info: dict[str, Any], meta: bool = False) -> nn.Module:
    """The model class from its config, in the saved dtype, with compressed layers swapped in (empty).

    ``meta``: parameters and compressed buffers on the ``meta`` device (nothing allocated): fill them with
    :func:`fill_state`. Otherwise they are allocated (and initialised) as the class does.
    Only the layer registry (``LAYER_TYPES``, by each layer's saved config) is needed, never the methods.
    """
    import transformers
    from transformers import AutoConfig

    try:  # never the folder's own code: a config.json with auto_map is refused, not prompted about
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:
        raise HiercompError(f"{path}/config.json cannot be read ({_first_line(err)}); restore the folder") from None
    model_class = info.get("model_class")
    cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise HiercompError(f"{path}/{META_FILE} names model class {model_class!r}, which this transformers "
                            "version does not have; upgrade transformers or compress the model again")
    if not isinstance(config, cls.config_class):
        raise HiercompError(f"{path}/config.json is a {type(config).__name__}, but the weights are a {model_class}'s; "
                            "config.json comes from another model — restore the folder")
    dtype = getattr(torch, str(info.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise HiercompError(f"{path}/{META_FILE} names dtype {info.get('dtype')!r}; compress the model again")
    try:
        with parameters_on_meta() if meta else nullcontext():
            model = cls(config).to(dtype)
    except Exception as err:
        raise HiercompError(f"{path}/config.json does not build a {model_class} ({_first_line(err)}); "
                            "restore the folder") from None
    removed = [row["name"] if isinstance(row, dict) else row for row in info.get("removed", [])]
    if removed:  # depth pruning: the same stand-ins as when saved, so the state keys match
        from hiercomp.depth import remove_subblocks

        remove_subblocks(model, removed)
    for name, layer_cfg in info["layers"].items():
        try:
            with torch.device("meta") if meta else nullcontext():
                layer = build_layer(layer_cfg)
            set_module(model, name, layer)
        except HiercompError:
            raise
        except Exception as err:  # an edited config: unknown type, bits or shapes the layer cannot have
            raise HiercompError(f"{path}/{META_FILE}: layer {name} cannot be rebuilt ({_first_line(err)}); "
                                "the metadata was edited or damaged — compress the model again") from None
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}


def read_tensors(weights: Path, mapped: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each read straight into its own CPU tensor (one copy: no mmap whose
    touched pages would count twice in the resident memory, no intermediate bytes object).

    ``mapped``: names to map from the file instead of reading (copy-on-write, so writing to them never changes
    the file): their pages are read when first touched. For the input embedding of a model whose output head
    does not read it, a decode then holds only the rows of the tokens it sees, as llama.cpp's mmap does, instead
    of the whole table (the random Llama's float32 table is 262 MB). Falls back to reading where the platform
    cannot map the file or the tensor's offset is not aligned to its element size."""
    state: dict[str, torch.Tensor] = {}
    whole: torch.Tensor | None = None
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len} is beyond safetensors' limit")
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name} has unknown dtype {entry['dtype']!r}")
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            start, end = entry["data_offsets"]
            if end - start != tensor.numel() * tensor.element_size():
                raise ValueError(f"tensor {name} has {end - start} bytes for shape {entry['shape']}")
            if name in mapped and tensor.numel() and (base + start) % tensor.element_size() == 0:
                whole = _map_file(weights) if whole is None else whole
                if whole is not None and base + end <= whole.numel():
                    state[name] = whole[base + start : base + end].view(tensor.dtype).view(tensor.shape)
                    _drop_cached(f, base + start, end - start)
                    continue
            if tensor.numel():
                f.seek(base + start)
                if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise ValueError(f"the file ends inside tensor {name}")
            state[name] = tensor
    return state


def _map_file(path: Path) -> torch.Tensor | None:
    """The whole file as a copy-on-write mapped uint8 tensor, advised for random access (no read-ahead around
    each touched row); None where it cannot be mapped."""
    try:
        size = path.stat().st_size
        whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    except (OSError, RuntimeError):
        return None
    try:
        import ctypes

        page = 4096
        addr = whole.data_ptr()
        ctypes.CDLL("libc.so.6").madvise(ctypes.c_void_p(addr - addr % page), ctypes.c_size_t(size + addr % page),
                                         1)  # MADV_RANDOM
    except (OSError, AttributeError):  # not glibc: read-ahead stays on, nothing else changes
        pass
    return whole


def _drop_cached(f: Any, offset: int, length: int) -> None:
    """Evict a mapped tensor's bytes from the page cache (they are clean: nothing is lost). Reading the file
    (checksums, read-ahead) leaves them cached in large folios, and a fault on a mapped large folio maps all of it:
    measured 430 KB resident per touched 8 KB embedding row. Evicted, each first touch reads its own pages."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(f.fileno(), offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def sparse_read_names(model: nn.Module) -> frozenset[str]:
    """State-dict names of tensors a forward reads only in part: the input embedding (a few rows a token) where
    the output head does not read the same table. Empty when the head is tied to it and dense."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        return frozenset()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None and getattr(head, "weight", None) is not None and getattr(model.config, "tie_word_embeddings",
                                                                                  False):
        return frozenset()
    return frozenset(name for name, p in model.named_parameters(remove_duplicate=False) if p is weight)


def fill_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Load ``state`` into a :func:`build_skeleton` (meta) model by assignment: the loaded tensors become the
    model's, nothing is copied; tied weights are tied again; anything left on ``meta`` is an error."""
    expected = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, tensor in state.items():  # assignment would take any shape or dtype: check against the skeleton
        want = expected.get(name)
        if want is not None and (want.shape != tensor.shape or want.dtype != tensor.dtype):
            raise HiercompError(f"{weights}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)} but hiercomp.json "
                                f"and config.json make it {want.dtype} {tuple(want.shape)}; the folder's files "
                                "disagree — compress the model again")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise HiercompError(f"{weights} does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); compress the model again")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if getattr(model.config, "tie_word_embeddings", False) and getattr(head, "weight", None) is not None:
        # Assignment gave the tied modules two Parameter objects on one storage. A compressed head has no weight
        # to tie: tie_weights would hang the embedding table on it as a parameter it never reads (and state_dict
        # would list it).
        model.tie_weights()
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if empty:
        raise HiercompError(f"{weights} does not hold {empty[:3]}; compress the model again")


def load_compressed(path: str | Path, runtime: str = "fast") -> nn.Module:
    """The model saved at ``path``, built on ``meta`` and filled with the stored tensors only (no dense random
    init; peak memory about the file plus one layer's kernel conversion).

    ``runtime``: ``"fast"`` attaches each compressed layer's kernel (:mod:`hiercomp.layers.kernels`; integer
    grids then hold their codes once, in the kernel's form), ``"reference"`` computes every layer through its
    ``dequantize`` (the exact stored form, slow).
    """
    from hiercomp.layers.kernels import RUNTIMES, set_runtime

    if runtime not in RUNTIMES:
        raise HiercompError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    path = Path(path)
    info = read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise HiercompError(f"{path} has no {WEIGHTS_FILE}; the folder is incomplete — compress the model again")
    verify_structure(path, info)
    verify_files(path, info)
    model = build_skeleton(path, info, meta=True)
    try:
        state = read_tensors(weights, mapped=sparse_read_names(model))
    except Exception as err:
        raise HiercompError(f"{weights} is damaged ({str(err).splitlines()[0]}); compress the model again") from None
    for alias, stored in info.get("aliases", {}).items():
        if stored not in state:
            raise HiercompError(f"{weights} has no tensor {stored!r} (hiercomp.json ties {alias} to it); "
                                "compress the model again")
        state[alias] = state[stored]
    fill_state(model, state, weights)
    del state
    model.eval()
    if runtime == "fast":
        set_runtime(model, "fast", release=True)
    return model


def safetensors_header_bytes(path: str | Path) -> int:
    """Size of a safetensors file's header (8-byte length + JSON), i.e. what is not tensor data."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")
