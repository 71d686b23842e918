"""Export a compressed Llama-family model to one GGUF file (llama.cpp), written with the ``gguf`` library.

Where our grid and a GGUF block type coincide the export is exact: the stored codes and float16 scales are
copied into the blocks, not requantized. GGUF blocks hold 32 consecutive weights of a row with one float16
scale d, so a layer fits when its groups are whole multiples of 32 (or one per row, per channel) and its input
width is a multiple of 32. With D = q - z our (integer) code minus zero, w = s * D:
- D in -8..7 (symmetric 2-4-bit, and an asymmetric layer whose zeros happen to allow it): Q4_0, x = (q4 - 8) * d;
- D in -16..15 (symmetric 5-bit, asymmetric 2-4-bit): Q5_0, x = (q5 - 16) * d;
- D in -128..127 (symmetric 6-8-bit, asymmetric 5-7-bit): Q8_0, x = q8 * d.
All three are exact: d = s bit for bit, and d * D is exact in float32 like ours. ``prefer="compact"`` stores
asymmetric 2-4-bit (5-bit) layers as Q4_1 (Q5_1), x = q * d + m, 0.5 bit per weight smaller than Q5_0 (Q8_0),
at the price of rounding m = -s * z to float16; so are HQQ's float zeros in either mode. Everything else
(asymmetric 8-bit, groups that are not multiples of 32) is requantized by the ``gguf`` library's reference
quantizer to the nearest type of the same bit width; sparse, low-rank, HLQ and BitStack layers, and rows whose
width is not a multiple of 32 (GGUF cannot block them), are stored dense in the model's float type. Each layer's
largest added weight error is measured by reading the blocks back with ``gguf.quants.dequantize``.

Llama's q/k rows are permuted as llama.cpp's converter does (its rope pairs dimensions (i, i+1), Hugging Face's
(i, i+d/2)); a row permutation moves whole rows with their scales, so it keeps every layer exact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiercomp.errors import HiercompError
from hiercomp.io.export_ct import ExportResult, layer_kind, load_stored, summarize_names

GGUF_ARCHS = ("llama", "mistral")
PREFER = ("exact", "compact")
BLOCK = 32
ROPE_TYPES = ("default", "linear")
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise HiercompError("the GGUF export needs the 'gguf' package: pip install 'hiercomp[export]' "
                            "(or pip install gguf)") from None
    return gguf


def check_gguf_architecture(config: Any, removed: list | None = None) -> None:
    """One-line refusal for what GGUF's llama architecture cannot describe."""
    kind = getattr(config, "model_type", "?")
    if kind not in GGUF_ARCHS:
        raise HiercompError(f"GGUF export describes Llama-family causal LMs ({', '.join(GGUF_ARCHS)}); this model is "
                            f"'{kind}' — use --format hf or --format compressed-tensors")
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        raise HiercompError(f"GGUF export handles rope types {ROPE_TYPES}; this model uses "
                            f"'{rope.get('rope_type')}' — use --format hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise HiercompError("GGUF export of Llama layers with biases is not supported — use --format hf")
    if getattr(config, "sliding_window", None):
        raise HiercompError("GGUF's llama architecture has no sliding-window attention — use --format hf")
    if removed:
        raise HiercompError("this model had blocks or sub-blocks removed (depth pruning), which GGUF's llama "
                            "architecture cannot describe — use --format hf")


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k: within each head, (i, i+d/2) pairs become (2i, 2i+1)."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


@dataclass
class EncodedTensor:
    data: np.ndarray  # the bytes (quantized) or the float array (dense)
    qtype: Any  # gguf.GGMLQuantizationType
    exact: bool
    how: str  # e.g. "Q4_0 (exact)", "Q4_1 (min rounded to float16)", "F32 (dense: sparse layer)"


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) codes -> (..., 16) bytes: low nibble = q[j], high nibble = q[j+16] (ggml's layout)."""
    q = q.astype(np.uint8) & np.uint8(0x0F)
    return q[..., :16] | (q[..., 16:] << np.uint8(4))


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit codes -> (..., 4) bytes holding bit 4 of each, little-endian (ggml's qh)."""
    return np.packbits((q.astype(np.uint8) >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")


def pack_blocks(qtype_name: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks of one type from codes q (rows, nblk, 32), scales d (rows, nblk, 1) and mins m: (rows, bytes)."""
    parts = [_fp16_bytes(d)]
    if qtype_name in ("Q4_1", "Q5_1"):
        parts.append(_fp16_bytes(m))
    if qtype_name in ("Q5_0", "Q5_1"):
        parts.append(_high_bits(q))
    if qtype_name == "Q8_0":
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        parts.append(_nibbles(q))
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(blocks.shape[0], -1)


def _dense(weight: torch.Tensor, dtype: torch.dtype, why: str) -> EncodedTensor:
    gguf = _gguf()
    if dtype == torch.float16:
        return EncodedTensor(weight.half().numpy(), gguf.GGMLQuantizationType.F16, True, f"F16 ({why})")
    # bfloat16 weights are stored as float32 (exact; numpy has no bfloat16)
    return EncodedTensor(weight.float().numpy(), gguf.GGMLQuantizationType.F32, True, f"F32 ({why})")


def _requantize(weight: torch.Tensor, qtype_name: str, why: str) -> EncodedTensor:
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[qtype_name]
    data = gguf.quants.quantize(weight.float().numpy(), qtype)
    return EncodedTensor(data, qtype, False, f"{qtype_name} (requantized: {why})")


def encode_layer(layer: Any, weight: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype,
                 prefer: str = "exact") -> EncodedTensor:
    """The GGUF tensor for one compressed layer (rows: a row permutation to apply first, or None)."""
    from hiercomp.layers.quantized import QuantizedLinear
    from hiercomp.quant.grid import expand_to_columns

    gguf = _gguf()
    out_features, in_features = weight.shape
    if not isinstance(layer, QuantizedLinear):
        return _dense(weight, dtype, f"dense: {layer_kind(layer)} layers are not integer grids")
    if in_features % BLOCK:
        return _dense(weight, dtype, f"dense: width {in_features} is not a multiple of GGUF's 32-weight blocks")
    g = layer.grid.group_size
    bits = layer.grid.bits
    float_zero = layer.zero_format != "int"
    if g is not None and g < in_features and g % BLOCK:
        name = ("Q4_0" if layer.grid.symmetric else "Q4_1") if bits <= 4 else (
            ("Q5_0" if layer.grid.symmetric else "Q5_1") if bits == 5 else "Q8_0")
        return _requantize(weight, name, f"groups of {g} are not whole 32-weight blocks")
    codes = layer.codes().float()
    scale = expand_to_columns(layer.scales.float(), in_features, g)
    zero = expand_to_columns(layer.zeros().float(), in_features, g)
    if rows is not None:
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
    nblk = in_features // BLOCK
    d = scale.reshape(out_features, nblk, BLOCK)[..., :1].numpy()
    q = codes.reshape(out_features, nblk, BLOCK)
    z = zero.reshape(out_features, nblk, BLOCK)
    compact = float_zero or (prefer == "compact" and not layer.grid.symmetric and bits <= 5)
    if compact and bits <= 5:
        # x = q * d + m with m = -s * z rounded to float16: the one inexact step
        name = "Q4_1" if bits <= 4 else "Q5_1"
        m = (-(torch.from_numpy(d)) * z[..., :1]).numpy()
        data = pack_blocks(name, q.numpy(), d, m)
        why = "float zero" if float_zero else "asymmetric, compact"
        return EncodedTensor(data, gguf.GGMLQuantizationType[name], False, f"{name} (min rounded to float16; {why})")
    if float_zero:
        return _requantize(weight, "Q8_0", "float zero points")
    diff = (q - z).numpy()
    lo, hi = diff.min(), diff.max()
    for name, offset, low, high in (("Q4_0", 8, -8, 7), ("Q5_0", 16, -16, 15), ("Q8_0", 0, -128, 127)):
        if low <= lo and hi <= high:
            return EncodedTensor(pack_blocks(name, diff + offset, d), gguf.GGMLQuantizationType[name], True,
                                 f"{name} (exact)")
    return _requantize(weight, "Q8_0", "code - zero exceeds int8 (asymmetric 8-bit)")


# -- tokenizer metadata ------------------------------------------------------------------------------------------

def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex that splits text before BPE)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's spelling (llama-vocab.cpp); "gpt2" is refused as an unknown pre-tokenizer
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    text = json.dumps(steps)
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    return "default"


def add_tokenizer(writer: Any, tokenizer: Any) -> list[str]:
    """Tokens, scores/merges, token types, special ids and the chat template. Returns notes."""
    gguf = _gguf()
    notes: list[str] = []
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise HiercompError("GGUF export needs a fast (tokenizer.json) tokenizer in the model folder")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise HiercompError(f"GGUF export writes BPE tokenizers; this one is {model.get('type')} — use --format hf")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for text, idx in vocab.items():
        tokens[idx] = text
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    user = {a["id"] for a in spec.get("added_tokens", []) if not a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    T = gguf.TokenType
    if model.get("byte_fallback"):
        # SentencePiece-style vocabulary (Llama 2, llama2.c's stories): llama.cpp's "llama" tokenizer merges the
        # adjacent pair whose result has the highest score, so a merge's rank becomes its result's score.
        rank = {m.replace(" ", ""): i for i, m in reversed(list(enumerate(merges)))}
        scores = [-float(rank[t]) if t in rank else -float(len(merges) + i) for i, t in enumerate(tokens)]
        types = [T.CONTROL if i in special else T.USER_DEFINED if i in user else
                 T.BYTE if t.startswith("<0x") and len(t) == 6 else T.NORMAL for i, t in enumerate(tokens)]
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = T.UNKNOWN
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        normalizer = json.dumps(spec.get("normalizer") or {})
        writer.add_add_space_prefix('"Prepend"' in normalizer)
    else:
        writer.add_tokenizer_model("gpt2")
        pre = _pre_tokenizer_name(spec)
        if pre == "default":
            notes.append("pre-tokenizer not recognised: llama.cpp uses its default split")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([T.CONTROL if i in special else T.USER_DEFINED if i in user else T.NORMAL
                                for i in range(len(tokens))])
        if not merges:
            notes.append("the BPE tokenizer has no merges: llama.cpp refuses such a vocabulary")
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return notes


# -- the export --------------------------------------------------------------------------------------------------

def _file_type(gguf: Any, qtypes: list[Any]) -> Any:
    counts: dict[str, int] = {}
    for q in qtypes:
        counts[q.name] = counts.get(q.name, 0) + 1
    main = max(counts, key=lambda k: (k not in ("F32", "F16"), counts[k]))
    return getattr(gguf.LlamaFileType, f"MOSTLY_{main}", gguf.LlamaFileType.ALL_F32)


EMBED_TYPES = ("F32", "F16", "Q8_0")


def export_gguf(path: str | Path, out: str | Path, force: bool = False, strict: bool = False,
                prefer: str = "exact", embed_type: str | None = None) -> ExportResult:
    """Write the compressed folder ``path`` (a Llama-family model) as one GGUF file ``out`` for llama.cpp.

    ``embed_type``: the embedding (and untied output) matrix is kept in the model's float type by default, as
    hiercomp keeps it; "F16" or "Q8_0" round it as llama.cpp's own quantized files do (the output projection
    reads it every token: on a small model it is most of the bytes read per decoded token).
    """
    gguf = _gguf()
    from hiercomp.hierarchy import compressed_layers
    from hiercomp.io.hf import load_config

    if prefer not in PREFER:
        raise HiercompError(f"prefer must be one of {PREFER}, got {prefer!r}")
    if embed_type is not None and embed_type not in EMBED_TYPES:
        raise HiercompError(f"embed_type must be one of {EMBED_TYPES}, got {embed_type!r}")
    out = Path(out)
    if out.exists() and not force:
        raise HiercompError(f"output file {out} already exists; choose another --out or pass --force to replace it")
    if out.is_dir():
        raise HiercompError(f"{out} is a folder; the GGUF export writes one file (e.g. --out model.gguf)")
    check_gguf_architecture(load_config(str(path)))  # before the (slower) load of the packed model
    cm = load_stored(path)
    model, config = cm.model, cm.model.config
    check_gguf_architecture(config, cm.extra.get("removed"))
    if cm.tokenizer is None:
        raise HiercompError(f"{path} has no tokenizer files; GGUF needs the tokenizer — save the model with it")
    layers = compressed_layers(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    from hiercomp.layers.quantized import QuantizedLinear

    not_grid = [n for n, layer in layers.items() if not isinstance(layer, QuantizedLinear)]
    if not_grid and strict:
        kinds = sorted({layer_kind(layers[n]) for n in not_grid})
        raise HiercompError(f"GGUF has no block type for {len(not_grid)} layer(s): {summarize_names(not_grid)} "
                            f"({', '.join(kinds)}); 'hf' takes them dense — rerun without --strict to store them "
                            "as float tensors")
    result = ExportResult(out, "gguf")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    qtypes: list[Any] = []
    state = model.state_dict()

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(Path(str(cm.source)).name or "hiercomp")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        rope = getattr(config, "rope_parameters", None) or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_vocab_size(config.vocab_size)
        result.notes += add_tokenizer(writer, cm.tokenizer)

        def dense_tensor(name: str, tensor: torch.Tensor) -> None:
            enc = _dense(tensor.detach(), dtype if tensor.dim() > 1 else torch.float32, "not compressed")
            writer.add_tensor(name, enc.data, raw_dtype=enc.qtype)
            qtypes.append(enc.qtype)

        def linear_tensor(hf_name: str, gguf_name: str, rows: torch.Tensor | None) -> None:
            layer = layers.get(hf_name)
            if layer is None:
                weight = state[f"{hf_name}.weight"].float()
                dense_tensor(gguf_name, weight if rows is None else weight[rows])
                return
            weight = layer.dequantize()
            weight = weight if rows is None else weight[rows]
            enc = encode_layer(layer, weight, rows, dtype, prefer)
            writer.add_tensor(gguf_name, enc.data, raw_dtype=enc.qtype)
            qtypes.append(enc.qtype)
            back = gguf.quants.dequantize(enc.data, enc.qtype).reshape(weight.shape)
            result.max_abs_error[hf_name] = float(np.abs(back.astype(np.float32) - weight.numpy()).max())
            (result.dense if enc.how.startswith(("F32", "F16")) else result.exact
             if enc.exact and result.max_abs_error[hf_name] == 0 else result.requantized)[hf_name] = enc.how

        def embedding_tensor(name: str, tensor: torch.Tensor) -> None:
            if embed_type in (None, "F32") or tensor.shape[1] % BLOCK:
                dense_tensor(name, tensor)
                return
            enc = (_dense(tensor.detach().float(), torch.float16, "embedding") if embed_type == "F16" else
                   _requantize(tensor.detach(), embed_type, "embedding"))
            writer.add_tensor(name, enc.data, raw_dtype=enc.qtype)
            qtypes.append(enc.qtype)
            back = gguf.quants.dequantize(enc.data, enc.qtype).reshape(tensor.shape)
            err = float(np.abs(back.astype(np.float32) - tensor.detach().float().numpy()).max())
            result.notes.append(f"{name} stored as {embed_type} (max abs error {err:.3g})")

        embedding_tensor("token_embd.weight", state["model.embed_tokens.weight"])
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            for hf, short in HF_TO_GGUF.items():
                rows = (rope_permutation(config.num_attention_heads * head_dim, n_head) if short == "attn_q" else
                        rope_permutation(n_kv * head_dim, n_kv) if short == "attn_k" else None)
                if short.endswith("norm"):
                    dense_tensor(f"blk.{i}.{short}.weight", state[f"{prefix}{hf}.weight"].float())
                else:
                    linear_tensor(f"{prefix}{hf}", f"blk.{i}.{short}.weight", rows)
        dense_tensor("output_norm.weight", state["model.norm.weight"].float())
        # A compressed head is written as its own output matrix even where the config ties it to the embedding
        # (llama.cpp uses output.weight when present, token_embd otherwise): dropping it would run the dense table.
        if "lm_head" in layers:
            linear_tensor("lm_head", "output.weight", None)
        elif not getattr(config, "tie_word_embeddings", False):
            embedding_tensor("output.weight", state["lm_head.weight"])
        writer.add_file_type(_file_type(gguf, qtypes))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if result.dense:
        result.notes.append(f"stored as float tensors: {summarize_names(list(result.dense))}")
    if result.requantized:
        worst = max(result.requantized, key=lambda n: result.max_abs_error[n])
        result.notes.append(f"requantized {len(result.requantized)} layer(s); largest added weight error "
                            f"{result.max_abs_error[worst]:.3g} ({worst}: {result.requantized[worst]})")
    return result
