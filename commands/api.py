"""`petals api`: serve MODEL through the swarm behind an OpenAI-compatible HTTP API."""

from typing import Annotated

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AdapterOpt,
    AllowedServersOpt,
    BlockedServersOpt,
    InitialPeersOpt,
    ListenHostOpt,
    ListenPortOpt,
    ModelArg,
    ModelPrefixOpt,
    SwarmKeyOpt,
    VerboseOpt,
    VerifyOpt,
    WireDtypeOpt,
    api_extra_missing,
    check_listen_host,
    trust_options,
)
from petals_cli.commands._progress import open_model_with_feedback, spinner


@handle_errors
def api(
    model: ModelArg,
    host: ListenHostOpt = "127.0.0.1",
    port: ListenPortOpt = 8000,
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
    from petals_cli.config import ClientConfig

    setup_logging(verbose)
    check_listen_host(host)
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
            from petals_cli.api import make_app
            from petals_cli.web.app import serve
        except ImportError as error:
            raise api_extra_missing(error) from None
    distributed, tokenizer = open_model_with_feedback(model, config)
    try:
        app = make_app(distributed, tokenizer, model_name=model, api_key=api_key, max_concurrent=max_concurrent)
        typer.echo(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
        serve(app, host, port)
    finally:
        distributed.close()
