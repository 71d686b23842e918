"""Compress a model larger than memory: one block at a time, straight from its safetensors shards.

``hiercomp.compress(folder, ..., stream=True)`` (``hiercomp compress MODEL --stream``):

1. the model is built on ``meta`` (:func:`hiercomp.io.saved.parameters_on_meta`: no weight is allocated; the
   rotary buffers are computed as usual), and each tensor's place in the shards is read from their headers;
2. with calibration data, the tensors outside the blocks that the forward up to the first block uses (the
   embedding, the final norm) are read, the first block's inputs are captured, and those tensors go back to
   ``meta`` before the first block is read;
3. the engine's block loop (:func:`hiercomp.engine.compress_model`, the same code as the in-memory path) runs
   with a :class:`ShardStream`: before each block it reads that block's tensors from the shards, after it it
   writes the block's state (packed layers) into a part file inside the atomic temporary output folder and
   puts the block back on ``meta``;
4. ``model.safetensors`` is assembled from the part files and, for what was never read (the embedding, the final
   norm, a dense ``lm_head``, blocks after the last compressed one), straight from the source shards in chunks;
   the tensors are ordered and the header written as safetensors' own ``save_file`` does, so the file is the
   in-memory path's byte for byte; then the folder's other files are written as :meth:`CompressedModel.save`
   writes them, and the temporary folder is renamed.

Peak resident memory is therefore about: the process with torch and transformers imported, plus the largest of
(the embedding, during capture) and (one block's dense weights + the method's work space, e.g. GPTQ's
``in_features²`` Hessian and its inverse + the calibration activations of one block's inputs and outputs), plus a
packed block while it is written. benchmarks/scale.py measures it against this bound.

Tensors are read by one seek and ``readinto`` each, never through an mmap (whose touched pages would count as
resident as well as the copy). Supported: causal LMs whose checkpoint names match the model's state dict (the
Llama family: Llama, Qwen2, Mistral), methods without a whole-model step (rtn, gptq, awq, hqq, sparsegpt, wanda,
...; not bitstack, depth pruning or a budget search, which need the whole model), and ``resume`` is not combined
with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.io.saved import _DTYPES, MAX_HEADER_BYTES, SAFETENSORS_METADATA, WEIGHTS_FILE
from hiercomp.layers.kernels import return_freed_memory

PARTS = ".stream-parts"  # inside the atomic temporary output folder; removed before the rename
CHUNK_BYTES = 16 * 2**20
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class ShardReader:
    """Single tensors of one or more safetensors files, located by their headers and read on demand."""

    def __init__(self, files: list[Path]) -> None:
        # name -> (file, absolute start, byte count, safetensors dtype, shape)
        self.entries: dict[str, tuple[Path, int, int, str, list[int]]] = {}
        for path in files:
            self.add(path)

    @classmethod
    def from_folder(cls, folder: Path) -> ShardReader:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HiercompError(f"{index} is damaged (no weight_map); restore the model folder") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            raise HiercompError(f"{folder} has no safetensors weights (model.safetensors or its index); streaming "
                                "reads safetensors shards — convert the checkpoint with save_pretrained first")
        return cls(files)

    def add(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > MAX_HEADER_BYTES:
                    raise ValueError(f"header length {header_len} is beyond safetensors' limit")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError) as err:
            raise HiercompError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); "
                                "restore the model folder") from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            self.entries[name] = (path, 8 + header_len + start, end - start, entry["dtype"], list(entry["shape"]))

    def read(self, name: str) -> torch.Tensor:
        path, start, nbytes, dtype, shape = self.entries[name]
        if dtype not in _DTYPES:
            raise HiercompError(f"{path}: tensor {name} has dtype {dtype}, which hiercomp does not read")
        tensor = torch.empty(shape, dtype=_DTYPES[dtype])
        if nbytes != tensor.numel() * tensor.element_size():
            raise HiercompError(f"{path}: tensor {name} has {nbytes} bytes for shape {shape}; restore the folder")
        if nbytes:
            with open(path, "rb") as f:
                f.seek(start)
                if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != nbytes:
                    raise HiercompError(f"{path} ends inside tensor {name}; restore the model folder")
        return tensor

    def copy_to(self, name: str, out: Any) -> None:
        """Append tensor ``name``'s bytes to the open file ``out`` in chunks (nothing of its size in memory)."""
        path, start, nbytes, _, _ = self.entries[name]
        buffer = bytearray(min(CHUNK_BYTES, max(nbytes, 1)))
        view = memoryview(buffer)
        with open(path, "rb") as f:
            f.seek(start)
            left = nbytes
            while left:
                got = f.readinto(view[: min(left, len(buffer))])
                if not got:
                    raise HiercompError(f"{path} ends inside tensor {name}; restore the model folder")
                out.write(view[:got])
                left -= got


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name, as the objects themselves (tied ones are one)."""
    return module.state_dict(keep_vars=True)


def to_meta(module: nn.Module, only: set[str] | None = None) -> None:
    """Put the parameters and persistent buffers of ``module`` (those named in ``only``, else all) back on
    ``meta``: their memory is released."""
    for name, tensor in _state_tensors(module).items():
        if only is not None and name not in only:
            continue
        owner, leaf = _owner(module, name)
        if isinstance(tensor, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(tensor.to("meta"), requires_grad=tensor.requires_grad)
        else:
            owner._buffers[leaf] = tensor.to("meta")


def on_meta(module: nn.Module) -> bool:
    return all(t.device.type == "meta" for t in _state_tensors(module).values())


class ShardStream:
    """The engine's block source (``compress_model(..., stream=...)``): reads each block before it is compressed,
    writes and releases it after."""

    def __init__(self, model: nn.Module, reader: ShardReader, blocks: list[tuple[int, str, nn.Module]],
                 parts: Path) -> None:
        self.model = model
        self.reader = reader
        self.blocks = {index: (name, module) for index, name, module in blocks}
        self.parts = parts
        self.capture_names: set[str] = set()
        self.read_blocks: list[int] = []  # in order, for the tests

    def materialise(self, module: nn.Module, prefix: str, only: set[str] | None = None) -> None:
        """Read ``module``'s tensors (those named in ``only``, else all) from the shards, in the dtype the
        skeleton gives them."""
        for name, tensor in _state_tensors(module).items():
            if tensor.device.type != "meta" or (only is not None and name not in only):
                continue
            full = f"{prefix}{name}"
            if full not in self.reader.entries:
                raise HiercompError(f"the checkpoint has no tensor {full}; streaming needs safetensors whose names "
                                    "match the model's state dict (save the model with save_pretrained)")
            value = self.reader.read(full)
            if tuple(value.shape) != tuple(tensor.shape):
                raise HiercompError(f"tensor {full} is {tuple(value.shape)} in the checkpoint but "
                                    f"{tuple(tensor.shape)} by config.json; restore the model folder")
            owner, leaf = _owner(module, name)
            value = value.to(tensor.dtype)
            if isinstance(tensor, nn.Parameter):
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=tensor.requires_grad)
            else:
                owner._buffers[leaf] = value

    def read_for_capture(self, names: set[str]) -> None:
        """The model's tensors the forward up to the first block uses; released when the first block is read."""
        self.materialise(self.model, "", names)
        self.capture_names = names

    def before_block(self, index: int, block: nn.Module) -> None:
        if self.capture_names:  # the first block's inputs are captured by now
            to_meta(self.model, self.capture_names)
            self.capture_names = set()
            return_freed_memory()
        name, _ = self.blocks[index]
        self.materialise(block, f"{name}.")
        self.read_blocks.append(index)

    def after_block(self, index: int, block: nn.Module) -> None:
        name, _ = self.blocks[index]
        write_part(self.parts / f"block-{index:05d}.safetensors",
                   {f"{name}.{key}": t for key, t in _state_tensors(block).items()})
        to_meta(block)
        # The block's freed weights and the method's work space lie between small live tensors; without giving
        # them back, fragmentation carries each block's peak into the next.
        return_freed_memory()


def write_part(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(path), metadata=SAFETENSORS_METADATA)


def safetensors_order(specs: dict[str, tuple[torch.dtype, list[int]]]) -> list[str]:
    """The order safetensors' ``save_file`` gives these tensors (by dtype, then name), asked of safetensors
    itself with one-element stand-ins, so the assembled file is what ``save_file`` would have written."""
    from safetensors.torch import save

    stand_ins = {name: torch.zeros(1, dtype=dtype) for name, (dtype, _) in specs.items()}
    raw = save(stand_ins, metadata=SAFETENSORS_METADATA)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


def assemble(out_file: Path, names: list[str], readers: list[ShardReader],
             dtypes: dict[str, torch.dtype]) -> None:
    """Write ``model.safetensors`` holding ``names`` (each from the first reader that has it, cast to
    ``dtypes[name]`` when stored otherwise), byte for byte as ``save_file`` would write the same tensors."""
    sources: dict[str, ShardReader] = {}
    for name in names:
        reader = next((r for r in readers if name in r.entries), None)
        if reader is None:
            raise HiercompError(f"the checkpoint has no tensor {name}; streaming needs safetensors whose names "
                                "match the model's state dict (save the model with save_pretrained)")
        sources[name] = reader
    specs = {n: (dtypes[n], sources[n].entries[n][4]) for n in names}
    order = safetensors_order(specs)
    header: dict[str, Any] = {"__metadata__": SAFETENSORS_METADATA}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(out_file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            reader = sources[name]
            if _DTYPES.get(reader.entries[name][3]) == specs[name][0]:
                reader.copy_to(name, f)
            else:  # stored in another dtype than the model computes in: one tensor converted in memory
                tensor = reader.read(name).to(specs[name][0]).contiguous()
                f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))


def _weights_dtype(reader: ShardReader, config: Any) -> torch.dtype:
    """The dtype ``from_pretrained`` gives the model by default: config.json's, else the checkpoint's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    stored = [_DTYPES.get(e[3]) for e in reader.entries.values()]
    return next((d for d in stored if d is not None and d.is_floating_point), torch.float32)


def build_meta_model(folder: Path, reader: ShardReader, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``folder``'s config with every parameter on ``meta`` (buffers such as rotary frequencies
    computed), in the dtype ``from_pretrained`` would load it in."""
    from transformers import AutoModelForCausalLM

    from hiercomp.io.hf import is_encoder_config, load_config
    from hiercomp.io.saved import parameters_on_meta

    config = load_config(str(folder), trust_remote_code)
    if is_encoder_config(config):
        raise HiercompError(f"{folder} is an encoder; --stream compresses causal LMs (Llama family) — "
                            "drop --stream for encoders")
    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise HiercompError(f"{folder}: unsupported architecture ({str(err).splitlines()[0]})") from None
    model = model.to(_weights_dtype(reader, config))
    model.eval()
    return model


def compress_streaming(
    model_dir: str | Path, recipe: Any, calibration: Any, *, out: str | Path, force: bool = False,
    propagate: str = "compressed", sequential: bool = True, batch_size: int = 8, progress: bool = True,
    trust_remote_code: bool = False,
) -> Any:
    """Compress the model in ``model_dir`` (a Hugging Face folder with safetensors weights) by ``recipe``
    (a Recipe, Plan, dict or YAML file) into ``out``, holding one block's weights at a time (see the module
    docstring). Returns a :class:`hiercomp.api.CompressedModel` whose ``model`` is the skeleton on ``meta``:
    load the result with ``hiercomp.load(out)``."""
    from transformers import AutoTokenizer

    from hiercomp.api import CompressedModel, _plan_from, model_context
    from hiercomp.calibration import calibration_tokens
    from hiercomp.engine import compress_model
    from hiercomp.hierarchy import compressed_layers, walk
    from hiercomp.io.atomic import atomic_dir, check_output_dir
    from hiercomp.io.saved import finish_folder, folder_info

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise HiercompError(f"--stream reads a model folder with safetensors shards; {model_dir} is not a folder")
    check_output_dir(out, force, protect=(folder,))
    if recipe is None:
        raise HiercompError("--stream needs a method, recipe or plan (a budget search or --drop needs the whole "
                            "model in memory)")
    reader = ShardReader.from_folder(folder)
    model = build_meta_model(folder, reader, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception:  # a folder without tokenizer files: fine when calibration comes as tokens
        tokenizer = None
    calibration = calibration_tokens(tokenizer, calibration, model_context(model))
    plan, recipe_obj = _plan_from(recipe, model)
    if plan.removed:
        raise HiercompError("--stream does not remove blocks (depth pruning needs the whole model); "
                            "drop 'remove:' from the recipe or compress without --stream")
    if not plan.kept_layers():
        raise HiercompError("the recipe matches no layer of this model; check its targets against "
                            "`hiercomp info MODEL`")
    if any(m.name == "bitstack" for m in plan.methods().values()):
        raise HiercompError("bitstack orders blocks across the whole model; compress it without --stream")
    hierarchy = walk(model)
    # Tied weights are one Parameter object in the skeleton: stored once, as save_compressed's aliases say.
    stored: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in _state_tensors(model).items():
        if id(tensor) in stored and tensor.numel():
            aliases[name] = stored[id(tensor)]
        else:
            stored.setdefault(id(tensor), name)
    plan_methods = plan.methods()
    with atomic_dir(out, force) as tmp:
        parts = tmp / PARTS
        stream = ShardStream(model, reader, [(b.index, b.name, b.module) for b in hierarchy.blocks], parts)
        for lin in hierarchy.outside:  # a compressed lm_head: read whole now, packed by the engine
            if lin.name in plan_methods:
                stream.materialise(model.get_submodule(lin.name), f"{lin.name}.")
        if calibration is not None:  # the embedding and norms, not the blocks nor lm_head (never run before them)
            skip = tuple(f"{b.name}." for b in hierarchy.blocks) + tuple(f"{lin.name}." for lin in hierarchy.outside)
            stream.read_for_capture({n for n in _state_tensors(model) if not n.startswith(skip) and n not in aliases})
        report = compress_model(model, plan, calibration, encoder=False, propagate=propagate, sequential=sequential,
                                batch_size=batch_size, progress=progress, hierarchy=hierarchy, stream=stream)
        # Whatever is still in memory outside the blocks (a packed lm_head) goes into a part file too.
        resident = {n: t for n, t in _state_tensors(model).items() if t.device.type != "meta" and n not in aliases}
        if resident:
            write_part(parts / "outside.safetensors", resident)
            to_meta(model)
        part_reader = ShardReader(sorted(parts.glob("*.safetensors")) if parts.is_dir() else [])
        final = _state_tensors(model)
        names = [n for n in final if n not in aliases]
        assemble(tmp / WEIGHTS_FILE, names, [part_reader, reader], {n: final[n].dtype for n in names})
        shutil.rmtree(parts, ignore_errors=True)
        cm = CompressedModel(model, tokenizer, False, recipe_obj, report, str(model_dir), plan=plan)
        meta, files = cm.folder_contents()
        compressed = {f"{name}." for name in compressed_layers(model)}
        dense = sum(final[n].numel() * final[n].element_size() for n in names
                    if not any(n.startswith(p) for p in compressed))
        meta["accounted_bytes"] = dense + report.compressed_bits / 8
        info = folder_info(model, aliases, meta)
        finish_folder(tmp, model, info, tokenizer, files)
    return cm

