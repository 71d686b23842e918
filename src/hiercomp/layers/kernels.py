"""Fast compute paths for compressed layers, chosen by (layer kind, config, device).

Every compressed layer keeps its stored buffers (the exact saved form) and its ``dequantize``-based forward:
that is the *reference* runtime. The *fast* runtime attaches a :class:`Kernel` built once from the stored
form; the forward then never builds the dense float32 weight:

- integer grids of 1-4 bits whose in-features are a multiple of 32, with groups of 32, 64, a multiple of 128 or
  per channel: the native kernel (gemv.cpp, compiled on first use: see :mod:`hiercomp.layers.gemv`). It rounds
  the activation to two int8 levels per block of 32 and takes integer dot products with the codes, held at
  their own width (1-, 2-, 2+1- or 4-bit layouts, so a 2-bit layer streams half a 4-bit one's bytes)
  (AVX512-VNNI / AVX2), for every batch size: one token streams the codes near memory bandwidth, and a
  128-token prefill measured faster than torch's int4 kernel and as fast as dequantizing tiles to bfloat16
  (benchmarks/gemv_layer.py), without the tile's memory.
  Where it is off (``HIERCOMP_NO_NATIVE=1``, no compiler, no AVX2) or the shape does not fit, the torch kernels:
- integer grids of 2-4 bits whose groups are multiples of 32 (per channel included: the scale repeats) and
  whose output width is a multiple of 16: torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, the one
  torchao's int4 CPU layout calls). The kernel computes ``(q - 8) * scale + zero``; our grid is
  ``scale * (q - z)``, so its zero is ``scale * (8 - z)`` — exact for integer and float16 zeros alike;
- every other integer grid (5-8 bits, odd group sizes, short last groups): codes shifted to int8 once at
  load, one ``_weight_int8pack_mm`` per group (per channel: one call), and the zero points folded into one
  small product of per-group input sums. No tile of float weights is ever built: the extra memory of a
  forward is its output;
- HLQ: the sum of its binary planes, each plane an affine 1-bit grid on the kernels above, plus the offsets
  through the same per-group input sums;
- BitStack: each block's ±1 signs as a 1-bit grid (scale 2, zero 1/2), applied to the input scaled by each
  rank-one factor (``(S ⊙ u vᵀ) x = Σᵣ uᵣ ⊙ S (vᵣ ⊙ x)``);
- low-rank: two matmuls with the factors cast to float32 once (not at every forward);
- sparse (unstructured and N:M, 2:4 included): no CPU kernel here gains from the pattern (a CSR product
  measured 5x slower than dense), so the dense float32 weight is built ONCE at load and used by plain
  ``F.linear``: as fast as the original, as large as the original in memory; the stored form stays for saving.

The native kernel's two-level int8 activation (~15 bits per input) errs by ~5e-5 of the output's norm (the
integer products and float sums are otherwise exact; the zero term uses the same rounded input, so it cancels
exactly). Both torch kernels are vectorised on this CPU (AVX2) only for bfloat16 inputs (float32 and
float16 inputs run 10-20x slower: measured), so the torch integer paths round the activation and the scales to
bfloat16 and return float32: fast equals reference within bfloat16 rounding (relative error of the output ~0.3%;
the tests assert ≤ 1e-2 relative to the output norm). Low-rank and sparse paths are float32 and match to 1e-5.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hiercomp.layers import gemv

RUNTIMES = ("fast", "reference")
FAST_DTYPE = torch.bfloat16
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 kernel takes
INT4_MID = 8  # the kernel's fixed mid code
INT4_ROWS = 16  # the kernel packs output rows in blocks of 16
INT8_COLS = 8  # _weight_int8pack_mm returns wrong sums (or crashes) unless the reduced width is a multiple of 8


class Kernel:
    """A compute path: ``kernel(x)`` with x (M, in) float returns the (M, out) float32 product with the weight."""

    name = "kernel"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]

    def nbytes(self) -> int:
        """Memory the kernel holds on top of the layer's stored buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    g = in_features if group_size is None else group_size
    return [(start, min(start + g, in_features)) for start in range(0, in_features, g)]


class GroupSums:
    """``y += (per-group sums of x) @ constᵀ``: adds ``const[n, group]`` times every input of that group."""

    def __init__(self, const: torch.Tensor, in_features: int, group_size: int | None) -> None:
        bounds = _group_bounds(in_features, group_size)
        self.indicator = torch.zeros(in_features, len(bounds))
        for i, (a, b) in enumerate(bounds):
            self.indicator[a:b, i] = 1.0
        self.const_t = const.float().t().contiguous()  # (groups, out)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.addmm_(x.float() @ self.indicator, self.const_t)


def int4_group(out_features: int, in_features: int, group_size: int | None) -> int | None:
    """The int4 kernel's group size for this grid, or None when the kernel cannot take it."""
    g = in_features if group_size is None else group_size
    if out_features % INT4_ROWS or in_features % g:
        return None
    return next((kg for kg in INT4_GROUPS if g % kg == 0), None)


class Int4Kernel(Kernel):
    """An affine grid ``scale * (q - zero)`` with codes 0..15 on torch's CPU int4 kernel (bfloat16)."""

    name = "int4"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> None:
        out_features, in_features = codes.shape
        self.kernel_group = int4_group(out_features, in_features, group_size)
        if self.kernel_group is None:
            raise ValueError("this grid does not fit the int4 kernel")
        repeat = (in_features if group_size is None else group_size) // self.kernel_group
        scale = scale.float().repeat_interleave(repeat, dim=1)
        zero = zero.float().repeat_interleave(repeat, dim=1)
        # Shift the codes by (8 - z) where the result stays in 0..15 (symmetric grids, asymmetric 2-3 bits): the
        # kernel's zero is then exactly 0. Otherwise (4-bit asymmetric, float zeros) the zero is s * (8 - z),
        # rounded to bfloat16 — a cancellation that costs up to 8x its rounding, measured harmless at 4 bits.
        per_col = zero.repeat_interleave(self.kernel_group, dim=1)
        shifted = codes.to(torch.int32) - per_col.round().to(torch.int32) + INT4_MID
        exact = bool((zero == zero.round()).all()) and int(shifted.min()) >= 0 and int(shifted.max()) <= 15
        self.code_shift = (INT4_MID - zero.round()).to(torch.int8) if exact else None
        kernel_zero = torch.zeros_like(scale) if exact else scale * (INT4_MID - zero)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            (shifted if exact else codes.to(torch.int32)).contiguous(), 1)
        self.scales_zeros = torch.stack([scale.t(), kernel_zero.t()], dim=-1).to(FAST_DTYPE).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(FAST_DTYPE).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.kernel_group,
                                                          self.scales_zeros).float()

    def codes(self, rows: int = 256) -> torch.Tensor:
        """The integer codes (out, in) back from the packed form, exactly: the kernel itself with scale 1 and
        zero 8 applied to the identity returns (q - 8) + 8 = q (small integers are exact in bfloat16).
        Independent of the CPU's packing layout; costs about one prefill of the layer."""
        out_features, in_features = self.scales_zeros.shape[1], self.packed.shape[1] * 2
        unit = torch.ones_like(self.scales_zeros)
        unit[..., 1] = INT4_MID
        codes = torch.empty(out_features, in_features, dtype=torch.int32)
        for start in range(0, in_features, rows):
            stop = min(start + rows, in_features)
            eye = torch.zeros(stop - start, in_features, dtype=FAST_DTYPE)
            eye[:, start:stop] = torch.eye(stop - start, dtype=FAST_DTYPE)
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.kernel_group, unit)
            codes[:, start:stop] = part.t().to(torch.int32)
        if self.code_shift is not None:
            codes -= self.code_shift.to(torch.int32).repeat_interleave(self.kernel_group, dim=1)
        return codes


class Int8Kernel(Kernel):
    """An affine grid with codes of up to 8 bits: int8 codes, one int8 matmul per group, zeros folded in."""

    name = "int8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
                 bits: int) -> None:
        out_features, in_features = codes.shape
        # Codes minus their integer zero fit int8 below 8 bits: the matmul is then the whole grid. Otherwise
        # (8-bit asymmetric, float zeros) codes - 2^(b-1) and a per-group term from the input sums.
        groups = len(_group_bounds(in_features, group_size))
        integral = bool((zero == zero.round()).all()) and bits < 8
        offset = zero.round().to(torch.int16) if integral else torch.full((out_features, groups), 2 ** (bits - 1),
                                                                             dtype=torch.int16)
        self.offset = offset
        self.bounds = _group_bounds(in_features, group_size)
        self.weights, self.scales = [], []
        for i, (a, b) in enumerate(self.bounds):
            block = (codes[:, a:b].to(torch.int16) - offset[:, i : i + 1]).to(torch.int8)
            pad = (-(b - a)) % INT8_COLS
            self.weights.append(F.pad(block, (0, pad)).contiguous())
            self.scales.append(scale[:, i].to(FAST_DTYPE).contiguous())
        # scale * (q - z) = scale * (q - offset) - scale * (z - offset): the second term per group.
        shift = scale.float() * (zero.float() - offset.float())
        self.zero_term = None if not bool(shift.any()) else GroupSums(-shift, in_features, group_size)

    def tensors(self) -> list[torch.Tensor]:
        extra = [] if self.zero_term is None else [self.zero_term.indicator, self.zero_term.const_t]
        return self.weights + self.scales + extra + [self.offset]

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in) back, exactly."""
        return torch.cat([w[:, : b - a].to(torch.int32) + self.offset[:, i : i + 1].to(torch.int32)
                          for i, ((a, b), w) in enumerate(zip(self.bounds, self.weights))], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(FAST_DTYPE)
        y = torch.zeros(x.shape[0], self.scales[0].numel())
        for (a, b), weight, scale in zip(self.bounds, self.weights, self.scales):
            part = xb[:, a:b]
            pad = weight.shape[1] - (b - a)
            part = F.pad(part, (0, pad)) if pad else part.contiguous()
            y += torch.ops.aten._weight_int8pack_mm(part, weight, scale)
        return y if self.zero_term is None else self.zero_term.add_to(y, xb)


class NativeLowBitKernel(Kernel):
    """An affine grid with codes 0..15 on the native kernel (gemv.cpp): int8 activations, integer dot products.

    The codes are held in the narrowest layout that takes them (``bits``, default: from their range): 4, 3, 2 or
    1 bits per code, so a 2-bit grid holds (and a decode step streams) half the bytes of a 4-bit one. The name
    stays ``native4`` for every layout (the kernel family: runtime reports and tests key on it)."""

    name = "native4"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
                 bits: int | None = None) -> None:
        self.grid = gemv.PackedGrid(codes, scale, zero, group_size, bits)

    @classmethod
    def of_grid(cls, grid: gemv.PackedGrid) -> NativeLowBitKernel:
        out = cls.__new__(cls)
        out.grid = grid
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.grid.packed, self.grid.scale, self.grid.zero]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x)

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in) back, exactly."""
        return self.grid.codes()


def native_fits(in_features: int, group_size: int | None, bits: int) -> bool:
    """Whether this grid goes to the native kernel (saying once per process when it is off for a grid it takes)."""
    if bits > 4 or not gemv.supports(in_features, group_size):
        return False
    if not gemv.available():
        if not gemv.disabled():
            gemv.warn_unavailable()
        return False
    return True


def affine_kernel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
                  bits: int) -> Kernel:
    """The fastest kernel for ``scale * (codes - zero)`` per (row, group): native where it fits, then int4,
    else int8."""
    if native_fits(codes.shape[1], group_size, bits):
        # The grid's bit width picks the layout (a 2-bit grid: four codes per byte); a 4-bit grid whose codes all
        # fall in 0..7 would fit the 3-bit one too, but stays on the cheaper-to-unpack nibbles.
        return NativeLowBitKernel(codes, scale, zero, group_size, bits)
    if bits <= 4 and int4_group(codes.shape[0], codes.shape[1], group_size) is not None:
        return Int4Kernel(codes, scale, zero, group_size)
    return Int8Kernel(codes, scale, zero, group_size, bits)


class SumKernel(Kernel):
    """HLQ: Σⱼ planeⱼ(x) + offsets·(group sums of x)."""

    name = "planes"

    def __init__(self, planes: list[Kernel], offsets: GroupSums) -> None:
        self.planes, self.offsets = planes, offsets
        self.name = f"planes({planes[0].name})"

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.planes for t in p.tensors()] + [self.offsets.indicator, self.offsets.const_t]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.planes[0](x)
        for plane in self.planes[1:]:
            y += plane(x)
        return self.offsets.add_to(y, x.to(FAST_DTYPE))


class SignStackKernel(Kernel):
    """BitStack: y = Σᵢ Σᵣ uᵢ[:, r] ⊙ Sᵢ (vᵢ[r] ⊙ x / col_scale), each Sᵢ a ±1 grid on an affine kernel."""

    def __init__(self, signs: list[Kernel], u: torch.Tensor, v: torch.Tensor, col_scale: torch.Tensor) -> None:
        self.signs = signs
        self.u = u.float()  # (blocks, out, k)
        self.v = v.float()  # (blocks, k, in)
        self.inv_scale = 1.0 / col_scale.float()
        self.name = f"signs({signs[0].name})"

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.signs for t in s.tensors()] + [self.u, self.v, self.inv_scale]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, rank = x.shape[0], self.v.shape[1]
        scaled = x.float() * self.inv_scale
        y = torch.zeros(rows, self.u.shape[1])
        for i, sign in enumerate(self.signs):
            z = sign((scaled.unsqueeze(1) * self.v[i].unsqueeze(0)).reshape(rows * rank, -1))  # (rows*k, out)
            y += torch.einsum("mko,ok->mo", z.view(rows, rank, -1), self.u[i])
        return y


class LowRankKernel(Kernel):
    name = "lowrank"

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a.float().contiguous(), b.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.float(), self.b), self.a)


class DenseKernel(Kernel):
    """The dense float32 weight, built once (sparse layers: no CPU kernel gains from the pattern)."""

    name = "dense-once"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


# -- selection ---------------------------------------------------------------------------------------------

def _quantized_kernel(layer: Any) -> Kernel:
    grid = layer.grid
    if not layer.released() and native_fits(layer.in_features, grid.group_size, grid.bits):
        # Packed by the native library straight from the stored bitstream: the same grid as from unpacked codes
        # (tested), with no unpacked copy or temporaries at load (they were a share of a fast load's peak).
        return NativeLowBitKernel.of_grid(gemv.PackedGrid.from_stream(
            layer.qweight, grid.bits, layer.out_features, layer.in_features, layer.scales, layer.zeros(),
            grid.group_size))
    return affine_kernel(layer.codes_uint8(), layer.scales, layer.zeros(), grid.group_size, grid.bits)


def _hlq_kernel(layer: Any) -> Kernel:
    codes = layer.codes()
    zeros = torch.zeros_like(layer.offsets, dtype=torch.float32)
    planes = [affine_kernel((codes >> j) & 1, layer.plane_scales[..., j], zeros, layer.group_size, 1)
              for j in range(layer.bits)]
    return SumKernel(planes, GroupSums(layer.offsets, layer.in_features, layer.group_size))


def _bitstack_kernel(layer: Any) -> Kernel:
    from hiercomp.layers.packing import unpack_bits

    count = layer.out_features * layer.in_features
    two = torch.full((layer.out_features, 1), 2.0)
    half = torch.full((layer.out_features, 1), 0.5)
    signs = [affine_kernel(unpack_bits(layer.signs[i], 1, count).view(layer.out_features, layer.in_features),
                           two, half, None, 1) for i in range(layer.active)]
    return SignStackKernel(signs, layer.u[: layer.active], layer.v[: layer.active], layer.col_scale)


def select_kernel(layer: nn.Module) -> Kernel | None:
    """The fast kernel for this layer on its device, or None where the reference path is the only one."""
    from hiercomp.layers import BitStackLinear, HLQLinear, LowRankLinear, QuantizedLinear, SparseLinear

    if any(t.device.type != "cpu" for t in layer.buffers()):
        return None  # the kernels above are torch's CPU kernels
    if type(layer) is QuantizedLinear:
        return _quantized_kernel(layer)
    if type(layer) is HLQLinear:
        return _hlq_kernel(layer)
    if type(layer) is BitStackLinear:
        return _bitstack_kernel(layer)
    if type(layer) is LowRankLinear:
        return LowRankKernel(layer.a_factor, layer.b_factor)
    if type(layer) is SparseLinear:
        return DenseKernel(layer.dequantize())
    return None


def set_runtime(model: nn.Module, runtime: str = "fast", release: bool = False) -> dict[str, str]:
    """Attach (``"fast"``) or drop (``"reference"``) the kernels of every compressed layer of ``model``.

    ``release``: layers whose kernel holds the codes exactly drop their stored copy (integer grids: the
    kernel's int4/int8 codes give the packed buffer back on demand) — the memory of one copy instead of two,
    paid for by a slower ``state_dict``/``dequantize``. Each layer releases right after its kernel is built, so
    the peak is the model plus one layer's conversion.

    Returns layer name -> the path its forward now takes (a kernel name, or ``"reference"``). Layers without a
    fast path fall back to the reference; a ``"fast"`` request says so once, in one warning naming their types.
    """
    from hiercomp.hierarchy import compressed_layers

    if runtime not in RUNTIMES:
        from hiercomp.errors import HiercompError

        raise HiercompError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    from hiercomp.layers import fused_block

    layers = compressed_layers(model)
    fused_block.unfuse(model)
    detach_dense(model)
    for layer in layers.values():
        layer.restore_stored()
        layer.kernel = select_kernel(layer) if runtime == "fast" else None
        if release:
            layer.release_stored()
            return_freed_memory()
    if runtime == "fast" and layers:
        # Llama-family blocks: q/k/v and gate/up as one kernel call each, and a forward without module dispatch
        # (an original model with no compressed layer keeps transformers' forward: it is the baseline).
        fused_block.fuse(model)
        attach_dense(model)
        return_freed_memory()
    paths = {name: "reference" if layer.kernel is None else layer.kernel.name for name, layer in layers.items()}
    fallback = {type(layer).__name__ for layer in layers.values()
                if runtime == "fast" and layer.kernel is None and not _wraps_fast_layer(layer)}
    if fallback:
        warnings.warn(f"no fast path for {', '.join(sorted(fallback))}: those layers compute with the reference "
                      "(dequantize) path", stacklevel=2)
    return paths


DENSE_MAX_ROWS = 8  # up to this many input rows (a decode step) dense layers take the native float32 GEMV
DENSE_FORWARD = "_hiercomp_dense_forward"


def _dense_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    rows = x.numel() // self.in_features
    if (rows > DENSE_MAX_ROWS or weight.dtype != torch.float32 or not weight.is_contiguous()
            or x.device.type != "cpu" or (torch.is_grad_enabled() and weight.requires_grad)):
        return F.linear(x, weight, self.bias)
    y = gemv.dense(x.reshape(rows, self.in_features), weight).to(x.dtype).view(*x.shape[:-1], self.out_features)
    return y if self.bias is None else y + self.bias


def attach_dense(model: nn.Module) -> int:
    """Give the plain float32 ``nn.Linear`` layers of a compressed model (an output head kept dense, layers a plan
    leaves dense) the native float32 GEMV for decode-sized inputs: torch's streams a large matrix at 15-20 GB/s on
    2 cores, the native one at 33-46 (SmolLM2's tied 49152x576 head: 8.0 -> 2.5 ms a token). Larger inputs
    (prefill), gradients and other dtypes keep ``F.linear``. Returns how many layers it took."""
    if not gemv.available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.forward = _dense_forward.__get__(module)
            setattr(module, DENSE_FORWARD, True)
            count += 1
    return count


def detach_dense(model: nn.Module) -> None:
    """Undo :func:`attach_dense`."""
    for module in model.modules():
        if DENSE_FORWARD in vars(module):
            del module.forward
            delattr(module, DENSE_FORWARD)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``).

    Building each kernel frees large temporaries (unpacked int32 codes) between the small tensors it keeps;
    glibc then cannot shrink its heap and the process's resident memory grows by those temporaries, layer after
    layer: measured on SmolLM2 at 2 bits, 1.4 GB resident after loading a 137 MB folder, 0.6 GB with a trim
    after each layer (about 1 ms each)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _wraps_fast_layer(layer: nn.Module) -> bool:
    """A wrapper (e.g. a rotation around an inner compressed layer) is fast when its inner layers are."""
    from hiercomp.layers.base import CompressedLinear

    inner = [m for m in layer.modules() if m is not layer and isinstance(m, CompressedLinear)]
    return bool(inner) and all(getattr(m, "kernel", None) is not None or _wraps_fast_layer(m) for m in inner)
