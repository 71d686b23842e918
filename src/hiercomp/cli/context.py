"""`hiercomp context`: compress a text to a token budget, or score a compressor by mutual information."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from hiercomp.cli._common import CONTEXT, write_json
from hiercomp.errors import HiercompError

METHOD_CHOICES = ["tokens", "sentences", "documents", "cascade", "truncate", "random"]


def read_utf8(file: str) -> str:
    """The file's text (``-`` = standard input); one-line errors for a missing or non-UTF-8 file."""
    if file == "-":
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        path = Path(file)
        if not path.is_file():
            raise HiercompError(f"{file} does not exist or is not a file; pass a UTF-8 text file (or - for stdin)")
        data = path.read_bytes()
        name = file
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HiercompError(f"{name} is not UTF-8 text (byte {err.start} cannot be decoded); convert it, e.g. "
                            "iconv -f latin1 -t utf-8") from None


def _compressor(method: str, scorer: str | None, target: str | None, question_weight: float,
                threshold: float | None, ranker: str, coarse: float | None) -> Any:
    from hiercomp.context.build import build_compressor
    from hiercomp.context.scorer import as_scorer, load_tokenizer

    needs_lm = method in ("tokens", "cascade") or ranker == "likelihood" or (target is None and scorer is None)
    lm = None
    if scorer is not None or needs_lm:
        if scorer is None:
            from hiercomp.io.builtin import smollm2_dir

            scorer = str(smollm2_dir())
        lm = as_scorer(scorer)
    tokenizer = load_tokenizer(target) if target is not None else lm.tokenizer  # type: ignore[union-attr]
    return build_compressor(method, target=tokenizer, scorer=lm, question_weight=question_weight,
                            threshold=threshold, ranker=ranker, coarse_factor=coarse)


def _say_ignored_question(compressor: Any, method: str, question: str | None) -> None:
    if question and compressor.ignores_question():
        click.echo(f"note: the {method} method ignores --question", err=True)


@click.group("context", context_settings=CONTEXT)
def context_cmd() -> None:
    """Compress the input itself: prompts and passages cut to a budget in the reader model's tokens."""


_common_options = [
    click.option("--method", type=click.Choice(METHOD_CHOICES), default="tokens", show_default=True,
                 help="tokens: drop low-information words; sentences/documents: keep the most relevant to the "
                      "question; cascade: sentences then tokens; truncate/random: baselines."),
    click.option("--budget", required=True, help="0.25x keeps a quarter of the target tokens; N keeps N tokens."),
    click.option("--question", default=None, help="The question the compressed text must answer."),
    click.option("--scorer", default=None, help="Causal LM that scores tokens (folder or hiercomp folder); "
                                                "default SmolLM2-135M-Instruct."),
    click.option("--target", default=None, help="Model or tokenizer folder whose tokens the budget counts; "
                                                "default the scorer's."),
    click.option("--question-weight", type=float, default=1.0, show_default=True,
                 help="tokens: weight of the contrastive question term (0 ignores the question)."),
    click.option("--threshold", type=float, default=None,
                 help="sentences/documents: keep nothing scoring below this (cosine for the embedding ranker)."),
    click.option("--ranker", type=click.Choice(["embedding", "likelihood"]), default="embedding",
                 show_default=True, help="sentences/documents: MiniLM similarity or LM likelihood of the question."),
    click.option("--coarse", type=click.FloatRange(min=1.0), default=None,
                 help="cascade: the sentences kept cover this many times the budget before tokens cut them "
                      "(default 1.25)."),
]


def _with_common(f: Any) -> Any:
    for option in reversed(_common_options):
        f = option(f)
    return f


@context_cmd.command("compress", context_settings=CONTEXT)
@click.argument("file")
@_with_common
@click.option("--json", "json_out", default=None, help="Also write the result as JSON (- for stdout).")
def compress_cmd(file: str, method: str, budget: str, question: str | None, scorer: str | None,
                 target: str | None, question_weight: float, threshold: float | None, ranker: str, coarse: float | None,
                 json_out: str | None) -> None:
    """Print FILE (UTF-8 text, - for stdin) compressed to --budget."""
    from hiercomp.context.result import check_text, parse_token_budget

    text = read_utf8(file)
    check_text(text)
    parse_token_budget(budget)
    compressor = _compressor(method, scorer, target, question_weight, threshold, ranker, coarse)
    _say_ignored_question(compressor, method, question)
    result = compressor(text, question=question, budget=budget)
    if json_out == "-":
        write_json(result.as_dict(), "-")
    else:
        click.echo(result.text)
        write_json(result.as_dict(), json_out)
    click.echo(f"kept {result.kept_tokens} of {result.original_tokens} target tokens (ratio {result.ratio:.3f}, "
               f"budget {result.budget_tokens}){'; ' + result.note if result.note else ''}", err=True)


def _score_inputs(file: str, context_field: str, question_field: str, n: int) -> tuple[list[str], list[str] | None]:
    text = read_utf8(file)
    if file.endswith(".jsonl"):
        contexts, questions, seen = [], [], set()
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise HiercompError(f"{file} line {number} is not JSON; give JSONL, one object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get(context_field), str):
                raise HiercompError(f"{file} line {number} has no string field '{context_field}' "
                                    "(--context-field)")
            if row[context_field] in seen:  # several questions share a passage: one context each
                continue
            seen.add(row[context_field])
            contexts.append(row[context_field])
            questions.append(str(row.get(question_field, "")))
            if len(contexts) == n:
                break
        return contexts, (questions if all(questions) else None)
    docs = [d.strip() for d in text.replace("<|endoftext|>", "\n\n").split("\n\n") if d.strip()]
    return docs[:n], None


@context_cmd.command("score", context_settings=CONTEXT)
@click.argument("file")
@_with_common
@click.option("--predictor", default=None, help="LM that scores p(z | context); default the scorer.")
@click.option("--n", "n", type=int, default=32, show_default=True, help="Contexts (the estimate is capped at "
                                                                          "log2 N bits).")
@click.option("--context-field", default="context", show_default=True, help="JSONL: the passage field.")
@click.option("--question-field", default="question", show_default=True, help="JSONL: the question field.")
@click.option("--json", "json_out", default=None, help="Also write the estimate as JSON (- for stdout).")
def score_cmd(file: str, method: str, budget: str, question: str | None, scorer: str | None, target: str | None,
              question_weight: float, threshold: float | None, ranker: str, coarse: float | None, predictor: str | None,
              n: int,
              context_field: str, question_field: str, json_out: str | None) -> None:
    """Estimate I(X; Z | Q) between the texts in FILE and their compressions (He et al.).

    FILE is JSONL with a passage and a question per row (SQuAD style), or text with documents separated by
    blank lines (no questions)."""
    from hiercomp.context.information import score_compressor
    from hiercomp.context.result import parse_token_budget
    from hiercomp.context.scorer import as_scorer

    if n < 2:
        raise HiercompError(f"--n must be at least 2 (got {n}): the estimate compares each context with the others")
    if question:
        raise HiercompError("score reads one question per row from the JSONL file (--question-field); drop "
                            "--question")
    parse_token_budget(budget)
    contexts, questions = _score_inputs(file, context_field, question_field, n)
    if len(contexts) < 2:
        raise HiercompError(f"{file} holds {len(contexts)} distinct context(s); the estimate needs at least 2")
    compressor = _compressor(method, scorer, target, question_weight, threshold, ranker, coarse)
    lm = getattr(compressor, "scorer", None)
    if predictor is not None:
        lm = as_scorer(predictor)
    elif lm is None:
        from hiercomp.io.builtin import smollm2_dir

        lm = as_scorer(scorer or str(smollm2_dir()))
    estimate = score_compressor(compressor, contexts, lm, questions, budget)
    click.echo(str(estimate))
    write_json(estimate.as_dict(), json_out)
