"""Pictures of a compression result: quality against size with the Pareto front, and bits per layer.

Used by ``hiercomp report`` and by the budget search (plans drawn beside their files). matplotlib is an
optional dependency (the ``plots`` extra); it is imported on first use with the Agg backend, so drawing works
on a machine without a display. Every picture is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hiercomp.errors import HiercompError
from hiercomp.report.files import atomic_file

# A quality axis whose values span more than this ratio is drawn on a log scale: KL of 8-bit and 2-bit
# variants differ by orders of magnitude, and a linear axis would flatten every good variant onto zero.
LOG_SCALE_RATIO = 20.0
REMOVED_COLOR = "#d62728"
BITS_COLOR = "#4c72b0"
ERROR_COLOR = "#dd8452"
SPARSITY_COLOR = "#55a868"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise HiercompError("pictures need matplotlib: pip install 'hiercomp[plots]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats: none is at most as large AND at least as good.

    ``points`` are (size, quality); smaller size is always better, quality is better lower or higher as
    ``lower_is_better`` says. Of identical points only the first is kept, so the front is a clean line.
    Points with a non-finite coordinate are never on the front. Returned in order of increasing size.
    """
    sign = 1.0 if lower_is_better else -1.0
    finite = [i for i, (size, quality) in enumerate(points) if _is_number(size) and _is_number(quality)]
    order = sorted(finite, key=lambda i: (points[i][0], sign * points[i][1], i))
    front: list[int] = []
    best = math.inf
    for i in order:
        score = sign * points[i][1]
        if score < best:
            front.append(i)
            best = score
    return front


def format_bytes(value: float, digits: int = 3) -> str:
    """``1536`` -> ``1.54 KB`` (powers of 1000, as disk sizes are quoted), ``digits`` significant digits."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {unit}"
    return f"{value:.0f} B"


def _save(fig: Any, out: str | Path) -> Path:
    """Save ``fig`` as PNG to ``out`` atomically and close it."""
    plt = _pyplot()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(out)


ORIGINAL_COLOR = "#222222"


def series_colors(names: Sequence[str]) -> dict[str, Any]:
    """One colour per series name, in the order given ("original" always dark grey): compute it once over every
    variant and pass it to each plot, so that a method has the same colour in all of them."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    others = [n for n in dict.fromkeys(names) if n != "original"]
    out: dict[str, Any] = {name: cmap(k % 10) for k, name in enumerate(others)}
    out["original"] = ORIGINAL_COLOR
    return out


def uses_log_scale(values: Sequence[float]) -> bool:
    """Whether :func:`quality_vs_size` draws an axis of these values on a log scale (for captions)."""
    return _wants_log(values)


def _wants_log(values: Sequence[float]) -> bool:
    positive = [v for v in values if _is_number(v) and v > 0]
    return len(positive) == len([v for v in values if _is_number(v)]) and len(positive) > 1 and \
        max(positive) / min(positive) > LOG_SCALE_RATIO


def quality_vs_size(
    series: dict[str, list[tuple[float, float]]], out: str | Path, *, xlabel: str = "size (bytes)",
    ylabel: str = "KL to original", lower_is_better: bool = True, title: str = "",
    labels: dict[str, list[str]] | None = None, colors: dict[str, Any] | None = None,
) -> Path:
    """Scatter of (size, quality) per series, the Pareto front over all points drawn as a line.

    A series with several points (a ladder of bits, a search's plans) is joined in order of size; ``labels``
    optionally names each point (same order as its series); ``colors`` fixes each series' colour (so one method
    keeps its colour across several plots; :func:`series_colors`). Sizes are printed as KB/MB (powers of 1000)
    when ``xlabel`` talks about bytes. Returns the PNG path.
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    everything: list[tuple[float, float]] = []
    point_labels: list[str] = []
    for name, points in series.items():
        everything.extend((float(s), float(q)) for s, q in points)
        names = (labels or {}).get(name) or []
        point_labels.extend(names[i] if i < len(names) else "" for i in range(len(points)))
    drawable = [i for i, (s, q) in enumerate(everything) if _is_number(s) and _is_number(q)]
    if not drawable:
        raise HiercompError(f"nothing to draw in {out}: every point has a missing size or quality")

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = colors or series_colors(list(series))
    for name, points in series.items():
        good = sorted((float(s), float(q)) for s, q in points if _is_number(s) and _is_number(q))
        if not good:
            continue
        xs, ys = zip(*good)
        style = "-o" if len(good) > 1 else "o"
        ax.plot(xs, ys, style, color=colors.get(name, "grey"), label=name, markersize=6, linewidth=1.2, alpha=0.9,
                zorder=3)

    front = pareto_front(everything, lower_is_better)
    fx = [everything[i][0] for i in front]
    fy = [everything[i][1] for i in front]
    ax.plot(fx, fy, "--", color="black", linewidth=1.0, zorder=2, label="Pareto front")
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)

    # Alternate the label offsets so neighbouring points' labels do not sit on top of each other.
    for n, i in enumerate(sorted((i for i in drawable if point_labels[i]), key=lambda i: everything[i][0])):
        dy = 8 if n % 2 == 0 else -14
        ax.annotate(point_labels[i], everything[i], textcoords="offset points", xytext=(6, dy), fontsize=8,
                    color="#333333", zorder=5)

    ax.margins(x=0.08, y=0.12)  # room for the point labels inside the frame
    xs_all = [everything[i][0] for i in drawable]
    ys_all = [everything[i][1] for i in drawable]
    if _wants_log(xs_all):
        ax.set_xscale("log")
    if _wants_log(ys_all):
        ax.set_yscale("log")
    if "byte" in xlabel.lower():
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_bytes(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    better = "lower is better" if lower_is_better else "higher is better"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} ({better})")
    ax.set_title(title or f"{ylabel} vs size")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return _save(fig, out)


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix all names share (``model.layers.``) so the tick labels stay readable."""
    parts = [name.split(".") for name in names]
    if len(parts) < 2:
        return [p[-1] if p else "" for p in parts]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def _block_of(short_name: str) -> str:
    return short_name.split(".", 1)[0]


def _log_axis(axis: Any, low: float, high: float) -> None:
    """Log scale with short plain labels; labels between the powers of ten only when the range is narrow."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_yscale("log") if axis.axis_name == "y" else axis.axes.set_xscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:.2g}")
    axis.set_major_formatter(plain)
    if high / low < 100:  # under two decades: label 2x and 5x too, or the axis may show a single number
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(NullFormatter())


def layer_allocation(layers: list[dict], out: str | Path, *, title: str = "") -> Path:
    """Bars of bits per weight per layer in model order; removed layers marked; error on a log second axis.

    Each dict: ``name``, ``bits_per_weight``, ``sparsity`` (None when not pruned), ``removed`` (a sub-block
    dropped by depth pruning: no bar, a red cross) and ``rel_error`` (relative output error, or None).
    When any layer is sparse a second panel shows the fraction of weights removed. Returns the PNG path.
    """
    if not layers:
        raise HiercompError(f"no layers to draw in {out}: the variant has no compressed layers")
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = short_layer_names([str(layer.get("name", i)) for i, layer in enumerate(layers)])
    n = len(layers)
    removed = [bool(layer.get("removed")) for layer in layers]
    bits = [0.0 if gone else float(layer.get("bits_per_weight") or 0.0) for layer, gone in zip(layers, removed)]
    errors = [layer.get("rel_error") for layer in layers]
    sparsity = [layer.get("sparsity") for layer in layers]
    has_sparsity = any(_is_number(s) and s > 0 for s in sparsity)

    width = min(24.0, max(7.0, 0.28 * n + 2.0))
    if has_sparsity:
        fig, (ax, ax_sp) = plt.subplots(2, 1, figsize=(width, 6.4), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1.2], "hspace": 0.08})
    else:
        fig, ax = plt.subplots(figsize=(width, 4.8))
        ax_sp = None

    xs = list(range(n))
    # Shade every other block so the eye can find block boundaries in a long row of bars.
    blocks = [_block_of(name) for name in names]
    start = 0
    shade = False
    for i in range(1, n + 1):
        if i == n or blocks[i] != blocks[start]:
            if shade:
                for axis in (ax, ax_sp):
                    if axis is not None:
                        axis.axvspan(start - 0.5, i - 0.5, color="#000000", alpha=0.05, zorder=0)
            shade = not shade
            start = i

    ax.bar(xs, bits, color=BITS_COLOR, width=0.75, zorder=2)
    top = max(bits + [1.0])
    for x, gone in zip(xs, removed):
        if gone:
            ax.plot([x], [top * 0.04], marker="x", color=REMOVED_COLOR, markersize=10, markeredgewidth=2.5, zorder=3)
            ax.axvspan(x - 0.5, x + 0.5, color=REMOVED_COLOR, alpha=0.12, zorder=1, linewidth=0)
    ax.set_ylabel("bits per weight")
    ax.set_ylim(0, top * 1.15)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(True, axis="y", alpha=0.3, zorder=0)

    handles = [Patch(color=BITS_COLOR, label="bits per weight")]
    if any(removed):
        handles.append(Line2D([], [], marker="x", color=REMOVED_COLOR, linestyle="none", markersize=9,
                              markeredgewidth=2.5, label="removed"))
    shown_errors = [(x, float(e)) for x, e, gone in zip(xs, errors, removed) if _is_number(e) and not gone]
    if shown_errors:
        ax_err = ax.twinx()
        ex, ey = zip(*shown_errors)
        if all(v > 0 for v in ey):
            _log_axis(ax_err.yaxis, min(ey), max(ey))
        ax_err.plot(ex, ey, "o", color=ERROR_COLOR, markersize=5, zorder=4)
        ax_err.set_ylabel("relative output error (log)", color=ERROR_COLOR)
        ax_err.tick_params(axis="y", which="both", colors=ERROR_COLOR)
        handles.append(Line2D([], [], marker="o", color=ERROR_COLOR, linestyle="none", label="relative error"))
    # Legend outside the axes, beside the title, so it never hides a bar or an error marker.
    ax.legend(handles=handles, fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
              ncol=len(handles))

    if ax_sp is not None:
        ax_sp.bar(xs, [float(s) if _is_number(s) and not gone else 0.0 for s, gone in zip(sparsity, removed)],
                  color=SPARSITY_COLOR, width=0.75, zorder=2)
        ax_sp.set_ylim(0, 1)
        ax_sp.set_ylabel("sparsity")
        ax_sp.grid(True, axis="y", alpha=0.3, zorder=0)
    bottom = ax_sp if ax_sp is not None else ax
    # A long model cannot show every name; keep every k-th so labels never overlap.
    step = max(1, math.ceil(n / 80))
    bottom.set_xticks(xs[::step])
    bottom.set_xticklabels(names[::step], rotation=90, fontsize=7)
    ax.set_title(title or "bits per layer", loc="left")
    return _save(fig, out)
