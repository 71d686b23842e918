"""`hiercomp kv`: measure KV-cache compression specs on a model (original or compressed folder)."""

from __future__ import annotations

from typing import Any

import click

from hiercomp.cli._common import CONTEXT, fmt_bytes, write_json


@click.group("kv", context_settings=CONTEXT)
def kv_cmd() -> None:
    """KV-cache compression: evaluate specs such as snapkv:ratio=0.5+kivi:bits=2 (see hiercomp.kv.parse)."""


def _load(model: str) -> Any:
    from hiercomp.api import load_any
    from hiercomp.kv import adapter

    cm = load_any(model)
    if cm.is_encoder or cm.tokenizer is None:
        raise click.UsageError("hiercomp kv needs a causal LM folder with its tokenizer")
    adapter.check_supported(cm.model)
    return cm


@kv_cmd.command("eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--spec", "specs", multiple=True, required=True,
              help="KV spec, e.g. kivi:bits=2 or snapkv:ratio=0.5+kivi:bits=4; repeat to compare several.")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), required=True, help="Evaluation text file.")
@click.option("--prefix", type=int, default=512, show_default=True, help="Tokens prefilled (and compressed).")
@click.option("--continuation", type=int, default=32, show_default=True, help="Tokens scored after the prefix.")
@click.option("--sequences", type=int, default=4, show_default=True, help="Sequences taken from the text.")
@click.option("--fp16-store/--model-dtype-store", default=True, show_default=True,
              help="Store the cache's full-precision tokens in fp16 (the honest 16-bit baseline) or the model dtype.")
@click.option("--json", "json_out", default=None, help="Write the results as JSON ('-' = stdout).")
def kv_eval_cmd(model: str, specs: tuple[str, ...], text: str, prefix: int, continuation: int, sequences: int,
                fp16_store: bool, json_out: str | None) -> None:
    """Teacher-forced continuation quality of each SPEC against the uncompressed cache: KL, perplexity, top-1,
    and the bytes the compressed cache holds after the prefix (measured from its tensors)."""
    import torch

    from hiercomp.errors import HiercompError
    from hiercomp.kv import evaluate as ev
    from hiercomp.kv import make_cache, parse

    parsed = [parse(s) for s in specs]  # bad specs fail before the model loads
    cm = _load(model)
    ids = cm.tokenizer(open(text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    length = prefix + continuation + 1
    if len(ids) < length:
        raise HiercompError(f"{text} has {len(ids)} tokens, fewer than one sequence of {length}; use a longer text "
                            "or a smaller --prefix/--continuation")
    stride = max(length, len(ids) // sequences)
    rows = [torch.tensor(ids[i:i + length]) for i in range(0, len(ids) - length + 1, stride)][:sequences]
    seqs = torch.stack(rows)
    refs = ev.reference_logprobs(cm.model, seqs, prefix)
    prefills = [ev.capture_prefill(cm.model, s[None, :prefix]) for s in seqs]
    store = torch.float16 if fp16_store else None
    results = []
    for spec, kvspec in zip(specs, parsed):
        r = ev.continuation_quality(cm.model, lambda kvspec=kvspec: make_cache(cm.model, kvspec, store_dtype=store),
                                    seqs, prefix, prefills, refs, float_bytes=2 if fp16_store else None)
        results.append({"spec": spec, **r.as_dict(), "factor": r.bytes_full_prefix / r.bytes_after_prefix})
        click.echo(f"{spec:40s} KL {r.kl:.4f}  ppl {r.perplexity:.3f} (full {r.perplexity_full:.3f})  "
                   f"top-1 {r.top1_agreement:.3f}  held {fmt_bytes(r.bytes_after_prefix)} "
                   f"({results[-1]['factor']:.2f}x smaller)")
    write_json({"model": model, "sequences": len(rows), "prefix": prefix, "continuation": continuation,
                "results": results}, json_out)


@kv_cmd.command("passkey", context_settings=CONTEXT)
@click.argument("model")
@click.option("--spec", "specs", multiple=True, default=("",), help="KV spec(s); '' is the uncompressed cache.")
@click.option("--haystack", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Filler text (e.g. a WikiText raw file).")
@click.option("--lengths", default="512,1024", show_default=True, help="Context lengths in tokens.")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, help="Needle depths (0 = start, 1 = end).")
@click.option("--json", "json_out", default=None, help="Write the results as JSON ('-' = stdout).")
def kv_passkey_cmd(model: str, specs: tuple[str, ...], haystack: str, lengths: str, depths: str,
                   json_out: str | None) -> None:
    """Passkey retrieval grid (length × depth) for each SPEC: compress the context, then ask for the key."""
    from hiercomp.kv import evaluate as ev
    from hiercomp.kv import make_cache, parse

    for s in specs:
        parse(s)
    cm = _load(model)
    cases = ev.passkey_cases(cm.tokenizer, ev.load_haystack(haystack), [int(x) for x in lengths.split(",")],
                             [float(x) for x in depths.split(",")])
    prefills = [ev.capture_prefill(cm.model, c.context_ids) for c in cases]
    out = []
    for spec in specs:
        hits = [ev.passkey_correct(ev.passkey_answer(cm.model, ev.replay_prefill(make_cache(cm.model, spec), p),
                                                     c, cm.tokenizer), c.key) for c, p in zip(cases, prefills)]
        out.append({"spec": spec, "accuracy": sum(hits) / len(hits),
                    "cells": [{"length": c.length, "depth": c.depth, "hit": h} for c, h in zip(cases, hits)]})
        click.echo(f"{spec or 'uncompressed':40s} accuracy {out[-1]['accuracy']:.2f}  "
                   + " ".join(f"{c.length}@{c.depth:g}:{'✓' if h else '✗'}" for c, h in zip(cases, hits)))
    write_json({"model": model, "results": out}, json_out)
