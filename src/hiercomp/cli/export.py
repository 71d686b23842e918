"""`hiercomp export`: write a compressed folder in a format other tools load."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT, write_json

FORMATS = ("hf", "compressed-tensors", "gguf")


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(),
              help="Output: a folder (hf, compressed-tensors) or one .gguf file (gguf).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True,
              help="hf: dense weights for from_pretrained; compressed-tensors: packed int weights vLLM serves "
                   "(llm-compressor's format); gguf: one file for llama.cpp (Llama-family models).")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 2) when a layer cannot be stored in the format's packed form, instead of "
                   "storing it dense.")
@click.option("--prefer", type=click.Choice(("exact", "compact")), default="exact", show_default=True,
              help="gguf only: asymmetric 2-5-bit layers as exact Q5_0/Q8_0 (exact) or as Q4_1/Q5_1, 0.5 bit "
                   "per weight smaller with the minimum rounded to float16 (compact).")
@click.option("--embed-type", type=click.Choice(("F32", "F16", "Q8_0")), default=None,
              help="gguf only: store the (uncompressed) embedding / output matrix in this type instead of the "
                   "model's own float type, as llama.cpp's quantized files do.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_out", default=None, help="Write what each layer became (and its error) as JSON "
              "to this file ('-' = stdout).")
def export(model: str, out: str, fmt: str, strict: bool, prefer: str, embed_type: str | None, force: bool,
           json_out: str | None) -> None:
    """Write a compressed MODEL in a format other tools load: a dense Hugging Face folder (hf), a
    compressed-tensors folder for vLLM, or a GGUF file for llama.cpp."""
    if fmt == "hf":
        from hiercomp.api import export_dense

        export_dense(model, out, force=force)
        click.echo(f"exported {model} -> {out} (dense, loads with from_pretrained)")
        return
    if fmt == "compressed-tensors":
        from hiercomp.io.export_ct import export_compressed_tensors

        result = export_compressed_tensors(model, out, force=force, strict=strict)
    else:
        from hiercomp.io.gguf_export import export_gguf

        result = export_gguf(model, out, force=force, strict=strict, prefer=prefer, embed_type=embed_type)
    worst = max(result.max_abs_error.values(), default=0.0)
    click.echo(f"exported {model} -> {out} ({fmt}): {len(result.exact)} layer(s) exact, "
               f"{len(result.requantized)} requantized, {len(result.dense)} dense; "
               f"largest added weight error {worst:.3g}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    write_json(result.to_dict(), json_out)
