"""The `hiercomp` command: a click group; each command lives in its own module and calls the API."""

from __future__ import annotations

from typing import Any

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



class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds like Ctrl-C: temporary output is removed on the way."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
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
    except (KeyboardInterrupt, click.Abort) as err:
        click.echo("interrupted: nothing was written (partial output is removed)", err=True)
        # click turns a KeyboardInterrupt into Abort; the SIGTERM is its cause
        return 143 if isinstance(err, Terminated) or isinstance(err.__cause__, Terminated) else 130
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    except OSError as err:  # disk full, read-only or missing folders, permissions: the machine, not the input
        where = f" {err.filename}" if err.filename else ""
        click.echo(f"error: cannot read or write{where}: {err.strerror or _first_line(err)}; free space, fix the "
                   "permissions or choose another path (nothing was written)", err=True)
        return 2
    except Exception as err:
        # safetensors reports a full or read-only disk as its own SafetensorError (no OSError base): one line too
        if type(err).__name__ != "SafetensorError":
            raise
        click.echo(f"error: cannot write the weights: {_first_line(err)}; free space or choose another --out "
                   "(nothing was written)", err=True)
        return 2
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
from hiercomp.cli.kv import kv_cmd  # noqa: E402

cli.add_command(kv_cmd)
from hiercomp.cli.plan_memory import plan_memory_cmd  # noqa: E402

cli.add_command(plan_memory_cmd)
