"""The `hiercomp` command: a click group; each command lives in its own module and calls the API."""

from __future__ import annotations

import click

from hiercomp.cli._common import CONTEXT
from hiercomp.errors import HiercompError


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="hiercomp")
def cli() -> None:
    """hiercomp: compress a Hugging Face model to a budget and measure, honestly, what it cost.

    \b
    Typical use:
      hiercomp compress MODEL_DIR --method gptq --bits 4 --group-size 128 --calib text.txt --out out/m4
      hiercomp eval out/m4 --text held_out.txt --kl-against MODEL_DIR --json result.json
      hiercomp info out/m4
      hiercomp compress MODEL_DIR --budget 3.0bpw --search greedy --calib text.txt --out out/m3
      hiercomp report out/m4 out/m3 --text held_out.txt --kl-against MODEL_DIR --out report.html
    Run `hiercomp COMMAND --help` for each command's options.
    """



def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="hiercomp", standalone_mode=False)
    except HiercompError as err:
        click.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.ctx.get_help() if err.ctx else str(err))
        return 0
    except click.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        return 2
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted: nothing was written (partial output is removed)", err=True)
        return 130
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    return 0


# One module per command: parse -> call the API -> print. Commands added later register at the end.
from hiercomp.cli.compress import compress  # noqa: E402
from hiercomp.cli.demo import demo  # noqa: E402
from hiercomp.cli.eval import eval_cmd  # noqa: E402
from hiercomp.cli.export import export  # noqa: E402
from hiercomp.cli.info import info  # noqa: E402
from hiercomp.cli.methods import methods_cmd  # noqa: E402
from hiercomp.cli.report import report  # noqa: E402
from hiercomp.cli.search import search_cmd  # noqa: E402

for _command in (compress, eval_cmd, info, export, methods_cmd, demo, report, search_cmd):
    cli.add_command(_command)
from hiercomp.cli.generate import generate_cmd  # noqa: E402

cli.add_command(generate_cmd)
from hiercomp.cli.context import context_cmd  # noqa: E402
cli.add_command(context_cmd)
