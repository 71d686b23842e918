"""`hiercomp report`: compare compressed variants of one model in one Markdown or HTML file with plots."""

from __future__ import annotations

from pathlib import Path

from hiercomp.report.collect import CACHE_DIR_NAME, EvalOptions, Variant, collect
from hiercomp.report.render import check_report_path, write_report

__all__ = ["EvalOptions", "Variant", "collect", "make_report", "write_report"]


def make_report(dirs: list[str], out: str | Path, options: EvalOptions | None = None, *, from_json: list[str] = (),
                force: bool = False, refresh: bool = False, title: str = "", progress: bool = True) -> Path:
    """Evaluate (or read from cache) every folder and write the report to ``out`` (.html or .md).

    Evaluations are cached in ``.hiercomp_report_cache/`` beside ``out``: rerunning with the same folders and
    options only redraws; ``refresh`` evaluates again.
    """
    out = Path(out)
    options = options or EvalOptions()
    # Refuse an existing output before the (slow) evaluation, not after it.
    check_report_path(out, force)
    variants = collect(list(dirs), options, from_json=list(from_json), cache_dir=out.parent / CACHE_DIR_NAME,
                       refresh=refresh, progress=progress)
    return write_report(variants, out, options, title=title, force=force)
