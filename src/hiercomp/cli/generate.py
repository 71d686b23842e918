"""`hiercomp generate`: stream text from a compressed folder or an original model; print speed and memory."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT


@click.command("generate", context_settings=CONTEXT)
@click.argument("model")
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template (when it has one).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Stop after this many new tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 = greedy; above 0 samples at this temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (with --temperature).")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--runtime", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
              help="Compressed layers: their fast kernels, or dequantize at every forward (the exact reference).")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
@click.option("--kv", default=None,
              help="Generate through a compressed KV cache, e.g. kivi:bits=2 or snapkv:ratio=0.5+kivi:bits=4 "
                   "(hiercomp.kv.parse). Default: the folder's own spec when its plan names one (said), else the "
                   "full cache; 'none' forces the full cache.")
def generate_cmd(model: str, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None, runtime: str, threads: int | None, kv: str | None) -> None:
    """Generate from MODEL (compressed folder or original), streaming tokens; tokens/s, peak memory and the KV
    cache's bytes at the end."""
    import torch

    from hiercomp.generate import generate, print_stream

    if threads is not None:
        torch.set_num_threads(threads)
    result = generate(model, prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed, runtime=runtime, stream=print_stream, kv=kv)
    click.echo("")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"-- {result.summary()}")
