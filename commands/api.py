"""`petals api`: serve MODEL through the swarm behind an OpenAI-compatible HTTP API."""

from typing import Annotated

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AdapterOpt,
    AllowedServersOpt,
    BlockedServersOpt,
    InitialPeersOpt,
    ModelArg,
    ModelPrefixOpt,
    SwarmKeyOpt,
    VerboseOpt,
    VerifyOpt,
    WireDtypeOpt,
    trust_options,
)
from petals_cli.commands._progress import open_model_with_feedback, spinner


@handle_errors
def api(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="PETALS_API_KEY",
            help="Require `Authorization: Bearer KEY` on /v1 routes (also PETALS_API_KEY).",
            show_default="none: open",
            show_envvar=False,
        ),
    ] = None,
    max_concurrent: Annotated[
        int, typer.Option(min=1, help="Generations at once; further requests get 429 (rate limit).")
    ] = 8,
    initial_peers: InitialPeersOpt = None,
    model_prefix: ModelPrefixOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
    verify: VerifyOpt = None,
    adapter: AdapterOpt = None,
    wire_dtype: WireDtypeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve MODEL as an OpenAI-compatible API, with a chat page.

    Routes /v1/models, /v1/completions, /v1/chat/completions, /health; pages / (chat) and /swarm (swarm health)."""
    import ipaddress

    from petals_cli.config import ClientConfig
    from petals_cli.errors import ConfigError

    setup_logging(verbose)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--host {host!r} is not an IP address") from None
    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()),
        model_prefix=model_prefix,
        active_adapter=adapter,
        wire_dtype=wire_dtype,
        verify_rate=verify,
        **trust_options(swarm_key, allowed_servers, blocked_servers),
    )
    with spinner("Loading petals…"):
        try:
            from petals_cli.api import make_app, serve
        except ImportError as error:
            raise ConfigError(
                f"the api extra is not installed ({error.name} missing)",
                hint="pip install 'petals-cli[api]'",
            ) from None
    distributed, tokenizer = open_model_with_feedback(model, config)
    try:
        app = make_app(distributed, tokenizer, model_name=model, api_key=api_key, max_concurrent=max_concurrent)
        typer.echo(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
        serve(app, host, port)
    finally:
        distributed.close()
