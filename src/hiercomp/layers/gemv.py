"""The native low-bit GEMV (gemv.cpp): compiled on first use, loaded with ctypes.

torch's CPU int4 kernel takes bfloat16 activations and dequantizes every weight to float; for one token that
leaves it far from memory bandwidth. gemv.cpp instead rounds the activation to int8 per block of 32 (llama.cpp's
Q8_0, plus a second int8 for the residual: ~15 bits) and takes integer dot products of the codes with it
(AVX512-VNNI, else AVX2), so a batch-1 forward streams the packed codes once. Codes are held in the narrowest
of four layouts their range fits (:func:`layout_bits`): 4 bits (Q4_0's nibbles), 2 bits (four per byte), 3 bits
(the 2-bit layout plus a high bit plane, like Q3_K) and 1 bit (a bit plane), so a 2-bit layer holds and streams
half the bytes of a 4-bit one. See gemv.cpp for the layouts and the arithmetic.

The library (gemv.cpp, and decode.cpp's whole decode step for native_step.py) is built with the host compiler
(``g++ -O3 -march=native -fopenmp``) into ``$HIERCOMP_CACHE`` (default ``~/.cache/hiercomp/kernels/``), named by a
hash of the sources, the flags, the machine and the CPU's flag line, so a changed CPU or source builds again.
``HIERCOMP_NO_NATIVE=1`` turns it off; without a compiler, without AVX2 or when the build fails, :func:`available`
is False with a reason and callers use torch's kernels (warned once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.cpp")
# Built into the same library: the whole decode step of a Llama-family model around the kernels (native_step.py).
SOURCES = (SOURCE, Path(__file__).with_name("decode.cpp"))
HEADERS = (Path(__file__).with_name("simd.h"),)  # included by the sources: part of the build's hash
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno")
CHUNK = 128  # the packed layout pads the in-features to a multiple of this (gemv.cpp's superchunk)
BLOCK = 32  # the activation's int8 block
MAX_CODE = 15
LAYOUTS = (1, 2, 3, 4)  # bits per code of the packed layouts
# Products smaller than this many weight x token multiply-adds run on one thread: a parallel region costs more
# than it saves on such small layers (SmolLM2's 576-wide layers decoded 25-30% slower on 2 threads than on one).
PARALLEL_MIN = int(os.environ.get("HIERCOMP_GEMV_PARALLEL_MIN", 4 << 20))
# Rows packed from unpacked codes (and unpacked) at a time: the temporaries stay small next to the packed codes
# (1024 rows of a 3-bit SmolLM2 layer held ~4 MB of them). A model's load packs from the stored stream instead
# (PackedGrid.from_stream: no temporaries).
PACK_ROWS = 128


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("HIERCOMP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hiercomp") / "kernels"


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """The compiled library, built once per (sources, flags, machine, CPU) and renamed into place atomically
    (parallel processes building at once each rename a complete file)."""
    sources = [src.read_bytes() for src in (*SOURCES, *HEADERS)]
    key = hashlib.sha256(b"\0".join([*sources, " ".join((compiler, *flags)).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                             timeout=300)
        if run.returncode:
            raise OSError(f"{compiler} failed: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find in the cache) and load the library; ``extra_flags`` (e.g. ``-mno-avx512f``) build a
    variant for another instruction set (tests). Raises OSError where it cannot."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise OSError("no C++ compiler (g++) on PATH")
    lib = ctypes.CDLL(str(_build(compiler, FLAGS + extra_flags)))
    lib.hc_isa.restype = ctypes.c_char_p
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hc_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.hc_gemm.restype = ctypes.c_int
    lib.hc_sgemv.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.hc_sgemv.restype = ctypes.c_int
    lib.hc_decode_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_double, ptr, ptr]
    lib.hc_decode_step.restype = ctypes.c_int
    lib.hc_pack_stream.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_int, ptr]
    lib.hc_pack_stream.restype = ctypes.c_int
    return lib


def disabled() -> bool:
    """``HIERCOMP_NO_NATIVE`` is set (to anything but 0): the torch kernels, without a warning."""
    return os.environ.get("HIERCOMP_NO_NATIVE", "") not in ("", "0")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no native kernel for {platform.machine()} (x86-64 only)"
    if not {"avx2", "fma", "f16c"} <= set(_cpu_flags().split()):
        return None, "the CPU lacks AVX2/FMA/F16C"
    try:
        lib = build_library()
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"building {' and '.join(src.name for src in SOURCES)} failed: {err}"
    return lib, lib.hc_isa().decode()


def available() -> bool:
    """Whether the native kernel is on, built and loaded (see :func:`reason`)."""
    return not disabled() and _load()[0] is not None


def reason() -> str:
    """Why the native kernel is off, or the instruction set it was built for."""
    return "HIERCOMP_NO_NATIVE is set" if disabled() else _load()[1]


@functools.cache
def warn_unavailable() -> None:
    """Say once per process that the native kernel is off (where it would have been used)."""
    warnings.warn(f"native low-bit kernel unavailable ({reason()}): using torch's int4/int8 kernels", stacklevel=3)


def supports(in_features: int, group_size: int | None) -> bool:
    """Whether the layout takes this grid: in-features a multiple of 32; groups per channel, of 32 or 64, or a
    multiple of 128, dividing the in-features."""
    if in_features % BLOCK:
        return False
    if group_size is None or group_size == in_features:
        return True
    return in_features % group_size == 0 and (group_size in (32, 64) or group_size % CHUNK == 0)


def layout_bits(max_code: int) -> int:
    """The narrowest layout for codes ``0..max_code``: 1, 2, 3 or 4 bits (ValueError above 15)."""
    for bits in LAYOUTS:
        if max_code < 1 << bits:
            return bits
    raise ValueError(f"codes up to {max_code} do not fit the native layouts (4 bits at most)")


def _code_order(q: torch.Tensor) -> torch.Tensor:
    """(rows, padded) codes -> (rows, superchunks, 128) in gemv.cpp's code order: per superchunk the first
    halves of its 4 blocks of 32, then their second halves."""
    rows = q.shape[0]
    return q.view(rows, -1, 4, 2, BLOCK // 2).transpose(2, 3).reshape(rows, -1, CHUNK)


def _natural_order(s: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_code_order`: (rows, superchunks, 128) -> (rows, padded)."""
    rows = s.shape[0]
    return s.view(rows, -1, 2, 4, BLOCK // 2).transpose(2, 3).reshape(rows, -1)


def _shift_pack(s: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, sc, 128) codes of ``width`` bits -> (rows, sc, 16 width) bytes: byte t holds codes
    t, n + t, 2n + t, ... (n = 16 width) at bits 0, width, 2 width, ... (width 4: Q4_0's nibbles; 2: the 2-bit
    layout; 1: a bit plane)."""
    parts = s.view(*s.shape[:2], 8 // width, 16 * width)
    out = parts[:, :, 0].clone()
    for j in range(1, 8 // width):
        out |= parts[:, :, j] << (j * width)
    return out


def _shift_unpack(b: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of :func:`_shift_pack`."""
    mask = (1 << width) - 1
    return torch.cat([(b >> (j * width)) & mask for j in range(8 // width)], dim=2)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, padded) uint8 codes -> (rows, padded / 128 * 16 bits) bytes in gemv.cpp's ``bits`` layout."""
    s = _code_order(q)
    if bits == 3:  # low 2 bits in the 2-bit layout, then the high bit as a plane: 48 bytes per superchunk
        packed = torch.cat([_shift_pack(s & 3, 2), _shift_pack(s >> 2, 1)], dim=2)
    else:
        packed = _shift_pack(s, bits)
    return packed.reshape(q.shape[0], -1)


def _unpack(b: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`_pack`."""
    b = b.view(b.shape[0], -1, 16 * bits)
    if bits == 3:
        s = _shift_unpack(b[:, :, :32], 2) | (_shift_unpack(b[:, :, 32:], 1) << 2)
    else:
        s = _shift_unpack(b, bits)
    return _natural_order(s)


class PackedGrid:
    """An affine grid of codes 0..15 in gemv.cpp's layouts: ``y = x @ (scale * (codes - zero))ᵀ``.

    ``bits`` (1-4) picks the layout; by default the narrowest the codes' range fits (:func:`layout_bits`), so a
    2-bit grid holds a quarter byte per code and a 3-bit grid three eighths."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
                 bits: int | None = None) -> None:
        out_features, in_features = codes.shape
        low, high = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
        if not supports(in_features, group_size) or low < 0 or high > MAX_CODE:
            raise ValueError("this grid does not fit the native layout")
        bits = layout_bits(high) if bits is None else bits
        if bits not in LAYOUTS or high >= 1 << bits:
            raise ValueError(f"codes up to {high} do not fit a {bits}-bit layout")
        self._shape(out_features, in_features, group_size, bits)
        # Padding gets code 0 and, for groups of 32 or 64, groups of scale 0. Packed a slice of rows at a time so
        # that loading a model holds little more than its packed codes (no full-size uint8 copy).
        self.packed = torch.empty(out_features, self.padded // CHUNK * 16 * bits, dtype=torch.uint8)
        for a in range(0, out_features, PACK_ROWS):
            b = min(a + PACK_ROWS, out_features)
            q = torch.zeros(b - a, self.padded, dtype=torch.uint8)
            q[:, :in_features] = codes[a:b]
            self.packed[a:b] = _pack(q, bits)
        self._set_scales(scale, zero)

    @classmethod
    def from_stream(cls, stream: torch.Tensor, bits: int, out_features: int, in_features: int,
                    scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> PackedGrid:
        """The grid of codes stored as hiercomp's dense bitstream (:func:`hiercomp.layers.packing.pack_bits`, 1-4
        bits, in the layout of that width), packed by the native library straight from it: bit for bit the grid
        ``PackedGrid(codes, ...)`` makes, without unpacking the codes (no full-size copy, no temporaries: a fast
        load then holds little more than the kernel)."""
        lib = _load()[0]
        assert lib is not None, "the native kernel is not available"
        if not supports(in_features, group_size) or bits not in LAYOUTS:
            raise ValueError("this grid does not fit the native layout")
        out = cls.__new__(cls)
        out._shape(out_features, in_features, group_size, bits)
        out.packed = torch.empty(out_features, out.padded // CHUNK * 16 * bits, dtype=torch.uint8)
        stream = stream.contiguous()
        if lib.hc_pack_stream(stream.data_ptr(), stream.numel(), out_features, in_features, out.padded, bits,
                              out.packed.data_ptr()):
            raise ValueError(f"the stream does not hold {out_features}x{in_features} codes of {bits} bits")
        out._set_scales(scale, zero)
        return out

    def _shape(self, out_features: int, in_features: int, group_size: int | None, bits: int) -> None:
        self.bits = bits
        self.in_features, self.out_features = in_features, out_features
        self.padded = -(-in_features // CHUNK) * CHUNK
        per_channel = group_size is None or group_size == in_features
        self.group = self.padded if per_channel else group_size

    def _set_scales(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        groups = self.padded // self.group
        scale32 = torch.zeros(self.out_features, groups)
        zero32 = torch.zeros(self.out_features, groups)
        scale32[:, : scale.shape[1]] = scale.float()
        zero32[:, : zero.shape[1]] = zero.float()
        # float16 like the layers' own: exact for their scales, integer zeros and HQQ's float16 zeros.
        self.scale = scale32.half().contiguous()
        self.zero = zero32.half().contiguous()

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(bits, group, padded width, in-features): grids that agree on it compute in one call when stacked."""
        return self.bits, self.group, self.padded, self.in_features

    @classmethod
    def stack(cls, grids: list[PackedGrid]) -> PackedGrid:
        """One grid whose rows are those of ``grids`` in order (same layout, group and width): a product with it
        equals each grid's product side by side, bit for bit (rows are independent in the kernel)."""
        first = grids[0]
        if any(g.layout != first.layout for g in grids):
            raise ValueError("only grids of the same layout, group and width stack")
        out = cls.__new__(cls)
        out._shape(sum(g.out_features for g in grids), first.in_features, first.group, first.bits)
        out.packed = torch.cat([g.packed for g in grids])
        out.scale = torch.cat([g.scale for g in grids])
        out.zero = torch.cat([g.zero for g in grids])
        return out

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in) back, exactly."""
        if not self.out_features:
            return torch.zeros(0, self.in_features, dtype=torch.int32)
        return torch.cat([_unpack(self.packed[a : a + PACK_ROWS], self.bits)[:, : self.in_features].to(torch.int32)
                          for a in range(0, self.out_features, PACK_ROWS)], dim=0)

    def __call__(self, x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
        """``x (M, in) @ weightᵀ`` in float32 (``lib``: a variant from :func:`build_library`)."""
        lib = lib or _load()[0]
        assert lib is not None, "the native kernel is not available"
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        if x.shape[0] == 0:
            return y
        small = x.shape[0] * self.out_features * self.padded < PARALLEL_MIN
        threads = 1 if small else torch.get_num_threads()
        rc = lib.hc_gemm(x.data_ptr(), x.shape[0], self.in_features, self.packed.data_ptr(), self.scale.data_ptr(),
                         self.zero.data_ptr(), self.out_features, self.padded, self.group, self.bits, y.data_ptr(),
                         threads)
        if rc:
            raise RuntimeError(f"hc_gemm failed ({rc})")
        return y


def dense(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x (M, in) @ weightᵀ`` for a contiguous float32 weight (out, in), on the native float32 GEMV (small M: a
    decode step). torch's float32 GEMV streams a large matrix at 15-20 GB/s on 2 cores; this at the int kernel's
    rate. Float32 sums in another order: equal to ``F.linear`` within float rounding."""
    lib = lib or _load()[0]
    assert lib is not None, "the native kernel is not available"
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], weight.shape[0])
    if x.shape[0] == 0:
        return y
    rc = lib.hc_sgemv(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0], y.data_ptr(),
                      torch.get_num_threads())
    if rc:
        raise RuntimeError(f"hc_sgemv failed ({rc})")
    return y
