"""The `petals` Typer app. Sub-commands live one per module and import the core lazily, inside functions."""

import os
import sys

import typer

from petals_cli.commands.api import api
from petals_cli.commands.bench import bench
from petals_cli.commands.chat import chat
from petals_cli.commands.finetune import finetune
from petals_cli.commands.generate import generate
from petals_cli.commands.serve import serve
from petals_cli.commands.swarm import swarm_app

app = typer.Typer(
    help="petals: run large language models collaboratively.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(serve)
app.command()(generate)
app.command()(chat)
app.command()(finetune)
app.add_typer(swarm_app, name="swarm")
app.command()(bench)
app.command()(api)


@app.callback(invoke_without_command=True)
def _root(
    context: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from petals_cli import __version__

        typer.echo(__version__)
        raise typer.Exit()
    if context.invoked_subcommand is None:
        typer.echo(context.get_help())
        raise typer.Exit()


def main() -> None:
    # Peers share cores with their libp2p daemons (and, on one machine, with each other): OpenMP threads that
    # spin after every op steal the CPU a waiting peer needs. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Not standalone: a usage error (unknown option, a value of the wrong type or out of range) is one line and
    # exit code 2 like every other bad option, instead of a usage banner and a box.
    try:
        code = command()(prog_name="petals", standalone_mode=False)  # also as `python -m petals_cli.commands`
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        code = 130
    except typer.TyperException as error:  # the parser's usage errors and file errors
        code = getattr(error, "exit_code", 2)
        show_help = getattr(error, "show", None)
        if type(error).__name__ == "NoArgsIsHelpError" and show_help is not None:
            show_help()  # a bare `petals swarm`: its help, as before
        else:
            typer.echo(f"error: {_usage_message(error)}", err=True)
    sys.exit(code if isinstance(code, int) else 0)


# How --help names a value, by its Python type; choices show as <a|b|c> and flags take no value.
VALUE_NAMES = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "list[str]": "TEXT"}


def command():
    """The app as the parser sees it, with plain value names in --help (INTEGER, TEXT, MODEL) instead of Typer's
    <int>, <str> and <bool> on flags."""
    import typer.core

    root = typer.main.get_command(app)
    pending = [root]
    while pending:
        current = pending.pop()
        pending.extend(getattr(current, "commands", {}).values())
        context = typer.core._click.Context(current, **root.context_settings)  # -h and --help, as when it runs
        help_option = current.get_help_option(context)
        for param in [*current.params, *([help_option] if help_option is not None else [])]:
            if param.metavar is not None:
                continue
            if param.param_type_name == "argument":
                param.metavar = param.name.upper()
                param.display_type_rich = lambda ctx: None  # the name says it; Typer would add <str>
            elif getattr(param, "is_flag", False):
                param.metavar = ""
            elif not param.type_descriptor.is_choice:
                param.metavar = VALUE_NAMES.get(param.bare_type(), param.bare_type().upper())
    return root


def _usage_message(error: Exception) -> str:
    """One line: the parser's message, and where to look for the command's options."""
    format_message = getattr(error, "format_message", None)
    message = " ".join((format_message() if format_message else str(error)).split())
    context = getattr(error, "ctx", None)
    if context is not None:
        message += f" (hint: `{context.command_path} -h` lists the options)"
    return message
