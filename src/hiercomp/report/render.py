"""Render collected variants as one Markdown or one self-contained HTML report.

The report holds: a table (variant, method, size, bits per weight, perplexity, KL, top-1, encoder metrics, each
task metric, verdicts), quality-vs-size plots with the Pareto front, per-layer bits and error per variant, and a
section on where perplexity and the task verdicts disagree. HTML embeds its pictures (one file to send);
Markdown writes them into a ``<name>_files/`` folder beside it. Both are written atomically.
"""

from __future__ import annotations

import base64
import datetime
import html
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hiercomp.errors import HiercompError
from hiercomp.io.atomic import atomic_dir
from hiercomp.report.collect import EvalOptions, Variant
from hiercomp.report.files import write_text_atomic
from hiercomp.report.plots import format_bytes, layer_allocation, quality_vs_size, series_colors, uses_log_scale
from hiercomp.tasks.runner import COUNT_KEYS  # entries of a task's scores that are not metrics


@dataclass(frozen=True)
class Metric:
    """A scalar of evaluate()'s result shown as a column and, where it measures quality, as a plot."""

    key: str
    label: str
    fmt: str
    lower_is_better: bool
    plot_reference: bool  # False where the reference's value is trivial by definition (KL 0, agreement 1)


METRICS = (
    Metric("perplexity", "perplexity", ".3f", True, True),
    Metric("kl", "KL(orig‖this)", ".4g", True, False),
    Metric("top1_agreement", "top-1 agreement", ".4f", False, False),
    Metric("cosine", "cosine to orig", ".4f", False, False),
    Metric("recall_at_1", "recall@1", ".4f", False, True),
)
# Which metrics get a quality-vs-size plot (top-1 agreement mirrors KL and would only repeat it).
PLOTTED = ("kl", "perplexity", "cosine", "recall_at_1")
VERDICT_MARK = {"matches": "matches", "worse": "WORSE", "better": "better", "within noise": "within noise"}


@dataclass
class Figure:
    caption: str
    path: Path


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: Any, fmt: str) -> str:
    return format(float(value), fmt) if _number(value) else "—"


def task_columns(variants: list[Variant]) -> list[tuple[str, str]]:
    """(task, metric) pairs in order of first appearance over all variants (counts such as "n" left out)."""
    columns: list[tuple[str, str]] = []
    for variant in variants:
        for task, scores in (variant.metrics.get("tasks") or {}).items():
            for metric in scores:
                if metric not in COUNT_KEYS and (task, metric) not in columns:
                    columns.append((task, metric))
    return columns


def _verdict(variant: Variant, key: str, metric: str | None = None) -> str | None:
    verdicts = variant.metrics.get("verdicts") or {}
    value = verdicts.get(key)
    if metric is not None:
        value = value.get(metric) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def _with_verdict(text: str, verdict: str | None, interval: list[float] | None = None) -> str:
    """``0.6000 (within noise, −0.033 [−0.100, +0.033])``: the verdict, and the difference's 95% interval."""
    if not verdict:
        return text
    spread = f"; diff [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
    return f"{text} ({VERDICT_MARK.get(verdict, verdict)}{spread})"


def _interval(variant: Variant, task: str, metric: str) -> list[float] | None:
    found = ((variant.metrics.get("intervals") or {}).get(task) or {}).get(metric)
    return found if isinstance(found, list) and len(found) == 2 else None


def disagreements(variant: Variant, reference: Variant | None = None) -> list[str]:
    """The evaluation's own disagreement notes; else the task runner's rule applied to the variant's verdicts."""
    if "disagreements" in variant.metrics:
        return [str(line) for line in variant.metrics["disagreements"] or []]
    verdicts = variant.metrics.get("verdicts")
    if not verdicts:
        return []
    try:
        from hiercomp.tasks import disagreements as runner_disagreements
    except ImportError:  # a hiercomp without the task runner has no verdicts to compare either
        return []
    ref = reference.metrics if reference is not None else {}
    return runner_disagreements(verdicts, variant.metrics.get("tasks"), ref.get("tasks"),
                                variant.metrics.get("perplexity"),
                                variant.metrics.get("reference_perplexity", ref.get("perplexity")))


def _probes_cell(variant: Variant) -> str:
    probes = variant.metrics.get("probes") or {}
    return "; ".join(f"{name}: {VERDICT_MARK.get(v, v)}" for name, v in probes.items()) or "—"


def _counts_text(scores: dict[str, Any]) -> str:
    """``n=20, 13 truncated``: how many questions, and how many prompts were cut to fit (never silent)."""
    parts = [f"n={scores['n']}"] if scores.get("n") is not None else []
    parts += [f"{scores['truncated']} truncated"] if scores.get("truncated") else []
    return ", ".join(parts)


def _shared_counts(variants: list[Variant], task: str) -> str:
    """The task's counts when every variant that ran it has the same ones, else ''."""
    texts = {_counts_text(scores) for v in variants if (scores := (v.metrics.get("tasks") or {}).get(task))}
    return texts.pop() if len(texts) == 1 else ""


def table_rows(variants: list[Variant]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table; columns nobody has are left out."""
    metrics = [m for m in METRICS if any(_number(v.metrics.get(m.key)) for v in variants)]
    tasks = task_columns(variants)
    header = ["variant", "method", "size", "bits/weight"] + [m.label for m in metrics]
    # Counts the same for every variant (the usual case: same questions, same prompts) go in the header.
    shared = {task: _shared_counts(variants, task) for task, _ in tasks}
    header += [f"{task} {metric}" + (f" ({shared[task]})" if shared[task] else "") for task, metric in tasks]
    with_probes = any(v.metrics.get("probes") for v in variants)
    header += ["knowledge probes"] if with_probes else []
    rows = []
    for v in variants:
        size = v.size_bytes if v.size_bytes is not None else v.metrics.get("size_bytes")
        bits = v.bits_per_weight if v.bits_per_weight is not None else v.metrics.get("bits_per_weight")
        row = [v.name, v.method,
               f"{format_bytes(size, digits=4)} ({int(size):,} B)" if _number(size) else "—", format_value(bits, ".3f")]
        row += [_with_verdict(format_value(v.metrics.get(m.key), m.fmt), _verdict(v, m.key)) for m in metrics]
        for task, metric in tasks:
            scores = (v.metrics.get("tasks") or {}).get(task, {})
            cell = format_value(scores.get(metric), ".4f")
            if _number(scores.get(metric)) and not shared[task]:
                cell += f" ({_counts_text(scores)})"
            row.append(_with_verdict(cell, _verdict(v, task, metric), _interval(v, task, metric)))
        row += [_probes_cell(v)] if with_probes else []
        rows.append(row)
    return header, rows


def _family(variant: Variant) -> str:
    """The plot series a variant belongs to (see :func:`hiercomp.report.collect.method_family`)."""
    return "original" if variant.is_reference else variant.family


def _quality_series(variants: list[Variant], value_of: Any, plot_reference: bool) -> tuple[dict, dict]:
    series: dict[str, list[tuple[float, float]]] = {}
    labels: dict[str, list[str]] = {}
    for v in variants:
        size = v.size_bytes if v.size_bytes is not None else v.metrics.get("size_bytes")
        value = value_of(v)
        if not (_number(size) and _number(value)) or (v.is_reference and not plot_reference):
            continue
        family = _family(v)
        series.setdefault(family, []).append((float(size), float(value)))
        labels.setdefault(family, []).append("original" if v.is_reference else v.name)
    return series, labels


def make_figures(variants: list[Variant], folder: Path, title: str) -> list[Figure]:
    """Every picture of the report, as PNGs in ``folder``; one colour per method family across all of them."""
    figures: list[Figure] = []
    colors = series_colors([_family(v) for v in variants])
    plots: list[tuple[str, str, bool, bool, Any]] = [
        (m.key, m.label, m.lower_is_better, m.plot_reference, lambda v, k=m.key: v.metrics.get(k))
        for m in METRICS if m.key in PLOTTED]
    # One plot per task, of its first (headline) metric; the table has the others.
    headline: dict[str, str] = {}
    for task, metric in task_columns(variants):
        headline.setdefault(task, metric)
    for task, metric in headline.items():
        plots.append((f"{task}-{metric}", f"{task} {metric}", False, True,
                      lambda v, t=task, m=metric: (v.metrics.get("tasks") or {}).get(t, {}).get(m)))
    for key, label, lower, with_ref, value_of in plots:
        series, labels = _quality_series(variants, value_of, with_ref)
        if sum(len(points) for points in series.values()) < 1:
            continue
        path = quality_vs_size(series, folder / f"quality-{_slug(key)}.png", ylabel=label, lower_is_better=lower,
                               labels=labels, title=f"{label} vs size on disk", colors=colors)
        figures.append(Figure(_quality_caption(label, series, lower, with_ref), path))
    for n, v in enumerate(variants):
        if v.layers:
            path = layer_allocation(v.layers, folder / f"layers-{n:02d}-{_slug(v.name)}.png",
                                    title=f"{v.name}: bits per weight and relative output error per layer")
            figures.append(Figure(_layers_caption(v), path))
    return figures


def _quality_caption(label: str, series: dict[str, list[tuple[float, float]]], lower: bool, with_ref: bool) -> str:
    """What the quality-vs-size picture shows, as drawn: axes, series, the front, and what is left out."""
    points = [p for pts in series.values() for p in pts]
    scales = [name for name, values in (("size", [p[0] for p in points]), (label, [p[1] for p in points]))
              if uses_log_scale(values)]
    parts = [f"{label} ({'lower' if lower else 'higher'} is better) against the size of the weights file "
             "(KB/MB = powers of 1000)",
             "one colour per method; variants of one method are joined in order of size"]
    if scales:
        parts.append(f"log scale on {' and '.join(scales)}")
    parts.append("the dashed black line joins the Pareto front: a circled variant has nothing both smaller and "
                 "better")
    if not with_ref:
        parts.append("the original is not drawn (its value is trivial by definition)")
    return "; ".join(parts)


def _layers_caption(variant: Variant) -> str:
    parts = [f"{variant.name}: bits per weight of each layer in model order (blue bars)",
             "relative output error on the calibration inputs (dots, right axis, log scale)"]
    if any(isinstance(row.get("sparsity"), (int, float)) and row["sparsity"] > 0 for row in variant.layers):
        parts.append("fraction of weights removed (lower panel)")
    if any(row.get("removed") for row in variant.layers):
        parts.append("layers of removed sub-blocks crossed out in red (0 bits)")
    return "; ".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


def _protocol_lines(variants: list[Variant]) -> list[str]:
    """How perplexity and KL were measured (the windows), as the evaluations report it; one line per protocol."""
    seen: dict[tuple[Any, ...], list[str]] = {}
    for v in variants:
        m = v.metrics
        if _number(m.get("seq_len")) and _number(m.get("n_windows")):
            key = (m["seq_len"], m["n_windows"], m.get("n_tokens"))
            seen.setdefault(key, []).append(v.name)
    lines = []
    for (seq_len, n_windows, n_tokens), names in seen.items():
        whom = "" if len(seen) == 1 else f" ({', '.join(names)})"
        tokens = f", {int(n_tokens):,} predicted tokens" if _number(n_tokens) else ""
        lines.append(f"perplexity and KL{whom}: {int(n_windows)} non-overlapping windows of {int(seq_len)} tokens"
                     f"{tokens}; BOS at the start of each window when the tokenizer adds one; the final partial "
                     "window dropped (README, 'How quality is measured')")
    return lines


def _options_lines(options: EvalOptions, variants: list[Variant] = ()) -> list[str]:
    lines = [f"generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by hiercomp report"]
    for label, value in (("evaluation text", options.text), ("reference (original)", options.reference),
                         ("tasks", ", ".join(options.tasks) if options.tasks else None),
                         ("task data", options.data_dir), ("SQuAD pairs", options.squad),
                         ("limit (examples per task, or SQuAD pairs)", options.limit), ("seed", options.seed)):
        if value is not None:
            lines.append(f"{label}: {value}")
    lines += _protocol_lines(list(variants))
    if options.reference is not None and options.wanted:
        lines.append("the original is evaluated once; every variant's verdicts compare with those numbers")
    if not options.wanted:
        lines.append("no evaluation asked for (give --text, --tasks or --squad): sizes and layers only")
    return lines


NOTES = ("size is the bytes of the saved weights file (model.safetensors); bits/weight counts every stored bit "
         "(codes, scales, zeros, masks, indices) over the compressed layers only",
         "a verdict compares with the original: 'matches' when within 5% (relative) of it, as LLM-KICK defines it; "
         "else 'better' or 'WORSE' when the 95% interval of the difference (this − original; paired over the same "
         "questions) excludes 0, and 'within noise' when it includes 0",
         "sizes in KB/MB are powers of 1000 (KB = 1000 bytes); the exact byte count is beside each")


def _disagreement_lines(variants: list[Variant]) -> list[str]:
    reference = next((v for v in variants if v.is_reference), None)
    lines = [f"{v.name}: {line}" for v in variants if not v.is_reference for line in disagreements(v, reference)]
    if lines:
        return lines
    if not any(v.metrics.get("verdicts") for v in variants):
        return ["no verdicts to compare: give --reference and --tasks to judge each variant against the original"]
    return ["none: for every variant, perplexity and the task verdicts tell the same story"]


def render_markdown(variants: list[Variant], figures: list[Figure], options: EvalOptions, title: str,
                    asset_dir_name: str) -> str:
    header, rows = table_rows(variants)
    esc = [[cell.replace("|", "\\|") for cell in row] for row in [header] + rows]
    out = [f"# {title}", ""] + [f"- {line}" for line in _options_lines(options, variants)] + [""]
    out += ["## Variants", "", "| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    out += [""] + [f"- {note}" for note in NOTES] + ["", "## Where perplexity and tasks disagree", ""]
    out += [f"- {line}" for line in _disagreement_lines(variants)] + ["", "## Pictures", ""]
    for fig in figures:
        out += [f"![{fig.caption}]({asset_dir_name}/{fig.path.name})", "", f"*{fig.caption}*", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td:nth-child(1),td:nth-child(2){text-align:left}tr.baseline{background:#f7f7e8}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:0.9em;color:#555}"""


def render_html(variants: list[Variant], figures: list[Figure], options: EvalOptions, title: str) -> str:
    header, rows = table_rows(variants)
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><ul>"]
    parts += [f"<li>{esc(line)}</li>" for line in _options_lines(options, variants)]
    parts += ["</ul><h2>Variants</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for variant, row in zip(variants, rows):
        css = " class='baseline'" if variant.is_reference else ""
        parts.append(f"<tr{css}>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>")
    parts += ["</table><ul>"] + [f"<li>{esc(note)}</li>" for note in NOTES] + ["</ul>"]
    parts += ["<h2>Where perplexity and tasks disagree</h2><ul>"]
    parts += [f"<li>{esc(line)}</li>" for line in _disagreement_lines(variants)] + ["</ul><h2>Pictures</h2>"]
    for fig in figures:
        data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{esc(fig.caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(fig.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def check_report_path(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise HiercompError(f"--out {out} must end in .html or .md (the extension picks the format)")
    if out.exists() and not out.is_file():
        raise HiercompError(f"{out} exists and is not a file; choose another --out")
    if out.exists() and not force:
        raise HiercompError(f"{out} already exists; choose another --out or pass --force to replace it")
    return out


def write_report(variants: list[Variant], out: str | Path, options: EvalOptions, *, title: str = "",
                 force: bool = False) -> Path:
    """Write ``out`` (.html: one self-contained file; .md: the file plus ``<stem>_files/`` of PNGs)."""
    out = check_report_path(out, force)
    kind = out.suffix.lower()
    title = title or f"hiercomp report: {len([v for v in variants if not v.is_reference])} variant(s)"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hiercomp-report-", dir=out.parent) as scratch:
        figures = make_figures(variants, Path(scratch), title)
        if kind == ".md":
            assets = out.with_name(f"{out.stem}_files")
            with atomic_dir(assets, force=True) as tmp:
                for fig in figures:
                    shutil.copyfile(fig.path, tmp / fig.path.name)
            text = render_markdown(variants, figures, options, title, assets.name)
        else:
            text = render_html(variants, figures, options, title)
    return write_text_atomic(out, text + "\n")
