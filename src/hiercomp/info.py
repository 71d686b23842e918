"""`hiercomp info`: what a model folder holds, layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hiercomp.io.hf import is_compressed_dir


def _fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def describe(ref: str | Path) -> tuple[str, dict[str, Any]]:
    """A printable per-layer table and the same facts as a dict."""
    if is_compressed_dir(ref):
        return _describe_compressed(Path(ref))
    return _describe_original(str(ref))


def _describe_compressed(path: Path) -> tuple[str, dict[str, Any]]:
    from hiercomp.api import saved_size_bytes
    from hiercomp.io.saved import read_meta

    meta = read_meta(path)
    report = meta.get("report", {})
    layers = report.get("layers", [])
    sizes = saved_size_bytes(path)
    width = max([len(r["name"]) for r in layers] + [5])
    # The method column is as wide as its longest entry: a cut description would misstate the parameters.
    method_width = max([len(r["method"]) for r in layers] + [6])
    lines = [f"{'layer':<{width}}  {'method':<{method_width}} {'shape':>11} {'bpw':>7} {'rel.out.err':>11} "
             f"{'rel.w.err':>10}"]
    for r in layers:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(f"{r['name']:<{width}}  {r['method']:<{method_width}} {shape:>11} {r['bits_per_weight']:>7.3f} "
                     f"{_fmt_err(r['rel_output_error']):>11} {_fmt_err(r['rel_weight_error']):>10}")
    bpw = report.get("bits_per_weight", 16.0)
    lines.append("")
    lines.append(f"{len(layers)} compressed layers, {report.get('compressed_weights', 0):,} weights, "
                 f"{bpw:.4f} bits per weight (codes + scales + zeros + masks + indices + biases)")
    lines.append(f"weights file {sizes['size_bytes']:,} bytes (header {sizes['header_bytes']:,}); "
                 f"accounted {meta.get('accounted_bytes', 0):,.1f} bytes; source {meta.get('source')}")
    removed = meta.get("removed", [])
    lines += _removed_lines(removed, report)
    data = {"model": str(path), "source": meta.get("source"), "bits_per_weight": bpw,
            "size_bytes": sizes["size_bytes"], "accounted_bytes": meta.get("accounted_bytes"),
            "header_bytes": sizes["header_bytes"], "compressed_weights": report.get("compressed_weights"),
            "recipe": meta.get("recipe"), "layers": layers}
    if removed:
        data["removed"] = removed
        data["bits_per_weight_incl_removed"] = _bpw_incl_removed(removed, report)
        data["recovery"] = meta.get("recovery")
    return "\n".join(lines), data


def _bpw_incl_removed(removed: list[dict[str, Any]], report: dict[str, Any]) -> float:
    """Compressed layers' bits over their weights plus the removed layers' weights (removed = 0 bits)."""
    weights = report.get("compressed_weights", 0) + sum(r.get("linear_weights", 0) for r in removed)
    return report.get("compressed_bits", 0) / weights if weights else 0.0


def _removed_lines(removed: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Depth pruning: one line per removed unit (stored in 0 bytes), and bits per weight counting them."""
    if not removed:
        return []
    lines = ["", f"removed by depth pruning ({len(removed)}; stored in 0 bytes):"]
    lines += [f"  {r['name']:<40} {r.get('kind', '?'):<6} {r.get('params', 0):>12,} params, "
              f"{r.get('linear_weights', 0):,} linear weights" for r in removed]
    lines.append(f"{_bpw_incl_removed(removed, report):.4f} bits per weight over compressed + removed layers "
                 "(removed layers count 0 bits)")
    return lines


def _describe_original(ref: str) -> tuple[str, dict[str, Any]]:
    from hiercomp.hierarchy import walk
    from hiercomp.io.hf import load_hf_model

    loaded = load_hf_model(ref)
    hierarchy = walk(loaded.model)
    rows = hierarchy.table()
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'block':>5} {'shape':>11} {'params':>12}"]
    for r in rows:
        block = "-" if r["block"] is None else str(r["block"])
        lines.append(f"{r['name']:<{width}}  {block:>5} {r['shape'][0]}x{r['shape'][1]:<6} {r['params']:>12,}")
    total = sum(p.numel() for p in loaded.model.parameters())
    lines.append("")
    lines.append(f"{type(loaded.model).__name__}: {len(hierarchy.blocks)} blocks under '{hierarchy.blocks_name}', "
                 f"{len(rows)} linear layers, {total:,} parameters (uncompressed)")
    data = {"model": ref, "class": type(loaded.model).__name__, "blocks": len(hierarchy.blocks),
            "parameters": total, "layers": rows}
    return "\n".join(lines), data
