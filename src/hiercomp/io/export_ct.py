"""Export to compressed-tensors: the format llm-compressor writes and vLLM serves (``pack-quantized``).

The mapping from our grid is exact. We store codes q in 0..2^b-1 and w = s * (q - z) with a float16 scale s and
an integer zero z (symmetric: z = 2^(b-1)); compressed-tensors stores signed codes q' in -2^(b-1)..2^(b-1)-1 and
w = s * (q' - z'), without z' when symmetric. So q' = q - 2^(b-1) and z' = z - 2^(b-1), and (q' - z') = (q - z).
The scale is written in the model's dtype: float32 and float16 hold a float16 scale exactly (and s * (q - z) is
exact in float32: an 11-bit mantissa times an integer of at most 8 bits), bfloat16 does not (that case is
measured and reported, not claimed exact). The library itself packs: we hand it the dense weight s * (q - z), our
scales and zeros, and it recomputes q' = round(w / s + z'), which returns our codes exactly; every layer is then
unpacked again by the library and compared with ours, and the largest difference is reported per layer.

What the format cannot express: float zero points (HQQ), groups that do not divide the input width (the library
needs whole groups: stories260K's MLP width 172 at g=32), GPT-2's Conv1D, and every non-grid layer (sparse,
low-rank, HLQ, BitStack). Those are stored dense (dequantized, exact) and named, or refused with ``strict``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hiercomp.errors import HiercompError

PACKED_FORMAT = "pack-quantized"


@dataclass
class ExportResult:
    """What an export wrote: the folder, per-layer stored form and the largest weight difference it adds."""

    out: Path
    format: str
    exact: dict[str, str] = field(default_factory=dict)  # layer -> how it is stored (e.g. "int4 g32 asym", "Q4_0")
    dense: dict[str, str] = field(default_factory=dict)  # layer -> why the format could not express it
    requantized: dict[str, str] = field(default_factory=dict)  # layer -> the nearer type it was rounded to
    max_abs_error: dict[str, float] = field(default_factory=dict)  # layer -> max |exported - ours| of the weight
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "format": self.format, "exact": self.exact, "dense": self.dense,
                "requantized": self.requantized, "max_abs_error": self.max_abs_error, "notes": self.notes}


def summarize_names(names: list[str], limit: int = 4) -> str:
    """'model.layers.*.mlp.down_proj (5)' style, so a one-line error stays one line on a 30-block model."""
    counts = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    parts = [f"{p} ({c})" if c > 1 else p for p, c in counts.most_common()]
    more = f", … {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def layer_kind(layer: Any) -> str:
    return getattr(layer, "kind", type(layer).__name__)


def load_stored(path: str | Path) -> Any:
    """``hiercomp.load`` on the reference path: exports read the stored codes and scales, so building the fast
    kernels (a conversion per layer) would only cost time. (``runtime`` is new in hiercomp.load; older ones
    have only the reference path.)"""
    import inspect

    from hiercomp.api import load

    if "runtime" in inspect.signature(load).parameters:
        return load(path, runtime="reference")
    return load(path)


def ct_scheme(layer: Any) -> tuple[int, int | None, bool] | str:
    """(bits, group_size or None for channel, symmetric) when compressed-tensors can hold ``layer`` exactly,
    else the reason it cannot."""
    from hiercomp.layers.quantized import QuantizedLinear

    if not isinstance(layer, QuantizedLinear):
        return f"{layer_kind(layer)} layers are not integer grids"
    if layer.zero_format != "int":
        return "float16 zero points (HQQ) are not integer zeros"
    if layer.origin != "linear":
        return "Conv1D (GPT-2) is not an nn.Linear"
    g = layer.grid.group_size
    if g is not None and g < layer.in_features and layer.in_features % g:
        return f"groups of {g} do not divide the input width {layer.in_features}"
    group = None if g is None or g >= layer.in_features else g
    return layer.grid.bits, group, layer.grid.symmetric


def scheme_name(bits: int, group: int | None, symmetric: bool) -> str:
    return f"int{bits} {'channel' if group is None else f'g{group}'} {'sym' if symmetric else 'asym'}"


def _require_library() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise HiercompError("the compressed-tensors export needs the 'compressed-tensors' package: "
                            "pip install 'hiercomp[export]' (or pip install compressed-tensors)") from None


def export_compressed_tensors(path: str | Path, out: str | Path, force: bool = False,
                              strict: bool = False) -> ExportResult:
    """Write the compressed folder ``path`` as a compressed-tensors (pack-quantized) folder that vLLM serves and
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads (with compressed-tensors installed)."""
    _require_library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    from hiercomp.hierarchy import compressed_layers, set_module
    from hiercomp.io.atomic import atomic_dir, check_output_dir

    check_output_dir(out, force)
    cm = load_stored(path)
    model = cm.model
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    result = ExportResult(Path(out), "compressed-tensors")
    layers = compressed_layers(model)
    schemes: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, layer in layers.items():
        scheme = ct_scheme(layer)
        if isinstance(scheme, str):
            result.dense[name] = scheme
        else:
            schemes.setdefault(scheme, []).append(name)
            result.exact[name] = scheme_name(*scheme)
    if result.dense and strict:
        raise HiercompError(f"compressed-tensors cannot express {len(result.dense)} layer(s): "
                            f"{summarize_names(list(result.dense))} ({'; '.join(sorted(set(result.dense.values())))});"
                            " 'hf' (dense) takes every layer, 'gguf' takes them as float tensors — rerun without "
                            "--strict to store them dense")
    if not schemes:
        raise HiercompError(f"no layer of {path} is an integer grid compressed-tensors can hold "
                            f"({'; '.join(sorted(set(result.dense.values())))}); use --format hf")
    grids = {name: (layer.scales.float(), layer.zeros().float(), layer.grid.bits, layer.dequantize())
             for name, layer in layers.items() if name in result.exact}
    for name, layer in layers.items():  # dense weights first; the library then attaches scales to the grid ones
        set_module(model, name, layer.to_linear().to(dtype))
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=names,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                     strategy="channel" if group is None else "group", group_size=group))
        for i, ((bits, group, sym), names) in enumerate(sorted(schemes.items(), key=str))
    }
    qconfig = QuantizationConfig(config_groups=config_groups, format=PACKED_FORMAT,
                                 quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qconfig, show_progress=False)
    modules = dict(model.named_modules())
    for name, (scale, zero, bits, _) in grids.items():
        module = modules[name]
        offset = 2 ** (bits - 1)  # our unsigned codes and zeros -> the library's signed ones
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = (zero - offset).round().to(torch.int8).reshape(
                module.weight_zero_point.shape)
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, PACKED_FORMAT)
    compressor.compress_model(model)
    for name, (_, _, _, ours) in grids.items():  # read back through the library: what a loader will compute
        module = modules[name]
        state = {k: v for k, v in module.state_dict().items()}
        back = PackedQuantizationCompressor.decompress(state, module.quantization_scheme)["weight"]
        result.max_abs_error[name] = float((back.float() - ours).abs().max())
    for name in result.dense:
        result.max_abs_error[name] = 0.0 if dtype == torch.float32 else float(
            (modules[name].weight.float() - layers[name].dequantize()).abs().max())
    if dtype == torch.bfloat16:
        result.notes.append("bfloat16 model: scales are stored in bfloat16, which rounds their float16 values")
    if result.dense:
        result.notes.append(f"stored dense (not expressible in compressed-tensors): "
                            f"{summarize_names(list(result.dense))}")
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(tmp)
        (tmp / "hiercomp_export.json").write_text(json.dumps({"exported_from": str(path), **result.to_dict()},
                                                             indent=1))
    return result


def load_with_library(path: str | Path) -> torch.nn.Module:
    """Read a compressed-tensors folder with the library's own decompressor, on real tensors.

    ``from_pretrained`` is the loader to use for symmetric exports. For asymmetric ones, transformers 5 with
    compressed-tensors 0.20 builds the empty model on the meta device, where the library does not pack the zero
    points' shape, so loading fails with a size mismatch (vllm-project/llm-compressor#1618) although the file is
    what the library itself wrote. This reader does the same steps on real tensors: apply the config, compress
    (which gives every packed tensor its stored shape), load the file's tensors, decompress.
    """
    _require_library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    del config.quantization_config
    qconfig = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in QuantizationConfig.model_fields})
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    apply_quantization_config(model, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise HiercompError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    compressor.decompress_model(model)
    model.tie_weights()
    return model.eval()
