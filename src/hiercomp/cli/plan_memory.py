"""`hiercomp plan-memory`: one memory budget split between the weights and the KV cache, written as a plan."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT, fmt_bytes, write_json


@click.command("plan-memory", context_settings=CONTEXT)
@click.argument("model")
@click.option("--memory", required=True, help="Memory for weights + KV cache + decode overhead: 1GB, 800MiB, ... "
                                              "(KB = 1000 B, KiB = 1024 B).")
@click.option("--context", type=click.IntRange(min=1), required=True, help="Tokens per sequence the cache holds.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences at once.")
@click.option("--calib", type=click.Path(), required=True,
              help="Calibration text (.txt, or .jsonl with --calib-field): builds the weight candidates and gives "
                   "the evaluation sequences.")
@click.option("--calib-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--calib-n", default=128, show_default=True, help="Calibration sequences for the weight candidates.")
@click.option("--calib-len", default=None, type=int,
              help="Tokens per calibration window (default min(512, model context)).")
@click.option("--kv", "kv_specs", multiple=True,
              help="KV specs to consider (repeat); 'none' is the full cache. Default: none, kivi 8/4/2 bits, "
                   "snapkv ratio 0.5/0.75/0.875 with kivi.")
@click.option("--levels", default=None, help="Weight levels for the search (see `hiercomp search --help`). "
                                             "Default: gptq:bits=2,3,4,8:group_size=32.")
@click.option("--search", "search_kind", type=click.Choice(["uniform", "greedy"]), default="greedy",
              show_default=True, help="The weight allocator run at each KV rung's remaining bytes.")
@click.option("--eval-prefix", default=1024, show_default=True,
              help="Tokens prefilled before the scored continuation (capped at --context).")
@click.option("--eval-continuation", default=32, show_default=True, help="Continuation tokens scored.")
@click.option("--eval-sequences", default=4, show_default=True, help="Evaluation sequences.")
@click.option("--fitness-tokens", default=4096, show_default=True, help="Tokens the weight search scores plans on.")
@click.option("--verify", default=2, show_default=True,
              help="Measure this many best pairs together (weights and cache compressed); pick the lowest measured.")
@click.option("--out", type=click.Path(), default=None, help="Plan YAML to write (apply: compress --plan).")
@click.option("--cache", "cache_dir", type=click.Path(), default=None,
              help="Candidate-layer cache folder (default ~/.cache/hiercomp/levels; $HIERCOMP_CACHE moves the root).")
@click.option("--seed", default=0, show_default=True, help="Seed for calibration sampling.")
@click.option("--json", "json_out", default=None, help="Also write every pair compared as JSON ('-' = stdout).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def plan_memory_cmd(model: str, memory: str, context: int, batch: int, calib: str, calib_field: str, calib_n: int,
                    calib_len: int | None, kv_specs: tuple[str, ...], levels: str | None, search_kind: str,
                    eval_prefix: int, eval_continuation: int, eval_sequences: int, fitness_tokens: int, verify: int,
                    out: str | None, cache_dir: str | None, seed: int, json_out: str | None,
                    trust_remote_code: bool, quiet: bool) -> None:
    """Split --memory between MODEL's weights and its KV cache (batch sequences of context tokens) by measured KL,
    and write a plan: the weights' per-layer levels, `kv:` (the cache spec) and `memory:` (the split).

    Apply it with `hiercomp compress MODEL --plan PLAN --calib ... --out DIR`; the folder keeps the KV spec
    (hiercomp.json "kv", `hiercomp.load(DIR).kv_spec`).
    """
    from hiercomp.budget.memory import parse_memory, plan_memory
    from hiercomp.calibration import CalibrationConfig
    from hiercomp.kv import parse

    memory_bytes = parse_memory(memory)  # bad input fails before the model loads
    for spec in kv_specs:
        parse(spec)
    plan, result = plan_memory(model, memory_bytes, context, batch,
                               CalibrationConfig(calib, calib_n, calib_len, seed, calib_field),
                               kv_specs=kv_specs or None, levels=levels, search=search_kind, prefix=eval_prefix,
                               continuation=eval_continuation, sequences=eval_sequences,
                               fitness_tokens=fitness_tokens, verify=verify, cache_dir=cache_dir, out=out,
                               progress=not quiet, trust_remote_code=trust_remote_code)
    split = plan.memory
    damage = split["damage"]
    measured = "" if damage["measured_kl"] is None else f", measured together {damage['measured_kl']:.5f}"
    click.echo(f"memory {fmt_bytes(result.memory_bytes)} for context {context} x batch {batch}: "
               f"weights {fmt_bytes(split['weights_bytes'])} ({plan.summary()}) + KV {fmt_bytes(split['kv_bytes'])} "
               f"({plan.kv or 'full cache'}) + overhead {fmt_bytes(split['overhead_bytes'])} = "
               f"{fmt_bytes(split['total_bytes'])}")
    click.echo(f"continuation KL: weights {damage['weights_kl']:.5f} + KV {damage['kv_kl']:.5f} = "
               f"{damage['predicted_kl']:.5f}{measured}")
    if out is not None:
        click.echo(f"wrote {out}")
    write_json({"model": model, "chosen": result.choice.row(), "memory": split,
                "candidates": [c.row() for c in result.candidates]}, json_out)
