"""Tokenizing calibration text: hiercomp's batched token stream against one encode() call per document.

What it measures: wall time to turn the TinyStories sample (`tinystories/valid_sample.txt`, ~170k tokens) into
one token stream with the stories260K tokenizer, best of 5 runs each (the machine is shared: the best run is
the least disturbed). This used to be a timed unit test (`test_tokenizing_is_fast`, < 1 s); speed belongs here.

- `token_stream` (hiercomp.calibration): the fast tokenizer's batched call over all documents at once;
- per-document `encode`: the loop a first version would write, the anchor in the same run on the same text.

    python benchmarks/tokenize_speed.py      # writes benchmarks/results/tokenize_speed.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import RESULTS, STORIES, TINYSTORIES, machine, markdown_table, require_shared  # noqa: E402
from hiercomp.calibration import read_documents, token_stream  # noqa: E402

REPEATS = 5


def best_of(fn, repeats: int = REPEATS) -> tuple[float, int]:
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        times.append(time.perf_counter() - start)
    return min(times), count


def main() -> None:
    require_shared()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(STORIES))
    docs = read_documents(TINYSTORIES)
    batched_s, batched_n = best_of(lambda: token_stream(tokenizer, docs).numel())
    loop_s, loop_n = best_of(lambda: sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in docs))
    rows = [
        {"how": "hiercomp `token_stream` (batched)", "tokens": batched_n, "s": batched_s},
        {"how": "one `encode` per document (anchor)", "tokens": loop_n, "s": loop_s},
    ]
    for row in rows:
        row["rate"] = row["tokens"] / row["s"]
    table = markdown_table(rows, [("how", "tokenizing", None), ("tokens", "tokens", lambda v: f"{v:,}"),
                                  ("s", "seconds (best of 5)", lambda v: f"{v:.3f}"),
                                  ("rate", "tokens / s", lambda v: f"{v:,.0f}")])
    if loop_s > batched_s:
        reading = f"The batched stream is {loop_s / batched_s:.1f}x as fast as the per-document loop."
    else:
        reading = (f"We lose here: the batched stream takes {batched_s / loop_s:.2f}x the per-document loop's time "
                   "(TOKENIZERS_PARALLELISM=false, as the benchmarks set it, leaves the batched call one thread, "
                   "and it then builds one large list of lists).")
    text = (f"# Tokenizing calibration text\n\n{len(docs):,} TinyStories documents (`valid_sample.txt`), "
            f"stories260K tokenizer ({type(tokenizer).__name__}); `python benchmarks/tokenize_speed.py`.\n\n"
            f"{table}\n\n{reading} The stream holds {batched_n - loop_n:,} more tokens: the EOS it puts between "
            "consecutive documents.\n\nMachine: " + machine() + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokenize_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
