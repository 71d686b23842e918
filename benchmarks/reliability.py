"""Reliability (#14): bad inputs and faults, kill -9 then --resume, same seed same bytes.

`nice -n 10 python benchmarks/reliability.py` writes benchmarks/results/reliability.md (about 10 min on 2 shared
cores). Three tables, all on stories260K (5 blocks) with 8 TinyStories calibration windows of 64 tokens:

1. every case of the reliability matrix (tests/reliability/cases.py, the same cases the test suite runs): its
   input, the message, the exit code; counts of silent results (exit 0 on a bad input) and of tracebacks;
2. `hiercomp compress` processes killed with SIGKILL during calibration, mid-blocks and during save (the
   process kills itself where $HIERCOMP_TEST_KILL_AT says, so the point is exact), then rerun with `--resume`:
   every file's sha256 against an uninterrupted run's;
3. every registered method run twice, in two processes, with one seed: every file's sha256 equal or not
   (``--kill-every-method``: each also killed mid-blocks and resumed, in table 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, STORIES, TINYSTORIES, machine, markdown_table, require_shared  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.reliability.cases import CASES, prepare_env, run_case  # noqa: E402
from tests.reliability.resume_runs import (  # noqa: E402
    KILL_POINTS,
    checksums,
    compress_argv,
    differing,
    kill_then_resume,
    run_process,
)


def cell(text: str, root: Path) -> str:
    """A message as a table cell: temporary paths shortened, pipes escaped."""
    return str(text).replace(str(root), "…").replace("|", "\\|").strip()


def matrix(root: Path) -> tuple[list[dict], dict[str, int]]:
    env = prepare_env(root / "env")
    rows = []
    for i, case in enumerate(CASES):
        outcome = run_case(case, env, root / "cases" / f"{i:03d}")
        rows.append({"kind": case.kind, "case": case.name, "code": outcome.code, "expected": case.code,
                     "message": cell(outcome.traceback or outcome.message, root),
                     "left": ", ".join(outcome.left_behind) or "nothing", "ok": "yes" if outcome.ok else "**no**",
                     "silent": outcome.silent, "traceback": outcome.traceback is not None})
    counts = {"cases": len(rows), "ok": sum(r["ok"] == "yes" for r in rows), "silent": sum(r["silent"] for r in rows),
              "tracebacks": sum(r["traceback"] for r in rows),
              "left behind": sum(r["left"] != "nothing" for r in rows)}
    return rows, counts


def short(digest: str | None) -> str:
    return "–" if not digest else digest[:12]


def same_seed_and_resume(root: Path, text: Path, methods: list[str], points: dict[str, list[str]]) -> tuple[list, list]:
    """Per method: two uninterrupted processes (a, b), and kill -9 + --resume at each of its points."""
    same_rows, resume_rows = [], []
    for method in methods:
        start = time.perf_counter()
        runs = {}
        for run in ("a", "b"):
            out = root / method / run / "out"
            out.parent.mkdir(parents=True)
            done = run_process(compress_argv(STORIES, out, method, text))
            if done.returncode != 0:
                raise SystemExit(f"{method} run {run} failed: {done.stderr.strip().splitlines()[-1:]}")
            runs[run] = out
        sums_a, sums_b = checksums(runs["a"]), checksums(runs["b"])
        files = [n for n in sums_a if not n.startswith("hiercomp.json")]
        same_rows.append({
            "method": method, "files": len(files) + 1, "weights": short(sums_a.get("model.safetensors")),
            "bytes_equal": f"{sum(sums_a[n] == sums_b.get(n) for n in files)}/{len(files)}",
            "meta": "yes" if sums_a["hiercomp.json (without times)"] == sums_b["hiercomp.json (without times)"]
            else "**no**",
            "raw_meta": "yes" if sums_a["hiercomp.json"] == sums_b["hiercomp.json"] else "no (wall times)",
            "equal": "yes" if not differing(runs["a"], runs["b"]) else "**no**"})
        for point in points.get(method, []):
            result = kill_then_resume(STORIES, text, method, point, root / method / point.replace(":", "_"),
                                      runs["a"])
            resumed = root / method / point.replace(":", "_") / "out"
            resume_rows.append({
                "method": method, "point": KILL_POINTS.get(point, point), "hook": point,
                "killed": "SIGKILL" if result.killed_code == -9 else str(result.killed_code),
                "left": ", ".join(n.split("-")[0] + "-…" if "-" in n else n for n in result.left),
                "note": cell(result.note.removeprefix("note: "), root),
                "resumed": result.resumed_code,
                "weights": short(checksums(resumed).get("model.safetensors")) if resumed.is_dir() else "–",
                "reference": short(sums_a.get("model.safetensors")),
                "files": f"{len(files) - len([d for d in result.differing if not d.startswith('hiercomp')])}"
                         f"/{len(files)} + hiercomp.json (without times) "
                         f"{'equal' if 'hiercomp.json (without times)' not in result.differing else 'DIFFERS'}",
                "after": ", ".join(result.after),
                "identical": "yes" if result.identical else "**no**"})
        print(f"{method}: {time.perf_counter() - start:.0f} s", flush=True)
    return same_rows, resume_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--kill-every-method", action="store_true",
                        help="also kill -9 every method mid-blocks and resume it (about 6 min more)")
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(1)
    from hiercomp.methods import METHODS

    methods = args.methods or sorted(METHODS)
    # rtn and gptq at the three points; awq mid-blocks: it feeds each block the original model's activations and
    # folds scales into the norms, the case where recomputing instead of restoring would go wrong
    points = {m: ["block:2"] for m in methods} if args.kill_every_method else {"awq": ["block:2"]}
    points.update({m: list(KILL_POINTS) for m in ("rtn", "gptq") if m in methods})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hiercomp-reliability-") as tmp:
        root = Path(tmp)
        text = root / "text.txt"
        text.write_text(TINYSTORIES.read_text()[:20000])
        matrix_rows, counts = matrix(root / "matrix")
        print(f"matrix: {counts}", flush=True)
        same_rows, resume_rows = same_seed_and_resume(root / "runs", text, methods, points)
    minutes = (time.perf_counter() - started) / 60

    n_resume_ok = sum(r["identical"] == "yes" for r in resume_rows)
    n_same_ok = sum(r["equal"] == "yes" for r in same_rows)
    lines = [
        "# Reliability: bad inputs and faults, kill -9 then --resume, same seed same bytes",
        "",
        f"`nice -n 10 python benchmarks/reliability.py` · {machine()} · {minutes:.1f} min",
        "",
        "All on stories260K (`../shared/data/models/stories260K/hf`, 5 blocks); calibration: the first 20 000 "
        "characters of the TinyStories sample, `--calib-n 8 --calib-len 64`; every `hiercomp compress` process "
        "runs on one thread (`OMP_NUM_THREADS=1`).",
        "",
        "## Summary",
        "",
        f"- Bad inputs and faults: **{counts['cases']} cases, {counts['ok']} as expected; "
        f"{counts['silent']} silent results (exit 0 on a bad input), {counts['tracebacks']} tracebacks, "
        f"{counts['left behind']} with anything left behind.**",
        f"- kill -9 then `--resume`: **{n_resume_ok}/{len(resume_rows)} byte-identical** to an uninterrupted run "
        "(every file's sha256; `hiercomp.json` compared without its wall times, see below).",
        f"- Same seed, two processes: **{n_same_ok}/{len(same_rows)} methods write byte-identical files.**",
        "",
        "`hiercomp.json` records wall-clock seconds (per layer and in total), so its raw bytes differ between any "
        "two runs, interrupted or not; every other file is compared byte for byte, and `hiercomp.json` by the "
        "sha256 of its content without the `seconds` fields (everything else in it: layer configs, the "
        "weights' content hash, the report's errors and bits, the plan).",
        "",
        "## 1. Bad inputs and faults (tests/reliability/cases.py)",
        "",
        "Each case runs `hiercomp.cli.main([...])` in process with stdin closed (a prompt must never wait); "
        "judged on the exit code, the message (one `error:` line, no traceback) and the case folder's listing "
        "(no output, no temporary folder left). Faults on a tmpfs when run as root (disk full: 64 KB, read-only "
        "remount), else injected in the writer. The same table is the test `tests/reliability/test_bad_inputs.py`.",
        "",
        markdown_table(matrix_rows, [("kind", "kind", None), ("case", "input", None), ("code", "exit", None),
                                     ("message", "message (last line)", None), ("left", "left behind", None),
                                     ("ok", "as expected", None)]),
        "",
        "## 2. kill -9 during calibration, mid-blocks and during save, then `--resume`",
        "",
        "`HIERCOMP_TEST_KILL_AT=calibration` kills after the first block's calibration inputs are captured (no block "
        "finished); `block:2` after the first layer of block 2 is compressed (blocks 0-1 finished and "
        "checkpointed, block 2 half done); `save` after `model.safetensors` is written into the output's "
        "temporary folder. The rerun is the same command with `--resume`. \"weights\" / \"reference\": sha256 of "
        "`model.safetensors` (12 hex digits) of the resumed run and of the uninterrupted run of table 3 (run a).",
        "",
        markdown_table(resume_rows, [("method", "method", None), ("point", "killed", None), ("hook", "hook", None),
                                     ("killed", "exit", None), ("left", "left beside --out", None),
                                     ("note", "the resumed run said", None), ("resumed", "exit", None),
                                     ("weights", "weights sha256", None), ("reference", "reference sha256", None),
                                     ("files", "files equal", None), ("after", "after", None),
                                     ("identical", "identical", None)]),
        "",
        "## 3. Every method, one seed, two processes",
        "",
        "`hiercomp compress stories260K --method M --calib … --seed 0` (each method's defaults) twice, each in its "
        "own process; \"bytes equal\": files other than `hiercomp.json` with equal sha256.",
        "",
        markdown_table(same_rows, [("method", "method", None), ("files", "files", None),
                                   ("weights", "model.safetensors sha256", None),
                                   ("bytes_equal", "bytes equal", None),
                                   ("meta", "hiercomp.json equal without times", None),
                                   ("raw_meta", "hiercomp.json raw bytes", None),
                                   ("equal", "sha256 equal", None)]),
        "",
        "## What this does not show",
        "",
        "- A kill during the depth-pruning, recovery, tuning or budget-search steps before or after the block loop: "
        "those are redone by the resumed run (the search keeps its own checkpoint, `search --checkpoint`).",
        "- Power loss: checkpoints are renamed into place but not fsynced; a resume checks each checkpoint's "
        "content hash and refuses a damaged one in one line (tested), it does not repair it.",
        "- Ctrl-C and SIGTERM unwind and remove the checkpoints with every other temporary output (the matrix's "
        "\"nothing left behind\"): only a hard kill can be resumed.",
        "- `--stream` runs do not checkpoint.",
        "",
    ]
    (RESULTS / "reliability.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'reliability.md'} in {minutes:.1f} min")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
