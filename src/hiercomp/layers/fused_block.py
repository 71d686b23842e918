"""A lean decoder-block forward for the fast runtime: fused projections, few ops, no module dispatch inside.

decode_breakdown.md measured where a 4-bit decode step goes on transformers' own Llama blocks: on SmolLM2 the
native kernels take 6.2 of 15 ms a token (211 calls), and 5.9 ms is Python around them (module calls, the
attention interface's dispatch, keyword plumbing). This module replaces the forward of each Llama-family decoder
block (Llama, Mistral without a sliding window, Qwen2: RMSNorm, rotary, grouped-query attention, SwiGLU) with
one function that:

- runs q/k/v as ONE native kernel call and gate/up as one, where those layers are native-kernel grids of the
  same layout (their packed rows are concatenated once; each layer's own kernel then holds a view of its rows,
  so the memory is not doubled): 7 kernel calls a block become 4. Each row's product is computed exactly as the
  layer's own kernel computes it (the same rounded activation, the same integer sums), so fusion changes no bit;
- calls every other projection (a dense layer, another method, a rotated wrapper) as its module;
- applies the rotary embedding to the queries and keys in one pass, and attends with SDPA (grouped heads
  natively), as transformers' ``sdpa`` implementation does.

Only the forward is replaced (an instance attribute), never a module or a parameter: ``state_dict``, saving and
the model's structure are unchanged, and :func:`unfuse` restores transformers' forward exactly. The block falls
back to transformers' forward for a call where anything could depend on the module calls it skips: hooks on the
block or its submodules (calibration, the KV level's query capture), training mode, an attention implementation
other than ``sdpa``/``eager``; and blocks of transformers before 5.24 (whose cache argument is named otherwise)
keep transformers' forward altogether.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hiercomp.layers import gemv
from hiercomp.layers.kernels import NativeLowBitKernel, return_freed_memory

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # RMSNorm, rotary, GQA, SwiGLU; no q/k norms
ATTENTION = ("sdpa", "eager")
ORIGINAL = "_hiercomp_original_forward"


class FusedRows:
    """Several affine-grid layers that read the same input, as one native kernel call over their stacked rows.

    The stacked packed codes, scales and zeros are built once; each member layer's grid then points at its own
    rows of them (row slices of a contiguous tensor are contiguous), so the layers keep working alone and the
    memory is held once."""

    def __init__(self, layers: list[nn.Module]) -> None:
        grids = [layer.kernel.grid for layer in layers]
        self.grid = gemv.PackedGrid.stack(grids)
        self.sizes = [g.out_features for g in grids]
        start = 0
        for g in grids:
            g.packed = self.grid.packed[start : start + g.out_features]
            g.scale = self.grid.scale[start : start + g.out_features]
            g.zero = self.grid.zero[start : start + g.out_features]
            start += g.out_features
        biases = [layer.bias for layer in layers]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(n) if b is None else b.float() for b, n in zip(biases, self.sizes)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., Σ out_i) float32: the member layers' outputs side by side."""
        y = self.grid(x.reshape(-1, self.grid.in_features))
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], -1)


def fusable(layers: list[nn.Module]) -> bool:
    """Whether these layers can run as one native call: each holds a native-kernel grid, all with the same
    layout (bits, group, padded width)."""
    kernels = [getattr(layer, "kernel", None) for layer in layers]
    return all(isinstance(k, NativeLowBitKernel) for k in kernels) and len({k.grid.layout for k in kernels}) == 1


class _Projections:
    """Calls a group of projections that read the same input: fused where :func:`fusable`, else one by one."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.fused = FusedRows(layers) if fusable(layers) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs side by side along the last dimension."""
        if self.fused is not None:
            return self.fused(x).to(x.dtype)
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def norm_eps(norm: nn.Module) -> float:
    """An RMSNorm's epsilon (transformers names it ``variance_epsilon``; torch's own ``eps``)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # transformers' LlamaRMSNorm: normalise in float32, cast back, then scale by the weight.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps(norm))
    return norm.weight * h.to(x.dtype)


class BlockPlan:
    """What the lean forward of one decoder block needs, gathered once."""

    def __init__(self, block: nn.Module, rotary: _Rotary) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.rotary = rotary
        config = attn.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.layer_idx = attn.layer_idx
        self.qkv = _Projections([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _Projections([mlp.gate_proj, mlp.up_proj])
        self.attention = config._attn_implementation  # read once: the config's attribute lookup is slow
        # The hook registries of the block and everything in it (the dicts are mutated in place when a hook is
        # registered, so holding them is enough), and torch's global ones.
        from torch.nn.modules import module as torch_module

        self.hook_dicts = [d for m in block.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.hook_dicts += [torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks]

    def hooked(self) -> bool:
        return any(map(len, self.hook_dicts))


class _Rotary:
    """The rotary embedding as ``x cos + roll(x, half) sin±`` (sin± = sin with its first half negated): four ops
    instead of transformers' seven (rotate_half slices, negates and concatenates halves), the same values. sin± is
    made once per step, by the first block, and shared (the model passes every block the same cos/sin tensors)."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cos = self.signed = torch.empty(0)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (batch, length, heads, dim) rotated by cos, sin (batch, length, dim)."""
        if self.key is None or self.key[0] is not cos or self.key[1] is not sin:
            half = sin.shape[-1] // 2
            self.signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)
            self.cos, self.key = cos.unsqueeze(2), (cos, sin)
        # Not addcmul: a fused multiply-add rounds once where transformers rounds twice (the products and the sum
        # here are transformers' own, bit for bit: -x2 * s1 == x2 * -s1).
        return x * self.cos + torch.roll(x, x.shape[-1] // 2, -1) * self.signed


def _lean_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = False,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> Any:
    plan: BlockPlan = self._hiercomp_plan
    if "past_key_values" in kwargs:  # the name before transformers 5.40
        cache = kwargs.pop("past_key_values") if cache is None else cache
    if self.training or position_embeddings is None or plan.attention not in ATTENTION or plan.hooked():
        return getattr(self, ORIGINAL)(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                       **kwargs)
    attn, mlp = self.self_attn, self.mlp
    batch, length, _ = hidden_states.shape
    h = _rms_norm(self.input_layernorm, hidden_states)
    qkv = plan.qkv(h)
    heads, kv_heads, dim = plan.heads, plan.kv_heads, plan.head_dim
    # Queries and keys are adjacent columns: rotated together, one pass of the rotary ops over heads + kv_heads.
    qk = qkv[..., : (heads + kv_heads) * dim].view(batch, length, heads + kv_heads, dim)
    v = qkv[..., (heads + kv_heads) * dim :]
    cos, sin = position_embeddings
    qk = plan.rotary(qk, cos, sin)
    q = qk[:, :, :heads].transpose(1, 2)
    k = qk[:, :, heads:].transpose(1, 2)
    v = v.view(batch, length, kv_heads, dim).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, plan.layer_idx, kwargs=kwargs)
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : k.shape[-2]]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and length > 1,
                                         scale=plan.scaling, enable_gqa=kv_heads != heads)
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, length, heads * dim))
    hidden_states = hidden_states + out
    h = _rms_norm(self.post_attention_layernorm, hidden_states)
    gate, up = plan.gate_up(h).chunk(2, dim=-1)
    return hidden_states + mlp.down_proj(F.silu(gate) * up)


def _supported(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES or getattr(config, "sliding_window", None):
        return False
    act = getattr(config, "hidden_act", "silu")
    return act in ("silu", "swish")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The Llama-family decoder blocks of ``model`` (empty where its architecture is not supported)."""
    if not _supported(model):
        return []
    needed = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    blocks = [m for m in model.modules() if all(hasattr(m, n) for n in needed)]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [b for b in blocks if all(hasattr(b.self_attn, n) for n in projections)
            and all(hasattr(b.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and _takes_cache(type(b))]


def _takes_cache(block_type: type) -> bool:
    """Whether the block's forward names its cache ``cache`` (transformers 5.24 on), the convention the lean forward
    follows when it hands a call back (and when it calls ``cache.update(..., kwargs=)``); older blocks keep theirs."""
    import inspect

    try:
        return "cache" in inspect.signature(block_type.forward).parameters
    except (TypeError, ValueError):
        return False


def fuse(model: nn.Module) -> int:
    """Give each supported decoder block of ``model`` the lean forward; returns how many blocks fused at least one
    group of projections (q/k/v or gate/up) into one kernel call. Call after the kernels are attached."""
    fused = 0
    rotary = _Rotary()
    for block in decoder_blocks(model):
        plan = BlockPlan(block, rotary)
        block._hiercomp_plan = plan
        if ORIGINAL not in vars(block):
            setattr(block, ORIGINAL, block.forward)
        block.forward = types.MethodType(_lean_forward, block)
        fused += plan.qkv.fused is not None or plan.gate_up.fused is not None
        # The layers' own copies of the rows, freed just now, sit between live tensors: give their pages back
        # before the next block's stacking allocates (measured on SmolLM2 at 2 bits: 22 MB more peak without).
        return_freed_memory()
    return fused


def unfuse(model: nn.Module) -> None:
    """Restore transformers' forward on every block :func:`fuse` changed (the layers' kernels stay as they are:
    each still holds its own rows)."""
    for block in model.modules():
        if ORIGINAL in vars(block):
            del block.forward
            delattr(block, ORIGINAL)
            del block._hiercomp_plan
