"""`petals serve`: host a span of a model's blocks in the swarm."""

from typing import Annotated

import typer
from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import DeviceOpt, DtypeOpt, InitialPeersOpt, ModelArg, ModelPrefixOpt, VerboseOpt


@handle_errors
def serve(
    model: ModelArg,
    blocks: Annotated[str, typer.Option(help="Blocks to host: START:END (END exclusive).")] = ":",
    new_swarm: Annotated[bool, typer.Option("--new-swarm", help="Start a new swarm instead of joining one.")] = False,
    initial_peers: InitialPeersOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.", show_default="127.0.0.1")] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port to listen on (0 = any free port).", show_default="0")
    ] = None,
    announce_host: Annotated[
        str | None, typer.Option(help="Public address others should dial, if not the listen address.")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    public_name: Annotated[str | None, typer.Option(help="A name shown to others in swarm listings.")] = None,
    address_file: Annotated[
        str | None, typer.Option(help="Write this server's multiaddrs here once serving; removed on exit.")
    ] = None,
    cache_tokens: Annotated[
        int | None, typer.Option(help="Attention-cache budget in tokens, across sessions.", show_default="16384")
    ] = None,
    max_session_length: Annotated[
        int | None, typer.Option(help="Longest max_length one session may ask for, in tokens.", show_default="8192")
    ] = None,
    alloc_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a new session waits for cache space before it is refused.", show_default="0.5"),
    ] = None,
    session_idle_timeout: Annotated[
        float | None,
        typer.Option(help="Close a session that sends no step for this many seconds.", show_default="600"),
    ] = None,
    identity: Annotated[str | None, typer.Option(help="Private key file for a stable peer id.")] = None,
    model_prefix: ModelPrefixOpt = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of MODEL.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Host blocks START:END of MODEL, announce them, and serve until Ctrl-C or SIGTERM."""
    from petals_cli.config import ServerConfig
    from petals_cli.server.host import run_server

    setup_logging(verbose)
    config = ServerConfig.from_sources(
        model=model,
        blocks=blocks,
        new_swarm=new_swarm or None,
        initial_peers=tuple(initial_peers or ()),
        host=host,
        port=port,
        announce_host=announce_host,
        device=device,
        dtype=dtype,
        public_name=public_name,
        address_file=address_file,
        cache_tokens=cache_tokens,
        max_session_length=max_session_length,
        alloc_timeout=alloc_timeout,
        session_idle_timeout=session_idle_timeout,
        identity_path=identity,
        model_prefix=model_prefix,
        revision=revision,
    )
    run_server(config)
