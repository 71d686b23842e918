"""The native low-bit GEMV (gemv.cpp): compiled on first use, loaded with ctypes.

torch's CPU int4 kernel takes bfloat16 activations and dequantizes every weight to float; for one token that
leaves it far from memory bandwidth. gemv.cpp instead rounds the activation to int8 per block of 32 (llama.cpp's
Q8_0, plus a second int8 for the residual: ~15 bits) and takes integer dot products of the 4-bit codes with it
(AVX512-VNNI, else AVX2), so a batch-1 forward streams the packed codes once. See gemv.cpp for the layout
and the arithmetic.

The library is built with the host compiler (``g++ -O3 -march=native -fopenmp``) into
``$HIERCOMP_CACHE`` (default ``~/.cache/hiercomp/kernels/``), named by a hash of the source, the flags, the
machine and the CPU's flag line, so a changed CPU or source builds again. ``HIERCOMP_NO_NATIVE=1`` turns it off;
without a compiler, without AVX2 or when the build fails, :func:`available` is False with a reason and callers
use torch's kernels (warned once).
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
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno")
CHUNK = 128  # the packed layout pads the in-features to a multiple of this (gemv.cpp's superchunk)
BLOCK = 32  # the activation's int8 block, and the nibble layout's block (16 bytes)
MAX_CODE = 15


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
    """The compiled library, built once per (source, flags, machine, CPU) and renamed into place atomically
    (parallel processes building at once each rename a complete file)."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join((compiler, *flags)).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
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
    lib.hc_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.hc_gemm.restype = ctypes.c_int
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
        return None, f"building {SOURCE.name} failed: {err}"
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


class PackedGrid:
    """An affine grid of codes 0..15 in gemv.cpp's layout: ``y = x @ (scale * (codes - zero))ᵀ``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> None:
        out_features, in_features = codes.shape
        if not supports(in_features, group_size) or int(codes.min()) < 0 or int(codes.max()) > MAX_CODE:
            raise ValueError("this grid does not fit the native layout")
        self.in_features, self.out_features = in_features, out_features
        self.padded = -(-in_features // CHUNK) * CHUNK
        per_channel = group_size is None or group_size == in_features
        self.group = self.padded if per_channel else group_size
        groups = self.padded // self.group
        # Padding gets code 0 and, for groups of 32 or 64, groups of scale 0. Per block of 32, 16 bytes:
        # byte t = q[t] | q[16 + t] << 4 (llama.cpp's Q4_0 order).
        q = torch.zeros(out_features, self.padded, dtype=torch.uint8)
        q[:, :in_features] = codes
        q = q.view(out_features, -1, 2, BLOCK // 2)
        self.packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(out_features, self.padded // 2).contiguous()
        scale32 = torch.zeros(out_features, groups)
        zero32 = torch.zeros(out_features, groups)
        scale32[:, : scale.shape[1]] = scale.float()
        zero32[:, : zero.shape[1]] = zero.float()
        # float16 like the layers' own: exact for their scales, integer zeros and HQQ's float16 zeros.
        self.scale = scale32.half().contiguous()
        self.zero = zero32.half().contiguous()

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in) back, exactly."""
        packed = self.packed.view(self.out_features, -1, BLOCK // 2)
        q = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(self.out_features, self.padded)
        return q[:, : self.in_features].to(torch.int32)

    def __call__(self, x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
        """``x (M, in) @ weightᵀ`` in float32 (``lib``: a variant from :func:`build_library`)."""
        lib = lib or _load()[0]
        assert lib is not None, "the native kernel is not available"
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        if x.shape[0] == 0:
            return y
        rc = lib.hc_gemm(x.data_ptr(), x.shape[0], self.in_features, self.packed.data_ptr(), self.scale.data_ptr(),
                         self.zero.data_ptr(), self.out_features, self.padded, self.group, y.data_ptr(),
                         torch.get_num_threads())
        if rc:
            raise RuntimeError(f"hc_gemm failed ({rc})")
        return y
