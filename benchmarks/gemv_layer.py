"""One quantized linear layer at batch 1 (decode) and 128 tokens (prefill): dense float32 ``F.linear``, torch's
CPU int4 kernel (hiercomp's ``Int4Kernel``) and the native kernel (``NativeLowBitKernel``, gemv.cpp).

Two timings per case, medians of many calls:
- hot: the same layer again and again (its weights stay in the last-level cache: a best case);
- cold: a rotation over copies of the layer holding ≥ 3x the L3 size, so every call streams its weights from
  memory, as in a real model's decode step.
GB/s: the bytes each kernel holds for the layer (dense: float32 weight; int4: packed codes + bfloat16
scale/zero pairs; native: packed codes + float16 scales and zeros) over the time.
Narrow layouts: the same 2- and 3-bit codes held on the 4-bit layout (as before the 2-bit and 3-bit layouts) and
on their own, batch 1, hot and cold, in alternating rounds (the medians of each round, then the median over the
rounds: a shared machine's load drifts between rounds, and alternating exposes both layouts to it alike).
Writes benchmarks/results/gemv_layer.md.

    python benchmarks/gemv_layer.py                 # 1 and 2 threads (about 3 minutes)
    python benchmarks/gemv_layer.py --threads 2 --quick
    python benchmarks/gemv_layer.py --threads 1 --layouts-only   # only the narrow-layout section, in place
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
LAYOUT_GRIDS = [("2-bit g128 asym", 2), ("3-bit g128 asym", 3)]  # 5632x2048, group 128
LAYOUT_HEAD = "## Narrow layouts: 2- and 3-bit codes on the 4-bit layout vs their own (batch 1)"
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


def grid(out_f: int, in_f: int, group: int, symmetric: bool, seed: int, bits: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    levels = 1 << bits
    codes = torch.randint(0, levels, (out_f, in_f), generator=g)
    scale = (torch.rand(out_f, in_f // group, generator=g) * 0.01 + 1e-3).half().float()
    zero = (torch.full_like(scale, levels / 2) if symmetric
            else torch.randint(0, levels, scale.shape, generator=g).float())
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


def layout_rows(threads: int, rounds: int = 7, calls: int = 200) -> list[str]:
    """Batch 1 on a 5632x2048 layer: 2- and 3-bit codes on the 4-bit layout (old) and on their own (new)."""
    torch.set_num_threads(threads)
    out_f, in_f, group = 5632, 2048, 128
    x = torch.randn(1, in_f)
    rows = []
    for label, bits in LAYOUT_GRIDS:
        args = grid(out_f, in_f, group, False, 0, bits)
        copies, times = {}, {}
        for layout in (4, bits):
            first = NativeLowBitKernel(*args, group, bits=layout)
            count = max(1, -(-COLD_BYTES // first.nbytes()))
            copies[layout] = [first] + [NativeLowBitKernel(*args, group, bits=layout) for _ in range(1, count)]
            times[layout] = ([], [])
        ref = copies[4][0](x)
        assert torch.equal(copies[bits][0](x), ref)  # the same sums: only the layout differs
        for _ in range(rounds):
            for layout, ks in copies.items():
                hot, cold = times[layout]
                hot.append(median_ms(lambda k=ks[0]: k(x), calls, seconds=0.3))
                cold.append(median_ms(lambda ks=ks: [k(x) for k in ks], max(3, calls // len(ks)), seconds=0.3)
                            / len(ks))
        cells = []
        for layout in (4, bits):
            hot, cold = (statistics.median(t) for t in times[layout])
            size = copies[layout][0].nbytes()
            cells.append(f"{hot:.3f} / {cold:.3f} ({size / cold / 1e6:.1f}) | {size / 2**20:.2f}")
        old_cold, new_cold = (statistics.median(times[layout][1]) for layout in (4, bits))
        old_hot, new_hot = (statistics.median(times[layout][0]) for layout in (4, bits))
        rows.append(f"| {threads} | {out_f}x{in_f} | {label} | " + " | ".join(cells)
                    + f" | {old_hot / new_hot:.2f}x / {old_cold / new_cold:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def layout_section(rows: list[str], when: str) -> str:
    return f"""{LAYOUT_HEAD}

The same codes, scales and zeros held on the 4-bit (nibble) layout, as every 1-4 bit grid was before the narrow
layouts, and on their own layout (2 bits: four codes per byte; 3 bits: the 2-bit layout plus a high bit plane).
Both give bit-identical outputs. Cells: hot ms / cold ms (cold GB/s of the held bytes) | held MiB (packed codes +
float16 scales and zeros). Medians over 7 alternating rounds, each the median of ≥ 200 calls (hot) or
≥ 3 rotations over the copies (cold). On one thread the narrow layouts are bound by the integer dot products,
not by memory (hot ≈ cold: two activation levels cost four vpdpbusd per 128 codes at any code width), so the
cold speed-up stays below the byte ratio; the held bytes drop 1.9x (2-bit) and 1.3x (3-bit). {when}

| threads | layer | grid | 4-bit layout (old) | held MiB | own layout (new) | held MiB | speed-up hot / cold |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


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
    parser.add_argument("--layouts-only", action="store_true",
                        help="measure only the narrow layouts and replace their section of the results file")
    args = parser.parse_args()
    if not gemv.available():
        raise SystemExit(f"the native kernel is unavailable here: {gemv.reason()}")
    threads = [int(t) for t in args.threads.split(",")]
    if args.layouts_only:
        layouts = [row for t in threads for row in layout_rows(t)]
        path = RESULTS / "gemv_layer.md"
        old = path.read_text() if path.exists() else ""
        section = layout_section(layouts, f"These rows alone were measured later than the rest of this file "
                                          f"(`--layouts-only`, on {machine()}); the other tables were not re-run.")
        start = old.find(LAYOUT_HEAD)
        if start < 0:  # before the prefill section
            start = end = old.find("## 128-token prefill") if "## 128-token prefill" in old else len(old)
        else:
            end = old.find("\n## ", start + 1) + 1 or len(old)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(old[:start] + section + ("\n" if old[end:] else "") + old[end:])
        print(f"wrote {path}")
        return
    head = ("| threads | layer | grid | dense fp32 | torch int4 | native | native speed-up vs int4 |\n"
            "|---|---|---|---|---|---|---|")
    decode = [row for t in threads for row in decode_rows(t, args.quick)]
    layouts = [row for t in threads for row in layout_rows(t)] if not args.quick else []
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

{layout_section(layouts, "Measured with the rest of this file.")}
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
