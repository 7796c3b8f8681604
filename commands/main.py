"""The `petals` Typer app. Sub-commands live one per module and import the core lazily, inside functions."""

import os

import typer

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
    app(prog_name="petals")  # also under `python -m petals_cli.commands`, for usage lines and completion
