"""`petals swarm status|top|web|bootstrap`: look at the swarm, watch it live in a terminal or a browser, or run a
DHT-only bootstrap peer."""

import json
from typing import Annotated

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AllowedServersOpt,
    BlockedServersOpt,
    InitialPeersOpt,
    JsonOpt,
    ListenHostOpt,
    ListenPortOpt,
    SwarmKeyOpt,
    VerboseOpt,
    api_extra_missing,
    check_listen_host,
    trust_options,
)

swarm_app = typer.Typer(
    help="Inspect the swarm: status, live map, web page, bootstrap peer.",
    no_args_is_help=True,
)
SwarmModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Only this model (its DHT prefix, or the model path); default: every model."),
]
SERVER_COLUMNS = (
    "peer",
    "name",
    "span",
    "state",
    "throughput",
    "cache left",
    "load",
    "batch",
    "dtype",
    "version",
    "link",
    "rtt",
    "pings",
)


@swarm_app.command()
@handle_errors
def status(
    model: SwarmModelOpt = None,
    initial_peers: InitialPeersOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Models in the swarm, their block coverage, every server.

    The schema of --json is in README."""
    from petals_cli.config import ClientConfig
    from petals_cli.swarm import read_swarm_status

    setup_logging(verbose)
    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()), **trust_options(swarm_key, allowed_servers, blocked_servers)
    )
    result = read_swarm_status(config, model)
    if json_output:
        typer.echo(json.dumps(result.to_json()))
    else:
        _render_status(result)


@swarm_app.command()
@handle_errors
def top(
    model: SwarmModelOpt = None,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    initial_peers: InitialPeersOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
) -> None:
    """A live map of the swarm in the terminal.

    Keys: q quit, r refresh, s sort, / filter, ? help."""
    from petals_cli.config import ClientConfig
    from petals_cli.tui import run_top

    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()), **trust_options(swarm_key, allowed_servers, blocked_servers)
    )
    run_top(config, model_prefix=model, interval=interval)


@swarm_app.command()
@handle_errors
def web(
    model: SwarmModelOpt = None,
    host: ListenHostOpt = "127.0.0.1",
    port: ListenPortOpt = 8080,
    interval: Annotated[float, typer.Option(min=1.0, help="Seconds between readings of the swarm.")] = 5.0,
    initial_peers: InitialPeersOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """A live health page of the swarm for browsers.

    Also /api/v1/state (the JSON of `swarm status --json`) and /metrics (Prometheus), read every --interval s."""
    from petals_cli.client.swarm import require_initial_peers
    from petals_cli.config import ClientConfig
    from petals_cli.swarm import StatusFeed

    setup_logging(verbose)
    check_listen_host(host)
    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()), **trust_options(swarm_key, allowed_servers, blocked_servers)
    )
    require_initial_peers(config)  # the page survives a swarm that stops answering, not one it never knew
    try:
        from petals_cli.web.app import make_health_app, serve
        from petals_cli.web.monitor import SwarmMonitor
    except ImportError as error:
        raise api_extra_missing(error) from None
    feed = StatusFeed(config, model_prefix=model)
    app = make_health_app(SwarmMonitor(feed.read, period=interval), on_exit=feed.close)
    typer.echo(f"swarm health on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    serve(app, host, port)


@swarm_app.command()
@handle_errors
def bootstrap(
    host: Annotated[str | None, typer.Option(help="Address to listen on.", show_default="127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (0 = any free port).", show_default="0")] = None,
    announce_host: Annotated[
        str | None, typer.Option(help="Public address others should dial, if not the listen address.")
    ] = None,
    identity: Annotated[
        str | None, typer.Option(help="Private key file for a stable peer id (created if missing).")
    ] = None,
    address_file: Annotated[
        str | None, typer.Option(help="Write this peer's multiaddrs here once up; removed on exit.")
    ] = None,
    swarm_key: SwarmKeyOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a DHT-only peer that others join the swarm through.

    Prints their --initial-peers line; Ctrl-C stops it."""
    from petals_cli.bootstrap import BootstrapConfig, initial_peers_line, run_bootstrap

    setup_logging(verbose)
    config = BootstrapConfig.from_sources(
        host=host,
        port=port,
        announce_host=announce_host,
        identity_path=identity,
        address_file=address_file,
        swarm_key=swarm_key,
    )
    run_bootstrap(config, on_ready=lambda maddrs: typer.echo(initial_peers_line(maddrs)))


def _render_status(result) -> None:
    """Rich renders markup: what servers announced (already one safe line each) is escaped as it goes in."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from petals_cli.swarm import format_ranges

    console = Console()
    if not console.is_terminal:
        console.width = 200  # piped: keep whole rows rather than wrapping to 80 columns
    if not result.models:
        console.print("no models are served in this swarm yet")
    for model in result.models:
        verdict = "[green]healthy[/]"
        if not model.healthy:
            verdict = f"[red]broken[/]: no server for blocks {format_ranges(model.missing_blocks)}"
        described = f"{escape(model.family)}, {model.num_blocks} blocks, {escape(model.model)}"
        console.print(f"[bold]{escape(model.prefix)}[/] ({described}): {verdict}", highlight=False)
        console.print(f"coverage {_coverage_bar(model.coverage)}", highlight=False)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in SERVER_COLUMNS:
            table.add_column(column, no_wrap=column != "pings")
        for server in model.servers:
            table.add_row(*_server_cells(server))
        console.print(table)


def _server_cells(server) -> list[str]:
    from rich.markup import escape

    from petals_cli.tui.render import FLAG_STYLE, STATE_STYLES, flag_text, step_text

    pings = " ".join(f"{peer[-8:]}={_milliseconds(rtt)}" for peer, rtt in server.pings.items())
    flag = f" [{FLAG_STYLE}]{flag_text(server.flagged)}[/]" if server.flagged else ""
    return [
        escape(server.short_id),
        escape(server.public_name or "-"),
        f"{server.start_block}:{server.end_block}",
        f"[{STATE_STYLES.get(server.state, 'white')}]{server.state}[/]{flag}",
        f"{server.throughput:.1f}",
        str(server.cache_tokens_left),
        f"{server.sessions}s q{server.queue_length} {step_text(server)}",  # one column: the table fits 80 wide
        f"{server.batch_size}/{server.largest_batch}",
        escape(server.precision),
        escape(server.version),
        server.connection,
        _milliseconds(server.rtt),
        escape(pings or "-"),
    ]


def _coverage_bar(coverage) -> str:
    cells = []
    for count in coverage:
        style = "red" if count == 0 else "yellow" if count == 1 else "green"
        cells.append(f"[{style}]{count if count < 10 else '+'}[/]")
    return "".join(cells)


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"
