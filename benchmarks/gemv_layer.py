"""One quantized linear layer at batch 1 (decode) and 128 tokens (prefill): dense float32 ``F.linear``, torch's
CPU int4 kernel (hiercomp's ``Int4Kernel``) and the native kernel (``NativeLowBitKernel``, gemv.cpp).

Two timings per case, medians of many calls:
- hot: the same layer again and again (its weights stay in the last-level cache: a best case);
- cold: a rotation over copies of the layer holding ≥ 3x the L3 size, so every call streams its weights from
  memory, as in a real model's decode step.
GB/s: the bytes each kernel holds for the layer (dense: float32 weight; int4: packed codes + bfloat16
scale/zero pairs; native: packed codes + float16 scales and zeros) over the time.
Writes benchmarks/results/gemv_layer.md.

    python benchmarks/gemv_layer.py                 # 1 and 2 threads (about 2 minutes)
    python benchmarks/gemv_layer.py --threads 2 --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine  # noqa: E402
from hiercomp.layers import gemv  # noqa: E402
from hiercomp.layers.kernels import Int4Kernel, NativeLowBitKernel  # noqa: E402

SHAPES = [(5632, 2048), (2048, 2048), (32000, 2048)]
GRIDS = [("4-bit g128 asym", 128, False), ("4-bit g32 sym", 32, True)]
COLD_BYTES = 96 << 20  # 3x this machine's 32 MB L3


def median_ms(fn, calls: int, seconds: float = 1.0) -> float:
    fn()
    times = []
    stop = time.perf_counter() + seconds
    while len(times) < calls or (time.perf_counter() < stop and len(times) < 20 * calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def grid(out_f: int, in_f: int, group: int, symmetric: bool, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g)
    scale = (torch.rand(out_f, in_f // group, generator=g) * 0.01 + 1e-3).half().float()
    zero = torch.full_like(scale, 8.0) if symmetric else torch.randint(0, 16, scale.shape, generator=g).float()
    return codes, scale, zero


def time_kernels(make, nbytes: int, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """(hot ms, cold ms) of one call; ``make(i)`` builds the i-th copy."""
    first = make(0)
    hot = median_ms(lambda: first(x), calls)
    copies = [first] + [make(i) for i in range(1, max(1, -(-COLD_BYTES // nbytes)))]
    cold = median_ms(lambda: [k(x) for k in copies], max(3, calls // len(copies))) / len(copies)
    return hot, cold


def decode_rows(threads: int, quick: bool) -> list[str]:
    torch.set_num_threads(threads)
    rows = []
    for out_f, in_f in SHAPES[:1] if quick else SHAPES:
        x = torch.randn(1, in_f)
        dense_bytes = out_f * in_f * 4
        dense = time_kernels(lambda i, o=out_f, k=in_f: (lambda w: lambda v: F.linear(v, w))(torch.randn(o, k)),
                             dense_bytes, x, 20)
        for label, group, symmetric in GRIDS:
            args = grid(out_f, in_f, group, symmetric, 0)
            results = {"dense fp32": (dense, dense_bytes)}
            for name, cls in [("torch int4", Int4Kernel), ("native", NativeLowBitKernel)]:
                size = cls(*args, group).nbytes()
                results[name] = (time_kernels(lambda _, c=cls, a=args, g=group: c(*a, g), size, x, 50), size)
            (n_hot, n_cold), _ = results["native"]
            (t_hot, t_cold), _ = results["torch int4"]
            cells = [f"{(ms[0]):.3f} / {ms[1]:.3f} ({size / ms[1] / 1e6:.1f})" for ms, size in results.values()]
            rows.append(f"| {threads} | {out_f}x{in_f} | {label} | " + " | ".join(cells)
                        + f" | {t_hot / n_hot:.1f}x / {t_cold / n_cold:.1f}x |")
            print(rows[-1], flush=True)
    return rows


def prefill_rows(threads: int, tokens: int = 128) -> list[str]:
    """The prefill choice: the native int8 GEMM at M = 128 against torch's int4 kernel, dense float32, and
    dequantizing 256-row tiles of the packed codes to bfloat16 for a bfloat16 matmul (one tile extra in memory)."""
    torch.set_num_threads(threads)
    out_f, in_f, group = 5632, 2048, 128
    args = grid(out_f, in_f, group, False, 0)
    native, int4 = NativeLowBitKernel(*args, group), Int4Kernel(*args, group)
    packed = native.grid
    dense = torch.randn(out_f, in_f)

    def tiled(x: torch.Tensor, tile: int = 256) -> torch.Tensor:
        xb, out = x.to(torch.bfloat16), torch.empty(x.shape[0], out_f, dtype=torch.bfloat16)
        for a in range(0, out_f, tile):
            b = min(a + tile, out_f)
            q = packed.packed[a:b].view(b - a, -1, 16)
            q = torch.stack([q & 0xF, q >> 4], dim=2).reshape(b - a, -1).to(torch.bfloat16)
            s = packed.scale[a:b].to(torch.bfloat16).repeat_interleave(group, 1)
            z = packed.zero[a:b].to(torch.bfloat16).repeat_interleave(group, 1)
            out[:, a:b] = F.linear(xb, s * (q - z))
        return out.float()

    x = torch.randn(tokens, in_f)
    ref = F.linear(x, args[1].repeat_interleave(group, 1) * (args[0] - args[2].repeat_interleave(group, 1)))
    rows = []
    for name, fn in [("dense fp32", lambda: F.linear(x, dense)), ("torch int4", lambda: int4(x)),
                     ("tiles -> bf16 matmul", lambda: tiled(x)), ("native", lambda: native(x))]:
        ms = median_ms(fn, 5)
        err = "" if name == "dense fp32" else f"{float((fn() - ref).norm() / ref.norm()):.1e}"
        rows.append(f"| {threads} | {name} | {ms:.2f} | {err} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--quick", action="store_true", help="the first shape only, no file written")
    args = parser.parse_args()
    if not gemv.available():
        raise SystemExit(f"the native kernel is unavailable here: {gemv.reason()}")
    threads = [int(t) for t in args.threads.split(",")]
    head = ("| threads | layer | grid | dense fp32 | torch int4 | native | native speed-up vs int4 |\n"
            "|---|---|---|---|---|---|---|")
    decode = [row for t in threads for row in decode_rows(t, args.quick)]
    prefill = [row for t in threads for row in prefill_rows(t)]
    if args.quick:
        return
    text = f"""# One quantized layer: batch-1 decode and 128-token prefill

`python benchmarks/gemv_layer.py` on {machine()}; native kernel built for `{gemv.reason()}`.

## Batch 1 (decode)

Cells: hot ms / cold ms (cold GB/s). Hot repeats one layer (its weights stay in the 32 MB L3); cold rotates
over copies of ≥ 96 MB, so each call streams its weights from memory as a model's decode step does. GB/s counts
the bytes each kernel holds for the layer.

Where the cores are shared with other work (load average above the thread count, as when this file was
written), a multi-threaded call waits at the end of its parallel region for a preempted thread: ~8 ms, a
scheduler slice, for torch's int4 kernel and the native kernel alike. Those 2-thread rows measure the scheduler,
not the kernels; the 1-thread rows are the comparison.

{head}
{chr(10).join(decode)}

## 128-token prefill, 5632x2048 4-bit g128 asym (ms, relative error of the output vs float32)

| threads | path | ms | rel. error |
|---|---|---|---|
{chr(10).join(prefill)}
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gemv_layer.md").write_text(text)
    print(f"wrote {RESULTS / 'gemv_layer.md'}")


if __name__ == "__main__":
    main()
