"""`petals serve`: host a span of a model's blocks in the swarm."""

from typing import Annotated, Literal

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    DeviceOpt,
    DtypeOpt,
    InitialPeersOpt,
    ModelArg,
    ModelPrefixOpt,
    SwarmKeyOpt,
    VerboseOpt,
)


@handle_errors
def serve(
    model: ModelArg,
    blocks: Annotated[
        str | None,
        typer.Option(
            help="auto (as many as fit, where the swarm needs them), N (N such blocks) or START:END (END exclusive).",
            show_default="auto",
        ),
    ] = None,
    num_blocks: Annotated[
        int | None, typer.Option(help="Host N blocks placed where the swarm needs them (same as --blocks N).")
    ] = None,
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
    quant: Annotated[
        Literal["none", "int8", "nf4"] | None,
        typer.Option(
            help="Quantise the blocks' weights with bitsandbytes: LLM.int8 or 4-bit NF4.", show_default="none"
        ),
    ] = None,
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
    max_request_mib: Annotated[
        int | None, typer.Option(help="Largest request or inference step accepted, in MiB.", show_default="64")
    ] = None,
    max_sessions_per_peer: Annotated[
        int | None, typer.Option(help="Inference sessions one peer may hold open here.", show_default="16")
    ] = None,
    step_timeout: Annotated[
        float | None, typer.Option(help="Seconds one step or forward/backward may compute.", show_default="60")
    ] = None,
    kept_graphs_mib: Annotated[
        int | None,
        typer.Option(
            help="Activations kept from training forwards for their backwards, in MiB (0 = always recompute).",
            show_default="512",
        ),
    ] = None,
    swarm_key: SwarmKeyOpt = None,
    balance_quality: Annotated[
        float | None,
        typer.Option(help="Move blocks when the swarm's weakest block gets this much stronger.", show_default="0.15"),
    ] = None,
    balance_period: Annotated[
        float | None, typer.Option(help="Seconds between rebalancing checks (0 = never move).", show_default="60")
    ] = None,
    network_rps: Annotated[
        float | None, typer.Option(help="Your network's limit in steps/s, if known (never guessed otherwise).")
    ] = None,
    identity_path: Annotated[
        str | None, typer.Option("--identity", help="Private key file for a stable peer id.")
    ] = None,
    adapters: Annotated[
        list[str] | None,
        typer.Option("--adapters", help="Directory of a peft LoRA adapter to serve (repeatable).", show_default=False),
    ] = None,
    model_prefix: ModelPrefixOpt = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of MODEL.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Host blocks of MODEL for the swarm until Ctrl-C or SIGTERM.

    Loads --blocks (auto: the weakest blocks), announces them in the DHT, serves inference, forward and backward."""
    options = {name: value for name, value in locals().items() if name != "verbose"}  # parameters = config fields
    from petals_cli.config import ServerConfig
    from petals_cli.server.host import run_server

    setup_logging(verbose)
    options["new_swarm"] = new_swarm or None  # a flag left off defers to PETALS_NEW_SWARM
    options["initial_peers"] = tuple(initial_peers or ())
    options["adapters"] = tuple(adapters or ())
    run_server(ServerConfig.from_sources(**options))
