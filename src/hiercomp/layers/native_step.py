"""A whole decode step of a fast-runtime Llama-family model in one native call (decode.cpp).

With the lean blocks (fused_block.py) a 4-bit SmolLM2 step still spent more time around its kernels than in them:
~35 small torch ops a block and the Python between them (decode_breakdown.md: 6.5 of 11 ms). :class:`NativeStep`
runs every decoder block of a batch-1 decode step in native code, on the same kernels with the same arguments,
and leaves Python only the embedding lookup, the rotary table's row and the output head. It writes the new
token's keys and values into the buffers of hiercomp's :class:`~hiercomp.kv.growing.GrowingCache`, so the cache
stays transformers' full cache, usable as before.

It is taken (:func:`build`) only where it computes what transformers' blocks would: Llama, Mistral without a
sliding window and Qwen2 blocks that carry the lean forward, float32 norms and activations, no hooks, eval mode,
an ``sdpa``/``eager`` attention, and a GrowingCache of batch 1 filled by a prefill. Projections that are native
grids or plain float32 ``nn.Linear`` layers run in native code; any other (another method's kernel: int8 codes,
low-rank, HLQ, a rotation) is called back through its module, so a mixed plan still gets the native small ops.
Anything else (another dtype, a compressed KV cache) keeps the torch path. ``HIERCOMP_NO_NATIVE_STEP=1`` turns
it off. The logits equal the torch path's within float rounding (attention's sums and exp in another order), not
bit for bit.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
from torch import nn

from hiercomp.layers import gemv
from hiercomp.layers.fused_block import ATTENTION, BlockPlan, decoder_blocks, norm_eps
from hiercomp.layers.kernels import NativeLowBitKernel

_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double


class _Proj(ctypes.Structure):  # decode.cpp's HcProj
    _fields_ = [("packed", _ptr), ("scale", _ptr), ("zero", _ptr), ("dense", _ptr), ("bias", _ptr),
                ("out_features", _i64), ("in_features", _i64), ("padded", _i64), ("group", _i64), ("bits", _i64),
                ("threads", _i64), ("call_in", _ptr), ("call_out", _ptr), ("call_index", _i64)]


class _Block(ctypes.Structure):  # decode.cpp's HcBlock
    _fields_ = [("proj", _Proj * 7), ("n_qkv", _i64), ("n_gate_up", _i64), ("norm_attn", _ptr), ("norm_mlp", _ptr),
                ("eps_attn", _f64), ("eps_mlp", _f64), ("keys", _ptr), ("values", _ptr), ("capacity", _i64)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, _i64)  # decode.cpp's HcCallback


class _Shape(ctypes.Structure):  # decode.cpp's HcShape
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("intermediate", _i64),
                ("threads", _i64), ("scaling", _f64)]


def disabled() -> bool:
    """``HIERCOMP_NO_NATIVE_STEP`` is set (to anything but 0): decode through the torch blocks."""
    return os.environ.get("HIERCOMP_NO_NATIVE_STEP", "") not in ("", "0")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class NativeStep:
    """The decoder blocks of one model as native structures, bound to one GrowingCache; call with each new token.

    Build with :func:`build` (None where the model or cache does not qualify). ``step(token)`` returns the logits
    (1, vocab) of the token at position ``cache length``, writes its keys and values into the cache and advances
    it; :meth:`sync` makes the cache's ``keys``/``values`` views cover what the steps wrote (call it before anything
    else reads the cache; ``__call__`` does not, to keep a step to one native call)."""

    def __init__(self, module: nn.Module, blocks: list[nn.Module], cache: Any, length: int,
                 lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.cache, self.length = cache, length
        base = module.model
        self.embed = module.get_input_embeddings()
        self.head = module.get_output_embeddings()
        self.rotary = base.rotary_emb
        self.final_norm = _f32(base.norm.weight)
        self.final_eps = norm_eps(base.norm)
        plan: BlockPlan = blocks[0]._hiercomp_plan
        config = module.config
        self.hidden_size = config.hidden_size
        self.shape = _Shape(self.hidden_size, plan.heads, plan.kv_heads, plan.head_dim, config.intermediate_size,
                            torch.get_num_threads(), plan.scaling)
        self.keep: list[torch.Tensor] = []  # tensors the structures point into (converted copies included)
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # layers computed through the callback
        self.error: BaseException | None = None
        self.callback = _CALLBACK(self._call)
        self.layer_ids = [block._hiercomp_plan.layer_idx for block in blocks]
        self.blocks = (_Block * len(blocks))()
        for spec, block in zip(self.blocks, blocks):
            self._fill(spec, block)
        self._point_at_cache()
        self.x = torch.empty(self.hidden_size)
        self.out = torch.empty(1, 1, self.hidden_size)

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        self.keep.append(t)
        return t.data_ptr()

    def _proj(self, spec: _Proj, grid: gemv.PackedGrid | None, weight: torch.Tensor | None,
              bias: torch.Tensor | None) -> None:
        spec.bias = self._ptr(_f32(bias))
        if grid is not None:
            spec.packed, spec.scale, spec.zero = (self._ptr(t) for t in (grid.packed, grid.scale, grid.zero))
            spec.out_features, spec.in_features = grid.out_features, grid.in_features
            spec.padded, spec.group, spec.bits = grid.padded, grid.group, grid.bits
            spec.threads = 1 if grid.out_features * grid.padded < gemv.PARALLEL_MIN else torch.get_num_threads()
        else:
            spec.dense = self._ptr(weight)
            spec.out_features, spec.in_features = weight.shape

    def _group(self, spec: _Block, first: int, projections: Any) -> int:
        """Fill proj[first:] from a fused_block._Projections; returns how many parts it took."""
        if projections.fused is not None:
            self._proj(spec.proj[first], projections.fused.grid, None, projections.fused.bias)
            return 1
        for i, layer in enumerate(projections.layers):
            self._layer(spec.proj[first + i], layer)
        return len(projections.layers)

    def _layer(self, spec: _Proj, layer: nn.Module) -> None:
        kernel = getattr(layer, "kernel", None)
        if isinstance(kernel, NativeLowBitKernel):
            self._proj(spec, kernel.grid, None, layer.bias)
        elif _plain_dense(layer):
            self._proj(spec, None, layer.weight, layer.bias)
        else:  # another method's kernel (int8, low-rank, HLQ, ...): the step calls back for it
            x, y = torch.empty(layer.in_features), torch.empty(layer.out_features)
            spec.call_in, spec.call_out = self._ptr(x), self._ptr(y)
            spec.out_features, spec.in_features = layer.out_features, layer.in_features
            spec.call_index = len(self.calls)
            self.calls.append((layer, x, y))

    def _call(self, index: int) -> int:
        """decode.cpp's callback: one projection the native step cannot compute, through its module."""
        try:
            layer, x, y = self.calls[index]
            y.copy_(layer(x.view(1, 1, -1)).view(-1))
            return 0
        except BaseException as err:  # noqa: BLE001 - an exception cannot cross the native frames: re-raised after
            self.error = err
            return 5

    def _fill(self, spec: _Block, block: nn.Module) -> None:
        plan: BlockPlan = block._hiercomp_plan
        spec.n_qkv = self._group(spec, 0, plan.qkv)
        self._layer(spec.proj[spec.n_qkv], block.self_attn.o_proj)
        spec.n_gate_up = self._group(spec, spec.n_qkv + 1, plan.gate_up)
        self._layer(spec.proj[spec.n_qkv + 1 + spec.n_gate_up], block.mlp.down_proj)
        spec.norm_attn = self._ptr(_f32(block.input_layernorm.weight))
        spec.norm_mlp = self._ptr(_f32(block.post_attention_layernorm.weight))
        spec.eps_attn, spec.eps_mlp = norm_eps(block.input_layernorm), norm_eps(block.post_attention_layernorm)

    def _point_at_cache(self) -> None:
        for spec, idx in zip(self.blocks, self.layer_ids):
            layer = self.cache.layers[idx]
            spec.keys, spec.values = layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr()
            spec.capacity = layer.key_buffer.shape[-2]
        self.capacity = min(spec.capacity for spec in self.blocks)  # tokens every layer's buffers hold

    def sync(self) -> None:
        """Set the cache's views to what the steps wrote."""
        for idx in self.layer_ids:
            self.cache.layers[idx].set_length(self.length)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, vocab) after ``token`` (one id)."""
        return self.head(self.hidden(token))[:, -1].float()

    @torch.no_grad()
    def hidden(self, token: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden state (1, 1, hidden) after ``token``: every block, the head not applied."""
        if self.length >= self.capacity:  # the buffers are full: grow them
            self.sync()
            for idx in self.layer_ids:
                self.cache.layers[idx].make_room(1)
            self._point_at_cache()
        x = self.x
        x.copy_(self.embed(token.view(1)).view(-1))
        cos, sin = self.rotary(x.view(1, 1, -1), torch.tensor([[self.length]]))
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        rc = self.lib.hc_decode_step(ctypes.byref(self.shape), self.blocks, len(self.blocks), x.data_ptr(),
                                     cos.data_ptr(), sin.data_ptr(), self.length, self.final_norm.data_ptr(),
                                     self.final_eps, self.out.data_ptr(), self.callback)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if rc:
            raise RuntimeError(f"hc_decode_step failed ({rc})")
        self.length += 1
        return self.out


def _plain_dense(layer: nn.Module) -> bool:
    """A float32 ``nn.Linear`` on the CPU: the native float32 GEMV computes it."""
    return type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and layer.weight.is_contiguous() \
        and layer.weight.device.type == "cpu"


def _projection_ok(layer: nn.Module) -> bool:
    """Native grids and plain dense layers run in the step, any other CPU projection through the callback."""
    # (A layer whose kernel holds its codes keeps the stored copy on the meta device: released, not elsewhere.)
    return all(t.device.type in ("cpu", "meta") for t in (*layer.parameters(), *layer.buffers()))


def _shapes(block: nn.Module) -> list[tuple[int, int]]:
    attn, mlp = block.self_attn, block.mlp
    layers = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return [(getattr(m, "out_features", -1), getattr(m, "in_features", -1)) for m in layers]


def _shapes_expected(hidden: int, plan: BlockPlan, intermediate: int) -> list[tuple[int, int]]:
    q, kv = plan.heads * plan.head_dim, plan.kv_heads * plan.head_dim
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (intermediate, hidden), (intermediate, hidden),
            (hidden, intermediate)]


def _group_ok(projections: Any) -> bool:
    return projections.fused is not None or all(map(_projection_ok, projections.layers))


def build(module: nn.Module, cache: Any, lib: ctypes.CDLL | None = None) -> NativeStep | None:
    """A NativeStep for ``module`` decoding with ``cache``, or None where the torch path must run (see the module's
    docstring for what qualifies). ``lib``: a variant from :func:`gemv.build_library` (tests)."""
    from hiercomp.kv.growing import GrowingCache, GrowingLayer

    if disabled() or not gemv.available() or module.training or not isinstance(cache, GrowingCache):
        return None
    base = getattr(module, "model", None)
    if not all(hasattr(base, n) for n in ("rotary_emb", "norm", "layers")) or module.get_output_embeddings() is None:
        return None
    blocks = decoder_blocks(module)
    if not blocks or len(blocks) != len(base.layers) or len(cache.layers) != len(blocks):
        return None
    plans = [getattr(b, "_hiercomp_plan", None) for b in blocks]
    if any(p is None or p.hooked() or p.attention not in ATTENTION for p in plans):
        return None
    first = plans[0]
    config = module.config
    if first.heads % first.kv_heads or config.hidden_size != base.norm.weight.shape[0]:
        return None
    for block, plan in zip(blocks, plans):
        if not (_group_ok(plan.qkv) and _group_ok(plan.gate_up) and _projection_ok(block.self_attn.o_proj)
                and _projection_ok(block.mlp.down_proj)):
            return None
        if (plan.heads, plan.kv_heads, plan.head_dim, plan.scaling) != \
                (first.heads, first.kv_heads, first.head_dim, first.scaling):
            return None
        if any(n.weight.dtype != torch.float32 for n in (block.input_layernorm, block.post_attention_layernorm)):
            return None
        if _shapes(block) != _shapes_expected(config.hidden_size, plan, config.intermediate_size):
            return None  # decode.cpp sizes its buffers from these: anything else would overrun them
    if base.norm.weight.dtype != torch.float32 or module.get_input_embeddings().weight.dtype != torch.float32:
        return None
    lengths = set()
    for idx in (p.layer_idx for p in plans):
        layer = cache.layers[idx]
        if not isinstance(layer, GrowingLayer) or not layer.is_initialized or layer.key_buffer is None:
            return None
        if layer.keys.shape[0] != 1 or layer.keys.dtype != torch.float32 or not layer._in_buffers() \
                or tuple(layer.keys.shape[1::2]) != (first.kv_heads, first.head_dim) \
                or not layer.key_buffer.is_contiguous() or not layer.value_buffer.is_contiguous():
            return None
        lengths.add(layer.get_seq_length())
    if len(lengths) != 1:
        return None
    return NativeStep(module, blocks, cache, lengths.pop(), lib or gemv._load()[0])
